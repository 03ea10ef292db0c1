import pytest

from alignlab.platform.experiment import parse_args, restrict_grid

GRID = {"model.mvptr.ablation": ["full", "wo_mcr", "wo_mcr_tag"], "model.simla.psl_k": [1, 2, 4, 8]}


def test_grid_restricts_axes_keeping_their_types():
    args = parse_args("", "mvptr_demo", ["table4"], ["--grid", "model.simla.psl_k=1,4", "--grid",
                                                    "model.mvptr.ablation=wo_mcr", "optim.max_steps=5"])
    grid = restrict_grid(GRID, args.grid)
    assert grid == {"model.mvptr.ablation": ["wo_mcr"], "model.simla.psl_k": [1, 4]}
    assert args.overrides == ["optim.max_steps=5"]
    assert GRID["model.simla.psl_k"] == [1, 2, 4, 8]  # the script's grid is left alone
    assert args.only == "table4"  # a single sweep needs no --only


def test_several_sweeps_need_only_to_restrict_a_grid(capsys):
    """SemVLP and SIMLA have two sweeps each: --grid must say which one it restricts."""
    args = parse_args("", "simla_demo", ["rows", "k"], ["--only", "k", "--grid", "model.simla.psl_k=1,4"])
    assert args.only == "k" and args.grid == ["model.simla.psl_k=1,4"]
    with pytest.raises(SystemExit):
        parse_args("", "simla_demo", ["rows", "k"], ["--grid", "model.simla.psl_k=1,4"])
    assert "--only {rows,k}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("", "simla_demo", ["rows", "k"], ["--only", "L_s"])


