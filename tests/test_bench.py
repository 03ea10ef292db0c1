"""`alignlab bench`: the synthetic batch is what the data stage would yield, every architecture
trains on it, FLOPs scale with the batch, the all-gather check holds on gloo, and --gpu refuses
without CUDA. Tiny models on the CPU; the figures themselves come from the bench, not from here."""
from __future__ import annotations

import gc
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alignlab.models.registry import get_spec
from alignlab.platform import bench
from alignlab.platform.config import load_config
from alignlab.platform.ingest import Preprocessor, columns_for
from alignlab.platform.synth import SynthConfig, generate
from alignlab.platform.tokenization import load_tokenizer, vocab_info

pytestmark = pytest.mark.timeout(120)

ARCHITECTURES = ("mvptr", "semvlp", "simla", "dual_encoder")
# The demo presets, smaller still; SIMLA's queue (128) is a multiple of every batch used here.
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=2",
        "model.image.embed_dim=32", "model.image.depth=1", "model.image.num_heads=2", "data.max_text_len=12"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine OpenMP's spinning threads
    make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-synth")
    generate(str(root), SynthConfig(n_train_images=6, n_test_images=2, rows_per_file=100))
    return root


def tiny_cfg(arch: str, root="data/synth", *overrides):
    extra = {"semvlp": ["model.semvlp.cross_layer=1"],
             "simla": ["data.image_size=32", "model.image.img_size=32", "model.simla.codebook_size=64"]}.get(arch, [])
    return load_config(f"{arch}_demo", [f"data.shards={root}", *TINY, *extra, *overrides])


def test_synthetic_batch_has_the_data_stage_keys_dtypes_and_shapes(synth_root):
    vocab = vocab_info(load_tokenizer("auto", str(synth_root)), str(synth_root))
    # MVPTR's official reading writes tags as word pieces and masks phrases at random (#15).
    for arch, overrides in [(a, []) for a in ARCHITECTURES] + [("mvptr", ["model.mvptr.reading=official"])]:
        cfg = tiny_cfg(arch, synth_root, *overrides)
        spec = get_spec(arch).input_spec(cfg.model, cfg.objectives)
        files = sorted((synth_root / "train").glob("*.parquet"))
        rows = pq.read_table(files[0], columns=columns_for(spec)).slice(0, 10).to_pydict()
        real = Preprocessor(cfg.data, cfg.objectives, spec, train=True)(rows)
        fake = bench.synthetic_batch(spec, cfg, vocab, 10)
        assert set(fake) == set(real), arch
        for k, v in real.items():
            assert (fake[k].numpy().dtype, fake[k].shape[1:]) == (v.dtype, v.shape[1:]), (arch, k)


def test_synthetic_batch_content_follows_the_id_layouts():
    cfg = load_config("mvptr_demo")
    vocab = bench.synthetic_vocab(size=300, tags=20, concepts=40)
    b = bench.synthetic_batch(get_spec("mvptr").input_spec(cfg.model, cfg.objectives), cfg, vocab, 10)
    assert b["image_key"].unique().numel() == 2  # 5 captions per image
    assert (b["input_ids"][:, 0] == vocab.cls_id).all() and (b["attention_mask"].sum(1) >= 3).all()
    masked = b["mlm_labels"] != -100
    assert masked.any() and (b["mlm_labels"][masked] == b["input_ids"][masked]).all()
    assert ((b["tag_ids"] >= 2) == b["tag_mask"]).all() and (b["tag_ids"] < 2 + 20).all()
    sel = b["mcr_labels"] != -100
    assert (b["mcr_labels"][sel] == b["tag_ids"][sel] - 2).all()
    # Each phrase concept's words are in its caption.
    for ids, phrases in zip(b["input_ids"].tolist(), b["phrase_ids"].tolist()):
        for p in phrases:
            assert p == 0 or set(vocab.concepts[p - 2]) <= set(ids)
    # MVPTR's official reading (#15): tags as word ids past the specials, MCR labels those ids.
    cfg = load_config("mvptr_demo", ["model.mvptr.reading=official"])
    b = bench.synthetic_batch(get_spec("mvptr").input_spec(cfg.model, cfg.objectives), cfg, vocab, 10)
    assert (b["tag_ids"][b["tag_mask"]] > vocab.mask_id).all() and (b["tag_ids"][~b["tag_mask"]] == vocab.pad_id).all()
    sel = b["mcr_labels"] != -100
    assert sel.any() and (b["mcr_labels"][sel] == b["tag_ids"][sel]).all()


