import pytest

from alignlab.platform.experiment import parse_args, restrict_grid

GRID = {"model.mvptr.ablation": ["full", "wo_mcr", "wo_mcr_tag"], "model.simla.psl_k": [1, 2, 4, 8]}


def test_grid_restricts_axes_keeping_their_types():
    args = parse_args("", "mvptr_demo", ["--grid", "model.simla.psl_k=1,4", "--grid",
                                         "model.mvptr.ablation=wo_mcr", "optim.max_steps=5"])
    grid = restrict_grid(GRID, args.grid)
    assert grid == {"model.mvptr.ablation": ["wo_mcr"], "model.simla.psl_k": [1, 4]}
    assert args.overrides == ["optim.max_steps=5"]
    assert GRID["model.simla.psl_k"] == [1, 2, 4, 8]  # the script's grid is left alone


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
