"""The Ray Data CPU stage: decode, tokenize and mask before the train step; bad rows skipped and
counted, never a crash; local paths and object storage alike."""
import io
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignlab.models.base import InputSpec
from alignlab.platform import shards as S
from alignlab.platform.config import load_config
from alignlab.platform.ingest import PASS_COLUMN, build_dataset, image_key, make_counter, pass_files
from alignlab.platform.synth import SynthConfig, generate


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    generate(str(root), SynthConfig(n_train_images=8, n_test_images=4, captions_per_image=1, rows_per_file=100))
    with S.ShardWriter(str(root / "bad"), "tests", rows_per_file=100) as w:
        rows = [dict(image=_png((i * 40, 0, 0)), image_id=f"i{i}", caption=f"a red square {i}", caption_id=f"c{i}",
                     split="train") for i in range(6)]
        rows[2]["image"] = b"this is not an image"
        rows[4]["caption"] = "   "
        w.write_all(rows)
    return root


def _cfg(root, split="train"):
    return load_config("dual_encoder_demo", [f"data.shards={root}", f"data.train_split={split}", "data.image_size=32",
                                             "data.preprocess_batch_size=4"])


def test_corrupt_image_and_empty_caption_are_skipped_and_counted(ray_session, shard_root):
    # The bad split has no vocab.txt of its own: point the tokenizer at the synthetic one.
    cfg = load_config("dual_encoder_demo", [f"data.shards={shard_root}", "data.train_split=bad",
                                            f"data.tokenizer={shard_root / 'vocab.txt'}", "data.image_size=32",
                                            "data.preprocess_batch_size=4"])
    counter = make_counter()
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "bad", train=False, counter=counter)
    rows = ds.take_all()
    assert sorted(int(r["image_key"]) for r in rows) == sorted(image_key(f"i{i}") for i in (0, 1, 3, 5))
    assert rows[0]["pixels"].shape == (3, 32, 32) and rows[0]["pixels"].dtype == np.uint8
    snap = ray_session.get(counter.snapshot.remote())
    assert snap["counts"] == {"undecodable_image": 1, "empty_caption": 1}
    assert any("caption_id=c2" in e and "bad" in e and ".parquet" in e for e in snap["examples"])


def test_tokenize_and_mask_in_the_cpu_stage(ray_session, shard_root):
    cfg = _cfg(shard_root)
    spec = InputSpec(pixels=True, regions=True, mlm=True)
    rows = build_dataset(cfg.data, cfg.objectives, spec, "train", train=True).take_all()
    assert len(rows) == 8
    r = rows[0]
    assert r["input_ids"].shape == (cfg.data.max_text_len,) and r["input_ids"][0] == 2  # [CLS]
    assert r["region_features"].shape == (cfg.data.max_regions, 54) and r["region_mask"].any()
    labels = np.stack([x["mlm_labels"] for x in rows])
    masked = labels != -100
    ids = np.stack([x["input_ids"] for x in rows])
    assert masked.any() and (labels[masked] == ids[masked]).all()
    assert not masked[:, 0].any()  # never [CLS]
    # Evaluation rows come unmasked: no work spent on objectives that do not run there.
    clean = build_dataset(cfg.data, cfg.objectives, spec, "train", train=False).take(2)
    assert "mlm_labels" not in clean[0] and "mlm_input_ids" not in clean[0] and "input_ids" in clean[0]


def test_schema_error_names_the_file_before_anything_runs(ray_session, tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "train").mkdir()
    pq.write_table(S.rows_to_table([dict(image=b"x", image_id="i", caption="c", caption_id="c", split="train")])
                   .drop_columns(["image"]), str(tmp_path / "train" / "part-00000.parquet"))
    cfg = _cfg(tmp_path)
    with pytest.raises(S.ShardSchemaError, match=r"part-00000.parquet: missing required column 'image'"):
        build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=True)


def test_reads_shards_from_object_storage(ray_session, s3_root, tmp_path):
    uri = s3_root("synth")
    generate(uri, SynthConfig(n_train_images=4, n_test_images=2, captions_per_image=1, rows_per_file=100))
    cfg = load_config("dual_encoder_demo", [f"data.shards={uri}", "data.image_size=32"])
    rows = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=False).take_all()
    assert len(rows) == 4 and rows[0]["pixels"].shape == (3, 32, 32)


