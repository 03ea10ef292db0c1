"""The sweep comparison artifacts with a line plot against a numeric swept key (SIMLA's PSL k)."""
from alignlab.platform import tracking
from alignlab.platform.report import publish_comparison
from alignlab.platform.sweep import SweepResult, TrialResult


def test_line_plot_is_published_beside_the_table(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.create_run(uri, "charts", "sweep")
    trials = [TrialResult({"model.simla.psl_k": k, "seed": s}, {"eval/rsum": 10.0 * k + s})
              for k in (8, 1, 2) for s in (0, 2)]
    result = SweepResult("sweep", parent, uri, trials)
    md = publish_comparison(result, ["model.simla.psl_k"], ["eval/rsum"], "k", str(tmp_path / "out"),
                            line_x="model.simla.psl_k")
    assert "| 1 | 2 | 11.00 ± 1.41 |" in md and "| 8 | 2 | 81.00 ± 1.41 |" in md
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent)}
    assert {"comparison.md", "comparison.csv", "comparison.png", "comparison_line.png"} <= artifacts
    assert (tmp_path / "out" / "comparison_line.png").stat().st_size > 1000


def test_published_table_carries_paired_differences_chance_reference_and_claims(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.create_run(uri, "charts", "sweep")
    key = "model.mvptr.ablation"
    trials = [TrialResult({key: row, "seed": s}, {"eval/rsum": 300.0 + 10 * s - drop * (s + 2),
                                                 "eval/compo/itm_acc_swap_attribute": 0.6 + 0.01 * s})
              for row, drop in (("full", 0), ("wo_mcr", 1)) for s in range(3)]
    md = publish_comparison(
        SweepResult("sweep", parent, uri, trials), [key], ["eval/rsum", "eval/compo/itm_acc_swap_attribute"],
        "Table 4", str(tmp_path / "out"), reference="full",
        chance={"eval/rsum": 16.3, "eval/compo/itm_acc_swap_attribute": 0.5},
        external={"dual_encoder": [{"eval/rsum": 250.0, "eval/compo/itm_acc_swap_attribute": 0.5}]},
        claims=[("MCR helps retrieval", "full", "wo_mcr", "eval/rsum", +1)])
    # wo_mcr drops 2, 3, 4 below full: mean -3 with [-5.48, -0.52], excluding 0.
    assert "| wo_mcr | 3 | 307.00 ± 9.00 | -3.00 [-5.48, -0.52] * | 0.610 ± 0.010 | +0.000 [+0.000, +0.000] |" in md
    assert "| *dual_encoder* (reference) | 1 | 250.00 |  | 0.500 |  |" in md
    assert "| *chance* |  | 16.30 |  | 0.500 |  |" in md
    assert "- **supported**: MCR helps retrieval (full − wo_mcr on eval/rsum: +3 [+0.516, +5.48], n = 3)" in md
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts
    assert (tmp_path / "out" / "comparison.md").read_text() == md