def test_every_architecture_trains_with_finite_losses_on_synthetic_batches():
    vocab = bench.synthetic_vocab(size=300, tags=20, concepts=40)
    for arch in ARCHITECTURES:
        tb = bench.TrainingBench(tiny_cfg(arch), vocab, torch.device("cpu"))
        for precision in ("fp32", "bf16"):
            r = tb.measure(precision, 8, steps=1)
            assert r["nonfinite_losses"] == [] and r["skipped_steps"] == 0, (arch, precision)
            assert r["last_losses"] and all(np.isfinite(v) for v in r["last_losses"].values()), (arch, precision)
            assert r["samples_per_s"] > 0 and r["tflop_per_step"] > 0 and r["steps"] == 2


def test_flops_double_with_the_batch():
    tb = bench.TrainingBench(tiny_cfg("mvptr"), bench.synthetic_vocab(size=300, tags=20, concepts=40),
                             torch.device("cpu"))
    small, large = (tb.measure("fp32", n, steps=1)["tflop_per_step"] for n in (10, 20))
    assert 1.8 < large / small < 2.2


def test_gpu_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    from alignlab.platform.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--gpu", "--out", str(tmp_path / "b.json")])
    assert "--gpu needs a CUDA GPU and torch sees none" in str(e.value.code)
    assert not (tmp_path / "b.json").exists()


def test_report_json_has_the_documented_keys(tmp_path):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"gpu": {"common": TINY, "models": [
        {"name": "mvptr", "preset": "mvptr_demo", "overrides": ["data.batch_size=10"]},
        {"name": "broken", "preset": "mvptr_demo", "overrides": ["model.num_heads=5"]}]}}))
    out = tmp_path / "bench.json"
    report = bench.Report("gpu", out, bench.environment())
    bench.bench_training(report, bench.load_plan("gpu", plan_file), torch.device("cpu"), ("fp32",), 1, 100.0, 60)
    bench.bench_all_gather(report, 2, "gloo", sizes_mib=(1,))
    data = json.loads(out.read_text())
    assert data["bench"] == "gpu"
    assert {"python", "torch", "cuda", "gpu", "gpu_count", "driver"} <= set(data["environment"])
    train, gather = data["sections"]
    assert [s["name"] for s in data["sections"]] == ["training", "gloo all-gather"]
    assert all({"compares", "seconds", "error", "rows"} <= set(s) for s in data["sections"])
    ok, broken = train["rows"]
    assert {"model", "precision", "paper_batch", "batch", "params_m", "samples_per_s", "step_ms", "tflop_per_step",
            "tflops", "mfu", "peak_mem_gib", "skipped_steps", "nonfinite_losses", "seconds"} <= set(ok)
    assert ok["batch"] == ok["paper_batch"] == 10 and ok["mfu"] == pytest.approx(ok["tflops"] / 100.0)
    assert "error" in broken and report.failed()  # a failed model is a row, the others still run
    (row,) = gather["rows"]
    assert row["world"] == 2 and row["values_ok"] and row["grad_ok"] and row["busbw_gbs"] > 0


def test_batched_objectives_match_their_per_sample_loops():
    inputs = bench.objective_inputs(n=30)
    for name, batched, loop in bench.objective_pairs(inputs):
        assert bench.same_result(batched(), loop()), name
    h = inputs["negatives"]
    from alignlab.models.objectives import global_hard_negatives

    hardest = global_hard_negatives(h["logits"], h["row_ids"], h["col_ids"], "hardest")
    assert bench.same_result(hardest, bench.hard_negatives_loop(h["logits"], h["row_ids"], h["col_ids"], "hardest"))
    assert hardest[1].all() and (h["row_ids"][hardest[0]] != h["row_ids"]).all()  # never a caption of the same image
    wpg_scores, _ = bench.objective_pairs(inputs)[0][1]()
    assert (wpg_scores == 0).any() and (wpg_scores != 0).any()  # captions without phrases are in the inputs