def _dirty_table(root) -> pa.Table:
    """The synthetic train rows with three flaws: row 1's caption is Latin-1 bytes under a string
    type (as a mis-encoding writer leaves it), row 2 has a NaN region feature, row 3 an infinite box."""
    rows = pq.read_table(S.list_parquet(str(root / "train"))[0]).to_pylist()
    rows[2]["region_features"][0][5] = float("nan")
    rows[3]["boxes"][0][2] = float("inf")
    table = S.rows_to_table(rows, region_dim=len(rows[0]["region_features"][0]))
    captions = [r["caption"].encode() for r in rows]
    captions[1] = "un café".encode("latin-1")
    bad = pa.array(captions, pa.binary()).view(pa.string())  # no UTF-8 check, as such writers do
    table = table.set_column(table.schema.get_field_index("caption"), "caption", bad)
    with pytest.raises(pa.ArrowInvalid, match="Invalid UTF8"):
        table.validate(full=True)
    return table


def test_preprocessor_skips_non_utf8_captions_and_non_finite_regions(shard_root):
    from alignlab.platform.ingest import Preprocessor, columns_for, read_schema

    cfg = _cfg(shard_root)
    spec = InputSpec(pixels=False, regions=True, mlm=True)
    table = _dirty_table(shard_root)
    files = S.list_parquet(str(shard_root / "train"))
    batch = {f.name: table.column(f.name).cast(f.type).to_numpy(zero_copy_only=False)
             for f in read_schema(files, columns_for(spec), str(shard_root))}
    assert isinstance(batch["caption"][0], bytes)  # read as bytes: no Arrow decoding to fail
    calls = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=lambda *args: calls.append(args)))
    out = Preprocessor(cfg.data, cfg.objectives, spec, train=True, counter=counter)(batch)
    assert len(out["input_ids"]) == len(table) - 3 and np.isfinite(out["region_features"]).all()
    ((skipped, notes, train),) = calls
    ids = table.column("caption_id").to_pylist()
    assert [(reason, cid) for reason, cid, _, _ in skipped] == [
        ("invalid_utf8_caption", ids[1]), ("non_finite_regions", ids[2]), ("non_finite_regions", ids[3])]
    assert "byte 0xe9 at offset 6" in skipped[0][2] and "(1 feature values, 0 box values)" in skipped[1][2]
    assert notes == [] and train is True