def test_missing_shards_are_an_error_and_only_the_demo_path_is_generated(tmp_path, monkeypatch):
    """A typo in data.shards or data.train_split names the path and writes nothing; only the
    demo's own default path is ever generated into."""
    from alignlab.platform.config import ConfigError, load_config
    from alignlab.platform.experiment import ensure_synthetic_data

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="does/not/exist"):
        ensure_synthetic_data(load_config("mvptr_demo", ["data.shards=/path/that/does/not/exist"]))
    built = tmp_path / "built"
    (built / "train").mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="trian"):
        ensure_synthetic_data(load_config("mvptr_demo", [f"data.shards={built}", "data.train_split=trian"]))
    (tmp_path / "data" / "synth").mkdir(parents=True)  # the demo path, but something is there already
    with pytest.raises(ConfigError, match="data/synth"):
        ensure_synthetic_data(load_config("mvptr_demo"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["built", "data", "manifest.json", "synth", "train"]


def test_the_demo_set_is_written_again_where_an_older_generator_wrote_it(tmp_path, monkeypatch):
    """`data/synth` from an older generator (its manifest's ``generator``; none: version 1) is
    generated again, the current version's and another producer's sets are left as they are."""
    from alignlab.platform.config import load_config
    from alignlab.platform.experiment import ensure_synthetic_data
    from alignlab.platform.shards import read_manifest, write_manifest
    from alignlab.platform.synth import GENERATOR_VERSION, PRODUCER, SynthConfig, generate

    monkeypatch.chdir(tmp_path)
    small = SynthConfig(n_train_images=8, n_test_images=4, min_concept_count=1)
    generate("data/synth", small)
    ensure_synthetic_data(load_config("mvptr_demo"))  # the current version: kept, however small
    assert read_manifest("data/synth")["splits"]["train"]["images"] == 8
    old = {k: v for k, v in read_manifest("data/synth").items() if k not in ("generator", "producer")}
    write_manifest("data/synth", old, PRODUCER)
    ensure_synthetic_data(load_config("mvptr_demo"))
    manifest = read_manifest("data/synth")
    assert manifest["generator"] == GENERATOR_VERSION and manifest["splits"]["train"]["images"] == 2000
    mine = '{"build": {}, "producer": "alignlab data build"}'  # the user's own set there
    (tmp_path / "data" / "synth" / "manifest.json").write_text(mine)
    ensure_synthetic_data(load_config("mvptr_demo"))
    assert (tmp_path / "data" / "synth" / "manifest.json").read_text() == mine


def test_runs_and_sweeps_on_a_shard_set_rebuilt_otherwise_are_new_ones(tmp_path):
    from alignlab.platform.config import load_config
    from alignlab.platform.sweep import sweep_key
    from alignlab.platform.train import run_key

    cfg = load_config("dual_encoder_demo", [f"data.shards={tmp_path}"])
    bare = (run_key(cfg), sweep_key(cfg, {"seed": [0]}, "demo"))
    keys = []
    for content in ('{"rows_written": 10}', '{"rows_written": 12}', '{"rows_written": 10}'):
        (tmp_path / "manifest.json").write_text(content)
        keys.append((run_key(cfg), sweep_key(cfg, {"seed": [0]}, "demo")))
    assert keys[0] == keys[2] and len({*keys[:2], bare}) == 3
    assert all(r != b for r, b in zip(keys[1], keys[0]))


@pytest.mark.parametrize("choice, says", [
    ("model.simla.row=a", "one of this sweep's axes"),
    ("model.simla.psl_k=3", "[3]; the sweep's values of model.simla.psl_k are [1, 2, 4, 8]"),
    ("model.simla.psl_k=four", "invalid literal"),
    ("model.simla.psl_k", "expected KEY=V1,V2"),
])
def test_bad_grid_choice_names_the_axis_and_its_values(choice, says):
    with pytest.raises(SystemExit) as e:
        restrict_grid(GRID, [choice])
    assert says in str(e.value)


def test_chance_levels_come_from_the_evaluated_gallery():
    """200 images with 2 captions each: a random ranking's R@1 is 0.5% both ways and its RSUM
    15.93 (hand-computed: i2t R@k = 1 - C(398, k) / C(400, k), t2i R@k = k / 200); pairwise
    compositional accuracies have chance 0.5; a metric without a chance level gets none."""
    from alignlab.platform.experiment import chance_levels
    from alignlab.platform.sweep import SweepResult, TrialResult

    trial = TrialResult(overrides={}, metrics={"eval/eval_images": 200.0, "eval/eval_captions": 400.0})
    failed = TrialResult(overrides={}, metrics={}, error="boom")
    out = chance_levels(SweepResult("s", "p", "u", [failed, trial]),
                        ["eval/rsum", "eval/uni_t2i_r1", "eval/i2t_r5", "eval/compo/itm_acc_swap_attribute", "lr"])
    from math import comb

    by_hand = sum(100 * (1 - comb(398, k) / comb(400, k)) for k in (1, 5, 10)) + sum(100 * k / 200 for k in (1, 5, 10))
    assert out["eval/rsum"] == pytest.approx(by_hand) and round(by_hand, 2) == 15.93
    assert out["eval/uni_t2i_r1"] == pytest.approx(0.5)
    assert out["eval/i2t_r5"] == pytest.approx(100 * (1 - comb(398, 5) / comb(400, 5)))
    assert out["eval/compo/itm_acc_swap_attribute"] == 0.5 and "lr" not in out


def test_reference_row_trains_the_reference_preset_on_the_experiments_data(monkeypatch):
    """--reference runs the frozen-feature preset as its own sweep, on the experiment's shards,
    splits and gallery size, over the same seeds, and returns its runs as an external row."""
    from types import SimpleNamespace

    from alignlab.platform import config as C
    from alignlab.platform import experiment, sweep

    calls = []

    def fake_sweep(cfg, grid, name):
        calls.append((cfg, grid, name))
        return SimpleNamespace(trials=[SimpleNamespace(overrides={"seed": s}, metrics={"eval/rsum": 200.0 + s},
                                                       error="") for s in grid["seed"]])

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    args = parse_args("", "mvptr_flickr8k_cpu", ["table4"], ["--reference"])
    cfg = C.load_config("mvptr_flickr8k_cpu", ["data.shards=/data/f8k", "data.eval_max_images=300",
                                               "tracking.experiment=mine"])
    assert experiment.reference_preset(args, cfg) == experiment.REFERENCE_PRESET
    rows = experiment.reference_rows(cfg, experiment.reference_preset(args, cfg), [0, 1], "t4")
    ((ref_cfg, grid, name),) = calls
    assert (ref_cfg.model.architecture, ref_cfg.model.dual_encoder.frozen_features) == ("dual_encoder", True)
    assert (ref_cfg.data.shards, ref_cfg.data.eval_split, ref_cfg.data.eval_max_images) == ("/data/f8k", "val", 300)
    assert ref_cfg.tracking.experiment == "mine" and grid == {"seed": [0, 1]} and name == "t4-reference"
    assert rows == {"reference: reference_flickr8k": [{"eval/rsum": 200.0}, {"eval/rsum": 201.0}]}


def test_a_preset_names_its_reference_row_and_the_flags_override_it():
    """The demo's reference row (eval.reference: the uni-modal region dual encoder) runs by
    default; --no-reference leaves it out, --reference PRESET replaces it, and it shares the
    experiment's compositional split."""
    from alignlab.platform import config as C
    from alignlab.platform import experiment

    demo = C.load_config("mvptr_demo")

    def chosen(*argv):
        return experiment.reference_preset(parse_args("", "mvptr_demo", ["table4"], list(argv)), demo)

    assert chosen() == chosen("--reference") == "reference_synth"
    assert chosen("--no-reference") == ""
    assert chosen("--reference", "reference_flickr8k") == "reference_flickr8k"
    assert experiment.reference_preset(parse_args("", "mvptr_flickr8k_cpu", ["table4"], []),
                                       C.load_config("mvptr_flickr8k_cpu")) == ""
    ref = C.load_config("reference_synth")
    assert (ref.model.architecture, ref.model.image.kind) == ("dual_encoder", "regions")
    assert "compositional_split" in experiment.SHARED_DATA_KEYS


def test_readings_run_every_row_under_each_reading_and_compare_them(monkeypatch, capsys):
    """--readings paper,official adds the architecture's reading as a grid axis, publishes the usual
    table once per reading (paired differences within it) and one table of the readings, paired
    over rows and seeds."""
    from alignlab.platform import experiment, sweep, tracking
    from alignlab.platform.sweep import SweepResult, TrialResult

    key = "model.simla.reading"
    grids, tables = [], []

    def fake_sweep(cfg, grid, name):
        grids.append(grid)
        trials = [TrialResult({"model.simla.row": row, "seed": seed, key: reading}, {"eval/rsum": 10.0 * seed})
                  for row in grid["model.simla.row"] for seed in grid.get("seed", [0])
                  for reading in grid.get(key, [""])]
        return SweepResult(name, "parent", "sqlite:///unused.db", trials)

    def fake_publish(result, group_by, metrics, title, out_dir, *args, **kw):
        tables.append((group_by, {t.overrides[key] for t in result.trials}, kw.get("reference"), kw["artifact_path"]))
        return ""

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(sweep, "publish_comparison", fake_publish)
    monkeypatch.setattr(experiment, "ensure_synthetic_data", lambda cfg: None)
    monkeypatch.setattr(tracking, "runs_page", lambda uri, run_id: f"{uri}#{run_id}")
    experiment.run_experiment("", "simla_demo", ["eval/rsum"], argv=["--only", "rows", "--grid", "model.simla.row=c,e",
                                                                      "--seeds", "2", "--readings", "paper,official"])
    assert grids == [{"model.simla.row": ["c", "e"], "seed": [0, 1], key: ["paper", "official"]}]
    assert tables == [(["model.simla.row"], {"paper"}, None, "paper"), (["model.simla.row"], {"official"}, None, "official"),
                      ([key], {"paper", "official"}, "paper", "readings")]
    assert "fewer than this script's default" not in capsys.readouterr().out
    experiment.run_experiment("", "simla_demo", ["eval/rsum"], argv=["--only", "rows", "--seeds", "1"], seeds=3)
    assert "1 seed(s) per row, fewer than this script's default of 3 (--seeds 1): no difference between rows " \
           "can be told from seed noise" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="model.semvlp has no 'reading' switch"):
        experiment.run_experiment("", "semvlp_demo", ["eval/rsum"], argv=["--readings", "paper,official"])


@pytest.mark.parametrize("joined", [False, True])
def test_the_driver_leaves_a_cluster_it_started_before_the_last_table_and_never_one_it_joined(monkeypatch, joined):
    """Ray prints late warnings until the driver leaves its cluster, so the driver leaves it before
    the last table (which stays the last lines); a cluster the process had joined before (a
    notebook's, a test session's) stays up."""
    import ray

    from alignlab.platform import experiment, sweep, tracking, train
    from alignlab.platform.sweep import SweepResult, TrialResult

    events = []
    monkeypatch.setattr(ray, "is_initialized", lambda: joined)
    monkeypatch.setattr(train, "init_ray", lambda cfg, quiet=False: None)
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, grid, name: SweepResult(
        name, "parent", "sqlite:///unused.db", [TrialResult({"model.mvptr.ablation": "full"}, {"eval/rsum": 1.0})]))
    monkeypatch.setattr(sweep, "publish_comparison", lambda *a, **kw: events.append("table") or "")
    monkeypatch.setattr(tracking, "runs_page", lambda uri, run_id: "")
    monkeypatch.setattr(experiment, "ensure_synthetic_data", lambda cfg: None)
    experiment.run_experiment("", "mvptr_demo", ["eval/rsum"], argv=["--grid", "model.mvptr.ablation=full"])
    assert events == (["table"] if joined else ["shutdown", "table"])