def test_rerank_bench_counts_pairs_linear_in_n():
    report = bench.Report("quick", None, {})
    bench.bench_rerank(report, sizes=(20, 40), k_captions=4, k_images=2)
    small, large, ratio = report.data["sections"][0]["rows"]
    assert small["pairs"] == small["pairs_expected"] == 20 * 4 + 100 * 2
    assert large["pairs"] == 2 * small["pairs"] and ratio["pairs"] == 2


def test_rerank_states_bench_ranks_as_pair_by_pair_encoding_for_each_model_with_itm(tmp_path):
    simla = ["data.image_size=32", "model.image.img_size=32", "model.simla.codebook_size=64"]
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"quick": {"common": TINY, "models": [
        {"name": "mvptr", "preset": "mvptr_demo"},
        {"name": "mvptr -wpg", "preset": "mvptr_demo", "overrides": ["model.mvptr.ablation=wo_wpg"],
         "reference": "mvptr"},
        {"name": "simla", "preset": "simla_demo", "overrides": simla},
        {"name": "dual_encoder", "preset": "dual_encoder_demo"}]}}))
    report = bench.Report("quick", None, {})
    bench.bench_rerank_states(report, bench.load_plan("quick", plan_file), images=12, k_captions=3, k_images=2,
                              repeats=1)
    rows = report.data["sections"][0]["rows"]
    assert [r["model"] for r in rows] == ["mvptr", "simla"]  # the variant shares mvptr's; no ITM head
    for row in rows:
        assert row["pairs"] == 12 * 3 + 60 * 2 and row["same_rsum"] and row["speedup"] > 0


def test_step_shares_split_phases_and_compare_a_variant_with_its_reference(tmp_path):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"quick": {"common": [*TINY, "data.batch_size=10"], "models": [
        {"name": "full", "preset": "mvptr_demo"},
        {"name": "-wpg", "preset": "mvptr_demo", "overrides": ["model.mvptr.ablation=wo_wpg"], "reference": "full"}]}}))
    report = bench.Report("quick", None, {})
    bench.bench_step_shares(report, bench.load_plan("quick", plan_file), repeats=1)
    full, variant = report.data["sections"][0]["rows"]
    assert full["removed_share"] is None and variant["reference"] == "full"
    for row in (full, variant):
        assert min(row["forward_ms"], row["backward_ms"], row["optimizer_ms"]) > 0
    assert variant["removed_share"] == pytest.approx(1 - variant["step_ms"] / full["step_ms"])


def test_optimizer_bench_times_the_fused_step_against_the_loop_with_the_same_result(tmp_path):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"quick": {"common": TINY, "models": [
        {"name": "full", "preset": "mvptr_demo"},
        {"name": "-wpg", "preset": "mvptr_demo", "overrides": ["model.mvptr.ablation=wo_wpg"], "reference": "full"},
        {"name": "dual_encoder", "preset": "dual_encoder_demo"}]}}))
    report = bench.Report("quick", None, {})
    bench.bench_optimizer(report, bench.load_plan("quick", plan_file), steps=2, repeats=1)
    rows = report.data["sections"][0]["rows"]
    assert [r["model"] for r in rows] == ["full", "dual_encoder"]  # the variant shares full's parameters
    for row in rows:
        assert row["same_result"] and row["trainable_params"] > 0
        assert row["speedup"] == pytest.approx(row["loop_ms"] / row["fused_ms"])


def test_bench_plans_load_every_model():
    gpu = bench.load_plan("gpu")
    assert {e["cfg"].model.architecture for e in gpu} == set(ARCHITECTURES)
    for e in gpu:  # nothing may need a file or the network on the GPU machine
        assert e["cfg"].model.text_init == "" and not e["cfg"].model.image.pretrained
        assert e["cfg"].data.batch_size // e["cfg"].scaling.num_workers >= 64
    quick = bench.load_plan("quick")
    names = {e["name"] for e in quick}
    assert all(e["reference"] in names for e in quick if e["reference"])