def test_a_data_worker_prepares_a_shard_set_with_its_own_vocab_without_importing_torch(shard_root, tmp_path):
    """A Ray Data worker is a fresh process per actor: torch's import (about 2 s of a core here,
    through transformers' AutoTokenizer) would be paid by each, in every run, for nothing the CPU
    stage computes. Unpickling its arguments and preparing a batch, as the actor does, must not."""
    import pickle
    import subprocess
    import sys

    cfg = _cfg(shard_root)
    args = tmp_path / "args.pkl"  # the test's own objects, as Ray hands them to the actor
    args.write_bytes(pickle.dumps((cfg.data, cfg.objectives, InputSpec(pixels=True, regions=True, mlm=True))))
    code = f"""
import pickle, sys
import pyarrow.parquet as pq
from alignlab.platform import shards
from alignlab.platform.ingest import Preprocessor, columns_for, read_schema
data, objectives, spec = pickle.loads(open("{args}", "rb").read())
files = shards.list_parquet("{shard_root / 'train'}")
schema = read_schema(files, columns_for(spec), "{shard_root}")
table = pq.read_table(files[0], schema=schema)
out = Preprocessor(data, objectives, spec, train=True)({{c: table.column(c).to_numpy(zero_copy_only=False)
                                                       for c in schema.names}})
print(len(out["input_ids"]), "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["8", "False"]


def test_counter_counts_each_row_once_and_per_training_epoch():
    """Issue #17's probe: 1.2 epochs over 40 bad rows showed 80 skips. Rows count once; the
    training read keeps its epochs apart; evaluation reads count in the totals only."""
    from alignlab.platform.ingest import MAX_EXAMPLES, DataQuality

    q = DataQuality()
    bad = [("undecodable_image", f"c{i}", f"undecodable_image: part-0.parquet caption_id=c{i}", 0) for i in range(40)]
    q.add(bad, [("answer_not_in_vocab", "c50")], train=True)
    q.add([(*b[:3], 1) for b in bad[:8]], [("answer_not_in_vocab", "c50")], train=True)  # 0.2 epoch re-reads 8
    q.add([("empty_caption", "t1", "empty_caption: test caption_id=t1", 0)] * 2, [], train=False)  # two evals
    snap = q.snapshot()
    assert snap["counts"] == {"undecodable_image": 40, "empty_caption": 1}
    assert snap["notes"] == {"answer_not_in_vocab": 1}
    assert snap["train_epochs"] == {0: {"undecodable_image": 40}, 1: {"undecodable_image": 8}}
    assert snap["examples"] == [e for _, _, e, _ in bad[:MAX_EXAMPLES]]
    # A resumed stream's passes are the run's epochs: begun at epoch 3, its second pass is 4.
    q.begin_stream(3, 96)
    q.add([(*b[:3], 3) for b in bad[:2]] + [(*b[:3], 4) for b in bad[:5]], [], train=True)
    assert q.epoch_counts(3) == {"undecodable_image": 2} and q.epoch_counts(4) == {"undecodable_image": 5}
    assert q.stream_start() == (3, 96)


def test_bad_rows_read_through_ray_are_skipped_and_counted_once(ray_session, shard_root):
    """Through Ray Data, where a non-UTF-8 caption crashed the read with an ArrowException naming
    no file: two epochs of a split with three bad rows keep the others and count three."""
    dirty = shard_root / "dirty"
    dirty.mkdir(exist_ok=True)
    table = _dirty_table(shard_root)
    pq.write_table(table, str(dirty / "part-00000.parquet"))
    cfg = load_config("mvptr_demo", [f"data.shards={shard_root}", "data.train_split=dirty",
                                      f"data.tokenizer={shard_root / 'vocab.txt'}", "data.preprocess_batch_size=4"])
    counter = make_counter()
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(regions=True, mlm=True), "dirty", train=True,
                       counter=counter)
    for epoch in range(2):
        ray_session.get(counter.begin_stream.remote(epoch))
        assert len(ds.take_all()) == len(table) - 3
    # The same two epochs as one stream of two passes, begun at epoch 2.
    stream = build_dataset(cfg.data, cfg.objectives, InputSpec(regions=True, mlm=True), "dirty", train=True,
                           counter=counter, passes=2)
    ray_session.get(counter.begin_stream.remote(2))
    assert len(stream.take_all()) == 2 * (len(table) - 3)
    snap = ray_session.get(counter.snapshot.remote())
    want = {"invalid_utf8_caption": 1, "non_finite_regions": 2}
    assert snap["counts"] == want and snap["train_epochs"] == {0: want, 1: want, 2: want, 3: want}
    assert any("dirty" in e and "part-00000.parquet" in e and "invalid_utf8_caption" in e for e in snap["examples"])


def test_a_split_without_the_requested_id_columns_fails_naming_the_file(shard_root):
    cfg = _cfg(shard_root)
    with pytest.raises(S.ShardSchemaError, match=r"train/part-00000.parquet: no column 'candidate_type'"):
        build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=False,
                      id_columns=S.COMPOSITIONAL_COLUMNS)


def test_the_compositional_split_carries_candidate_type_and_group_through_ray(ray_session, shard_root):
    import pyarrow.parquet as pq

    cfg = _cfg(shard_root)
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "compositional", train=False,
                       id_columns=S.COMPOSITIONAL_COLUMNS)
    got = []
    for batch in ds.iter_torch_batches(batch_size=8):
        got += zip(batch["caption_key"].tolist(), batch["candidate_type"].tolist(), batch["group_id"].tolist())
    table = pq.read_table(shard_root / "compositional").to_pylist()
    assert sorted(got) == sorted((image_key(r["caption_id"]), r["candidate_type"], r["group_id"]) for r in table)
    assert {t for _, t, _ in got} >= {0, 3, 4}  # true captions, wrong counts, replaced objects


def test_each_pass_of_a_training_stream_reads_every_file_once_in_its_own_order():
    files, rows = [f"f{i}" for i in range(10)], [30] * 10
    reads = pass_files(files, rows, passes=3, seed=7)
    orders = [[f for p, f, _, _ in reads if p == q] for q in range(3)]
    assert all(sorted(o) == files for o in orders) and len({tuple(o) for o in orders}) == 3
    assert [p for p, _, _, _ in reads] == sorted(p for p, _, _, _ in reads)  # pass after pass
    assert {(first, n) for _, _, first, n in reads} == {(0, 30)}  # whole files
    assert reads == pass_files(files, rows, passes=3, seed=7)  # reproducible from the seed
    capped = pass_files(files, rows, passes=2, seed=7, limit=70)  # data.max_train_rows
    assert [[n for p, _, _, n in capped if p == q] for q in range(2)] == [[30, 30, 10]] * 2


def test_a_stream_started_mid_pass_skips_the_rows_read_and_keeps_the_order():
    """A resumed run's stream: from pass 1, 70 of its rows already read, it reads the rest of pass
    1 (the third file from its row 10) and the passes after, each as the unbroken stream reads
    it; a start past a whole pass leaves that pass out."""
    files, rows = [f"f{i}" for i in range(10)], [30] * 10
    whole = pass_files(files, rows, passes=3, seed=7)
    resumed = pass_files(files, rows, passes=2, seed=7, start=(1, 70))
    pass1 = [r for r in whole if r[0] == 1]
    assert resumed[0] == (1, pass1[2][1], 10, 20)
    assert resumed[1:] == pass1[3:] + [r for r in whole if r[0] == 2]
    assert sum(n for p, _, _, n in resumed if p == 1) == 300 - 70
    assert pass_files(files, rows, passes=1, seed=7, start=(1, 300)) == []
    capped = pass_files(files, rows, passes=1, seed=7, limit=70, start=(0, 40))  # 30 of the cap's 70 left
    assert [(first, n) for _, _, first, n in capped] == [(10, 20), (0, 10)]


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory):
    """120 training rows in two files, with captions long enough to mask."""
    root = tmp_path_factory.mktemp("stream")
    generate(str(root), SynthConfig(n_train_images=60, n_test_images=4, rows_per_file=100))
    return root


def test_a_training_stream_reads_every_row_once_per_pass_and_masks_it_afresh(ray_session, stream_root):
    """One execution serves every epoch: each pass holds every row once, passes arrive in order,
    and the Preprocessor's masking differs from pass to pass (the same row, other positions)."""
    cfg = load_config("mvptr_demo", [f"data.shards={stream_root}", "data.preprocess_batch_size=16"])
    spec = InputSpec(regions=True, tags=True, mlm=True, mcr=True)
    rows = build_dataset(cfg.data, cfg.objectives, spec, "train", train=True, passes=3).take_all()
    passes = [int(r[PASS_COLUMN]) for r in rows]
    assert passes == sorted(passes) and [passes.count(p) for p in range(3)] == [120] * 3
    masks = [{int(r["caption_key"]): r["mlm_labels"] != -100 for r in rows if r[PASS_COLUMN] == p} for p in range(3)]
    assert all(len(m) == 120 and m.keys() == masks[0].keys() for m in masks)
    for a, b in ((0, 1), (1, 2)):
        same = np.mean([np.array_equal(masks[a][k], masks[b][k]) for k in masks[a]])
        assert same < 0.25, (a, b, same)


