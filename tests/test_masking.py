import numpy as np

from alignlab.models.base import IGNORE
from alignlab.platform.masking import bert_mask


def test_bert_mask_rates_and_labels():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=(2000, 40))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[:, 0] = False  # [CLS]
    maskable[:, 30:] = False  # padding
    out, labels = bert_mask(ids, maskable, 0.15, mask_id=4, random_range=(0, 1000), rng=rng)
    selected = labels != IGNORE
    assert not selected[:, 0].any() and not selected[:, 30:].any()
    assert abs(selected[:, 1:30].mean() - 0.15) < 0.01
    assert (labels[selected] == ids[selected]).all()
    as_mask = (out == 4) & selected
    unchanged = (out == ids) & selected
    assert abs(as_mask.sum() / selected.sum() - 0.8) < 0.02
    # 10% unchanged plus the random replacements that happen to draw the same id.
    assert abs(unchanged.sum() / selected.sum() - 0.1) < 0.02
    assert (out[~selected] == ids[~selected]).all()


def test_forced_selection_is_respected():
    rng = np.random.default_rng(1)
    ids = np.arange(10)[None].repeat(3, 0)
    chosen = np.zeros_like(ids, dtype=bool)
    chosen[:, 4] = True
    out, labels = bert_mask(ids, np.ones_like(chosen), 0.9, 99, (0, 10), rng, selected=chosen)
    assert (labels[:, 4] == 4).all() and (np.delete(labels, 4, axis=1) == IGNORE).all()