def test_runner_resume_section_resumes_the_real_runner_exactly_on_cpu():
    """The GPU check's trainer section, on the CPU in bf16: a checkpointed and resumed run ends
    with the same weights as a straight one. Four steps (two, a checkpoint, two more): on a CPU
    without native bf16, where autocast emulates it, six took 26 s of the suite."""
    import torch

    report = bench.Report("test", None, {})
    bench.bench_runner_resume(report, torch.device("cpu"), precision="bf16", steps=4)
    (section,) = report.data["sections"]
    assert section["error"] is None
    (row,) = section["rows"]
    assert row["resumed_at_step"] == 2 and row["max_weight_diff"] == 0.0 and row["nonfinite_skipped"] == 0


# --- the Ray data path (alignlab bench --ray) ------------------------------------------------


@pytest.fixture(scope="module")
def ray_synth_root(tmp_path_factory):
    """Two training files of 100 rows, so a read has files to list and blocks to reorder."""
    root = tmp_path_factory.mktemp("bench-ray-synth")
    generate(str(root), SynthConfig(n_train_images=100, n_test_images=10, rows_per_file=100))
    return root


def ray_plan(tmp_path, root):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"ray": {"common": [*TINY, f"data.shards={root}", "data.batch_size=8",
                                                        "data.shuffle_buffer=16"],
                                             "models": [{"name": "mvptr", "preset": "mvptr_demo"}]}}))
    return bench.load_plan("ray", plan_file)


def rows_of(batches):
    """Every row of ``batches`` as a tuple of its values, sorted: the Ray pipeline's order differs."""
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    keys = sorted(batches[0])
    return sorted(tuple(b[k][i].tobytes() for k in keys) for b in batches for i in range(len(b[keys[0]])))


def test_local_loop_and_ray_pipeline_prepare_the_same_rows(ray_synth_root, ray_session):
    """The ingest section's two sides do the same work: without augmentation and masking (an
    evaluation read) the rows agree exactly; with them, every key, dtype and shape does (the
    training stream's rows also name their pass)."""
    from alignlab.platform.ingest import PASS_COLUMN, build_dataset, local_batches

    cfg = tiny_cfg("simla", ray_synth_root)
    spec = get_spec("simla").input_spec(cfg.model, cfg.objectives)
    for train in (False, True):
        local = list(local_batches(cfg.data, cfg.objectives, spec, "train", 50, train=train))
        ray = list(build_dataset(cfg.data, cfg.objectives, spec, "train", train=train).iter_batches(
            batch_size=50, batch_format="numpy"))
        assert sum(len(b["input_ids"]) for b in local) == sum(len(b["input_ids"]) for b in ray) == 200
        assert {k: (v.numpy().dtype, v.shape[1:]) for k, v in local[0].items()} == \
            {k: (v.dtype, v.shape[1:]) for k, v in ray[0].items() if k != PASS_COLUMN}, train
        if not train:
            assert rows_of(local) == rows_of(ray)


def test_footer_pool_follows_the_files_and_leaves_a_set_value(monkeypatch):
    from alignlab.platform import ingest

    assert [ingest.footer_actors(n) for n in (1, 10, 11, 5000)] == [1, 1, 2, ingest.RAY_FOOTER_ACTORS]
    monkeypatch.delenv(ingest.FOOTER_ACTORS_ENV, raising=False)
    with ingest.footer_pool(25):
        assert ingest.os.environ[ingest.FOOTER_ACTORS_ENV] == "3"
    assert ingest.FOOTER_ACTORS_ENV not in ingest.os.environ
    monkeypatch.setenv(ingest.FOOTER_ACTORS_ENV, "7")
    with ingest.footer_pool(25):
        assert ingest.os.environ[ingest.FOOTER_ACTORS_ENV] == "7"


