"""The CPU stage prepares each downstream task's labels (#14): VQA's soft answer scores from the
human answers, an NLVR2 pair's second image, RefCOCO+'s referred box; bad rows skipped."""
import io

import numpy as np
import pytest
from PIL import Image

from alignlab.models.base import InputSpec
from alignlab.models.inputs import vqa_accuracy
from alignlab.platform import shards as S
from alignlab.platform.config import load_config
from alignlab.platform.ingest import local_eval_batches


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _regions(n: int, shift: float = 0.0):
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]][:n], dtype=np.float32)
    return np.full((n, 6), shift, np.float32), boxes, [""] + ["circle"] * (n - 1)


def _write(root, rows, answers=()):
    with S.ShardWriter(str(root), "tests", rows_per_file=100) as w:
        w.write_all(rows)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "it", "red", "?"]))
    (root / "tags.txt").write_text("circle\n")
    if answers:
        (root / "answers.txt").write_text("\n".join(answers) + "\n")


def _row(i, **extra):
    feats, boxes, tags = _regions(3)
    return dict(image=_png((i, 0, 0)), image_id=f"i{i}", caption="is it red ?", caption_id=f"q{i}", split="test",
                region_features=feats, boxes=boxes, tags=tags, **extra)


def _batches(root, spec):
    cfg = load_config("mvptr_demo", [f"data.shards={root}", "data.max_regions=3", "model.image.region_dim=6"])
    return list(local_eval_batches(cfg.data, cfg.objectives, spec, "test", 16))


def test_vqa_rows_get_each_answers_vqa_accuracy_among_the_ten_humans(tmp_path):
    humans = [["yes"] * 3 + ["no"] * 6 + ["maybe"], ["no"] * 10]
    _write(tmp_path, [_row(i, question="is it red ?", answer=h[0], human_answers=h) for i, h in enumerate(humans)],
           answers=("no", "yes"))
    batch = _batches(tmp_path, InputSpec(regions=True, qa=True, answer_scores=True))[0]
    # "maybe" is outside answers.txt: it scores nowhere, and the others keep their accuracy.
    assert batch["answer_scores"].numpy() == pytest.approx(np.array([[vqa_accuracy(6), vqa_accuracy(3)], [1.0, 0.0]]))
    assert batch["answer_labels"].tolist() == [1, 0]


def test_nlvr2_rows_carry_their_second_images_inputs(tmp_path):
    rows = []
    for i in range(2):
        feats_b, boxes_b, tags_b = _regions(2, shift=1.0)
        rows.append(_row(i, question="is it red ?", answer="true" if i else "false", image_b=_png((0, i, 0)),
                         image_id_b=f"j{i}", region_features_b=feats_b, boxes_b=boxes_b, tags_b=tags_b))
    _write(tmp_path, rows, answers=("false", "true"))
    batch = _batches(tmp_path, InputSpec(regions=True, tags=True, qa=True, image_pair=True))[0]
    assert batch["region_features_b"].shape == (2, 3, 6) and batch["region_mask_b"][0].tolist() == [True, True, False]
    assert float(batch["region_features_b"][0, 0, 0]) == 1.0 and float(batch["region_features"][0, 0, 0]) == 0.0
    assert batch["tag_ids_b"].shape == batch["tag_ids"].shape
    assert batch["answer_labels"].tolist() == [0, 1]


def test_refcoco_rows_carry_the_referred_box_and_a_row_without_one_is_skipped(tmp_path):
    rows = [_row(i, target_box=[0.0, 0.0, 0.5, 0.5]) for i in range(3)]
    rows[1]["target_box"] = [float("nan")] * 4
    _write(tmp_path, rows)
    batch = _batches(tmp_path, InputSpec(regions=True, target_box=True))[0]
    assert batch["target_box"].tolist() == [[0.0, 0.0, 0.5, 0.5]] * 2
    assert len(batch["image_key"]) == 2


def test_a_task_without_its_columns_fails_naming_them(tmp_path):
    _write(tmp_path, [_row(0, question="is it red ?", answer="yes")], answers=("yes",))
    with pytest.raises(S.ShardSchemaError, match="no column 'image_id_b'; the task reads image pairs"):
        _batches(tmp_path, InputSpec(regions=True, qa=True, image_pair=True))
    with pytest.raises(S.ShardSchemaError, match="no column 'target_box'"):
        _batches(tmp_path, InputSpec(regions=True, target_box=True))