def stream_order(rows) -> list[tuple[int, int]]:
    """A training stream's rows as (pass, caption key), in the order read."""
    return [(int(r[PASS_COLUMN]), int(r["caption_key"])) for r in rows]


def test_a_training_stream_starts_where_the_trainer_says_when_it_executes(ray_session, stream_root):
    """The stream's reads are made when it executes, from the start the counter holds then: a
    resumed trainer that says "pass 1, 70 rows read" after the dataset was built gets the rows of
    the unbroken stream from that point, in its order, and as many passes after them."""
    cfg = load_config("mvptr_demo", [f"data.shards={stream_root}", "data.preprocess_batch_size=16"])
    counter = make_counter()
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(regions=True, mlm=True), "train", train=True,
                       counter=counter, passes=3)
    whole = stream_order(ds.take_all())
    ray_session.get(counter.begin_stream.remote(1, 70))
    resumed = stream_order(ds.take_all())
    assert len(whole) == 360 and resumed[:170] == whole[190:]
    assert [p for p, _ in resumed[170:]] == [3] * 120 and {k for _, k in resumed[170:]} == {k for _, k in whole[:120]}
    # As a Ray Train worker reads it: a split's coordinator executes the stream on first request.
    (split,) = ds.streaming_split(1)
    ray_session.get(counter.begin_stream.remote(2, 100))
    got = stream_order(split.iter_rows())
    assert got[:140] == whole[340:] + resumed[170:] and [p for p, _ in got[140:]] == [4] * 120