@pytest.mark.timeout(300)
def test_ingest_and_memory_sections_rows_have_their_fields(ray_synth_root, ray_session, tmp_path):
    plan = ray_plan(tmp_path, ray_synth_root)
    scaled = bench.scaled_shards(ray_synth_root, tmp_path / "x2", 2)
    assert len(list((scaled / "train").glob("*.parquet"))) == 4 and (scaled / "vocab.txt").exists()
    report = bench.Report("ray", None, {})
    with bench.ray_cluster(plan[0]["cfg"]), bench.ProcessTree() as tree:
        bench.bench_ingest(report, plan, scaled, tree, rows=96)
        bench.bench_memory(report, plan, {1: ray_synth_root, 2: scaled}, tree)
    ingest, memory = report.data["sections"]
    assert ingest["error"] is None and memory["error"] is None
    local, ray, ratio = ingest["rows"]
    for row in (local, ray):
        assert row["rows"] >= 96 and min(row[k] for k in ("first_batch_s", "rows_per_s", "cores", "rows_per_cpu_s")) > 0
    assert ratio["per_core"] == pytest.approx(ray["rows_per_cpu_s"] / local["rows_per_cpu_s"])
    # The local loop prepares in this process; Ray in its workers, which the tree tells apart. A
    # Preprocessor worker of an earlier test's pipeline in this session's cluster may still spend a
    # little while the loop runs (0.01 and 0.07 CPU-s in two suite runs out of many), against the
    # seconds Ray's own run spends in them.
    assert local["driver_cpu_s"] > 0 and local["preprocessing_cpu_s"] < 0.1 * ray["preprocessing_cpu_s"]
    assert ratio["overhead"] == pytest.approx(1 - ray["preprocessing_cpu_s"] / ray["cpu_s"])
    small, large, grown = memory["rows"]
    assert (small["rows"], large["rows"], grown["rows"]) == (200, 400, 2)
    assert small["driver_mib"] > 0 and small["workers_mib"] > 0 and grown["driver_mib"] > 0


@pytest.mark.timeout(300)
def test_epochs_and_data_wait_sections_rows_have_their_fields(ray_synth_root, ray_session, tmp_path):
    plan = ray_plan(tmp_path, ray_synth_root)
    report = bench.Report("ray", None, {})
    with bench.ray_cluster(plan[0]["cfg"]):
        bench.bench_epochs(report, plan, ray_synth_root, rows=32, epochs=2)
        bench.bench_data_wait(report, plan, ray_synth_root, warmup=1, steps=2)
    epochs, wait = report.data["sections"]
    assert epochs["error"] is None and wait["error"] is None
    stream, per_epoch = epochs["rows"]
    assert (stream["execution"], per_epoch["execution"]) == ("one stream", "per epoch")
    for row in (stream, per_epoch):
        assert row["batches_per_epoch"] == [4, 4] and row["boundary_s"] > 0 and row["first_batch_s"] > 0
        assert row["max_gap_s"] >= row["boundary_s"]
    (row,) = wait["rows"]
    assert row["steps"] == 2 and 0 <= row["data_wait"] <= 1 and row["samples_per_s"] > 0
    assert row["step_ms_stream"] > 0 and row["step_ms_memory"] > 0
    assert row["stream_cost"] == pytest.approx(row["step_ms_stream"] / row["step_ms_memory"])


def test_stream_or_replay_replays_the_last_batches_it_streamed_and_names_their_source():
    source = bench.StreamOrReplay(range(10), keep=2)  # an iterable, as shard_batches returns
    it = iter(source)
    got = [(next(it), source.source) for _ in range(3)]
    source.replay = True
    got += [(next(it), source.source) for _ in range(3)]
    source.replay = False
    got += [(next(it), source.source) for _ in range(2)]
    assert got == [(0, "stream"), (1, "stream"), (2, "stream"), (1, "memory"), (2, "memory"), (1, "memory"),
                   (3, "stream"), (4, "stream")]
    assert list(bench.StreamOrReplay([], keep=2)) == []


def test_settling_streams_finishes_dropped_generators_and_waits_for_ray_data_reading_threads():
    finished = []

    def stream():
        try:
            yield 1
        finally:
            finished.append("generator")

    class Holder:  # a stream the bench dropped inside a reference cycle
        pass

    gc.disable()  # only settle_streams' own collection may find it
    try:
        holder = Holder()
        holder.me, holder.it = holder, stream()
        next(holder.it)
        del holder
        assert finished == []

        reading = threading.Thread(target=lambda: (time.sleep(0.3), finished.append("thread")),
                                   name="map_tp_filling_worker-7", daemon=True)
        reading.start()
        stuck = threading.Event()
        other = threading.Thread(target=stuck.wait, name="some-other-thread", daemon=True)
        other.start()
        t0 = time.monotonic()
        bench.settle_streams(timeout_s=5.0)
    finally:
        gc.enable()
    assert finished == ["generator", "thread"] and not reading.is_alive()
    assert other.is_alive() and time.monotonic() - t0 < 4.0  # only Ray Data's reading threads are waited for
    stuck.set()