@pytest.mark.parametrize("threads,larger", [("4", "experiment"), ("1", "reference")])
def test_one_local_cluster_holds_the_largest_trial_of_the_experiment_and_its_reference(monkeypatch, threads, larger):
    """The reference row's sweep runs first; the cluster it would start for its own trials must
    also hold the experiment's, and the other way round."""
    from alignlab.platform import experiment, sweep, train
    from alignlab.platform.sweep import SweepResult, TrialResult

    sized = []
    monkeypatch.setattr(train, "init_ray", lambda cfg, quiet=False: sized.append(cfg))
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, grid, name: SweepResult(
        name, "parent", "sqlite:///unused.db", [TrialResult({"model.mvptr.ablation": "full"}, {"eval/rsum": 1.0})]))
    monkeypatch.setattr(sweep, "publish_comparison", lambda *a, **kw: "")
    monkeypatch.setattr(experiment, "ensure_synthetic_data", lambda cfg: None)
    monkeypatch.setattr("alignlab.platform.tracking.runs_page", lambda uri, run_id: "")
    experiment.run_experiment("", "mvptr_demo", ["eval/rsum"], argv=[
        "--grid", "model.mvptr.ablation=full", f"scaling.cpus_per_worker={threads}"])
    (cfg,) = sized
    # A trial's slots: its worker's threads, 5 for Tune and the data stages, 2 for the
    # compositional split's; the reference row (reference_synth) takes 2 threads.
    assert (cfg.model.architecture, train.trial_cpus(cfg)) == (("mvptr", 11) if larger == "experiment" else
                                                               ("dual_encoder", 9))


def test_a_sweep_is_its_name_and_a_digest_of_what_its_trials_run():
    """The same sweep keeps its key (so it restores); a changed config value, seed list or
    downstream fine-tuning makes another; what only changes the console does not."""
    from alignlab.platform.config import load_config
    from alignlab.platform.sweep import sweep_key

    base, grid = load_config("dual_encoder_demo"), {"seed": [0]}
    key = sweep_key(base, grid, "demo")
    assert key.startswith("demo-") and key == sweep_key(load_config("dual_encoder_demo"), {"seed": [0]}, "demo")
    assert sweep_key(load_config("dual_encoder_demo", ["tracking.verbose=true"]), grid, "demo") == key
    # How many trials run at once schedules them; each still computes the same.
    assert sweep_key(load_config("dual_encoder_demo", ["scaling.max_concurrent_trials=2"]), grid, "demo") == key
    others = {sweep_key(load_config("dual_encoder_demo", ["optim.lr=0.002"]), grid, "demo"),
              sweep_key(base, {"seed": [0, 1, 2]}, "demo"),
              sweep_key(base, grid, "demo", finetune={"preset": "finetune_demo", "overrides": []})}
    assert len(others) == 3 and key not in others
