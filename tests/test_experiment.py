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