def test_closing_a_stream_or_replay_iteration_closes_the_stream_it_reads():
    closed = []

    def stream():  # a Ray Data iterator stops its threads in such a finally
        try:
            yield from range(10)
        finally:
            closed.append(True)

    source = bench.StreamOrReplay(stream(), keep=2)
    it = iter(source)
    assert next(it) == 0 and not closed
    it.close()  # what Runner.end_stream does; source itself stays referenced
    assert closed == [True]


@pytest.mark.timeout(300)
def test_leftover_section_counts_what_the_data_stage_spends_after_a_stop(ray_synth_root, ray_session, tmp_path):
    plan = ray_plan(tmp_path, ray_synth_root)
    report = bench.Report("ray", None, {})
    with bench.ray_cluster(plan[0]["cfg"]), bench.ProcessTree() as tree:
        bench.bench_leftover(report, plan, ray_synth_root, tree, batches=2, passes=3, quiet_s=1.0)
    (section,) = report.data["sections"]
    assert section["error"] is None
    one, stream = section["rows"]
    assert (one["passes"], stream["passes"]) == (1, 3)
    assert (one["rows_read"], one["rows_left"], stream["rows_left"]) == (16, 184, 584)
    for row in (one, stream):
        assert row["preprocessing_cpu_s"] >= 0 and row["other_workers_cpu_s"] >= 0 and row["busy_s"] >= 0


@pytest.mark.timeout(300)
def test_pacing_section_reads_the_stream_without_and_with_the_loop_floor(ray_synth_root, ray_session, tmp_path):
    plan = ray_plan(tmp_path, ray_synth_root)
    report = bench.Report("ray", None, {})
    with bench.ray_cluster(plan[0]["cfg"]), bench.ProcessTree() as tree:
        bench.bench_pacing(report, plan, ray_synth_root, tree, batches=4, hold_s=0.05, lead_s=1.0)
    (section,) = report.data["sections"]
    assert section["error"] is None
    without, with_, ratio = section["rows"]
    for row in (without, with_):
        assert row["wall_s"] >= 4 * 0.05 and row["other_workers_cpu_s"] >= 0 and row["preprocessing_cpu_s"] >= 0
    assert (without["floor"], with_["floor"], ratio["floor"]) == (False, True, "without/with")
    assert ratio["wall_s"] == pytest.approx(without["wall_s"] / with_["wall_s"])


@pytest.mark.timeout(300)
def test_scaling_section_trains_under_ddp_with_one_and_two_gloo_workers(tmp_path):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(json.dumps({"quick": {"common": [*TINY, "data.batch_size=8"],
                                               "models": [{"name": "mvptr", "preset": "mvptr_demo"}]}}))
    report = bench.Report("quick", None, {})
    bench.bench_scaling(report, bench.load_plan("quick", plan_file), steps=2)
    (section,) = report.data["sections"]
    assert section["error"] is None
    one, two = section["rows"]
    assert (one["workers"], two["workers"]) == (1, 2) and one["speedup"] == 1.0
    for row in (one, two):
        assert row["batch"] == 8 and row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["comm_share"] < 1
    assert two["speedup"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])


def test_the_flickr8k_data_wait_plan_loads_and_a_missing_shard_set_is_the_section_error(tmp_path):
    plan = bench.load_plan("ray_flickr8k")
    assert [e["cfg"].model.architecture for e in plan] == ["mvptr", "semvlp", "simla", "simla", "dual_encoder"]
    assert {e["cfg"].data.shards for e in plan} == {"data/flickr8k"}
    absent = [dict(plan[0], cfg=bench.on_shards(plan[0]["cfg"], tmp_path / "absent"))]
    report = bench.Report("ray", None, {})
    bench.bench_data_wait(report, absent, None, name="data wait, Flickr8k")
    (section,) = report.data["sections"]
    assert section["name"] == "data wait, Flickr8k" and section["rows"] == []
    # prepare()'s own check names the absent split, as for any run.
    assert f"no shards at '{tmp_path / 'absent' / 'train'}'" in section["error"]
