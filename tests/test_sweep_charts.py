"""The sweep comparison artifacts with a line plot against a numeric swept key (SIMLA's PSL k)."""
from alignlab.platform import tracking
from alignlab.platform.sweep import SweepResult, TrialResult, publish_comparison


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