def test_ray_train_reads_the_training_stream_in_its_order(ray_session, stream_root):
    """Ray Train gives each dataset the driver's global execution options unless the run's
    dataset config keeps the dataset's own: that dropped the stream's preserve_order, and a
    seed no longer fixed the batches. A worker's split, made as Ray Train makes it, reads the
    stream in the order build_dataset gives it."""
    from alignlab.platform.train import dataset_config

    cfg = load_config("mvptr_demo", [f"data.shards={stream_root}", "data.preprocess_batch_size=16",
                                     "data.preprocess_concurrency=2"])
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(regions=True, mlm=True), "train", train=True, passes=2)
    config = dataset_config({"train": ds})
    assert config._resolve_execution_options("train").preserve_order
    split = config.configure({"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
    assert stream_order(split.iter_rows()) == stream_order(ds.take_all())


def test_a_training_stream_masks_a_batch_alike_whichever_actor_prepares_it(ray_session, stream_root):
    """Each batch draws its masks from (seed, pass, its first row), not from its actor's running
    state: with one Preprocessor actor or two (which of them prepares a batch varies), a row gets
    the same masks in the same pass; another seed draws others."""
    spec = InputSpec(regions=True, tags=True, mlm=True, mcr=True)

    def masks(concurrency: int, seed: int = 0) -> dict:
        cfg = load_config("mvptr_demo", [f"data.shards={stream_root}", "data.preprocess_batch_size=16",
                                         f"data.preprocess_concurrency={concurrency}"])
        rows = build_dataset(cfg.data, cfg.objectives, spec, "train", train=True, seed=seed, passes=2).take_all()
        return {(int(r[PASS_COLUMN]), int(r["caption_key"])): (r["mlm_labels"].tolist(), r["mcr_labels"].tolist())
                for r in rows}

    one = masks(1)
    assert len(one) == 240 and masks(2) == one
    other = masks(1, seed=1)
    assert other.keys() == one.keys() and np.mean([other[k] == one[k] for k in one]) < 0.25


def test_the_trainers_shuffle_buffer_repeats_its_draws_under_a_seed(ray_session):
    """The trainer's local shuffle buffer (shard_batches) draws from the seed it is given: the
    same seed, the same batches; another seed, another order."""
    import ray
    import torch

    from alignlab.platform.train import shard_batches

    cfg = load_config("mvptr_demo", ["data.shuffle_buffer=64"])
    ds = ray.data.range(256, override_num_blocks=8)
    ds.context.execution_options.preserve_order = True  # as build_dataset's training stream

    def order(seed: int) -> list[int]:
        return [int(i) for b in shard_batches(ds.iterator(), cfg.data, 16, torch.device("cpu"), seed) for i in b["id"]]

    first = order(3)
    assert sorted(first) == list(range(256)) and first != list(range(256))
    assert order(3) == first and order(4) != first


def test_scheduling_loop_floor_sleeps_out_the_rest_of_a_fast_step():
    from alignlab.platform.loop_pacing import SchedulingLoopFloor

    now, slept = [0.0], []
    def sleep(s):
        slept.append(s)
        now[0] += s

    class Executor:  # the one thing the floor reads of Ray Data's StreamingExecutor
        idling = True
        def _consumer_idling(self):
            return self.idling

    ex = Executor()
    floor = SchedulingLoopFloor(0.02, 0.1, clock=lambda: now[0], sleep=sleep)
    floor.before_execution_starts(ex)
    now[0] = 0.005  # a spinning step: nothing to wait on
    floor.on_execution_step(ex)
    assert slept == [pytest.approx(0.015)]
    now[0] += 0.1  # a step that waited on ray.wait
    floor.on_execution_step(ex)
    assert len(slept) == 1
    now[0] += 0.019  # the floor counts from the end of the last step, sleep included
    floor.on_execution_step(ex)
    assert slept[1] == pytest.approx(0.001)
    ex.idling = False  # the consumer holds output it has not taken: the longer floor
    now[0] += 0.005
    floor.on_execution_step(ex)
    assert slept[2] == pytest.approx(0.095)
    ex.idling = True  # it took the last block: back to the short one
    now[0] += 0.005
    floor.on_execution_step(ex)
    assert slept[3] == pytest.approx(0.015)


def test_every_stream_paces_its_scheduling_loop(ray_session, shard_root, monkeypatch):
    import ray.data

    from alignlab.platform.loop_pacing import SchedulingLoopFloor

    steps = []
    monkeypatch.setattr(SchedulingLoopFloor, "on_execution_step", lambda self, executor: steps.append(executor))
    cfg = _cfg(shard_root)
    for train in (True, False):
        steps.clear()
        ds = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=train)
        assert ds.context.custom_execution_callback_classes.count(SchedulingLoopFloor) == 1
        assert len(ds.take_all()) == 8 and steps  # the executor that ran the stream called it
        assert {type(e._consumer_idling()) for e in steps} == {bool}  # the private test the floor reads
    assert SchedulingLoopFloor not in ray.data.DataContext.get_current().custom_execution_callback_classes
    # A Ray Train worker's stream runs in a split coordinator actor, on the dataset's own context.
    (shard,) = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train",
                             train=True).streaming_split(1, equal=True)
    assert SchedulingLoopFloor in shard.get_context().custom_execution_callback_classes
