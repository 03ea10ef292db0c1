"""SIMLA's ablations on the embedded synthetic set, as two Ray Tune sweeps, each trial pre-training
and then evaluating retrieval (uni-modal, and ITM re-ranked):

* Table 1's rows (``model.simla.row``: a = ITM, b = + ITC, c = + MLM, d = + MIM, e = + PSL), k = 4;
* the number of PSL pseudo-labels ``model.simla.psl_k`` in {1, 2, 4, 8} with every component on
  (the appendix's k; the paper found k = 4 best), with a plot of the metrics against k.

The rows and k are two sweeps rather than one product grid: k means nothing for rows without PSL.

    python experiments/ablation_simla.py                         # both sweeps, local Ray + MLflow
    python experiments/ablation_simla.py --only k optim.max_steps=60   # a quick look at k alone
    python experiments/ablation_simla.py --preset simla_flickr8k       # real data
    ray job submit --working-dir . -- python experiments/ablation_simla.py

MLflow: one parent run per sweep (``<name>-rows``, ``<name>-psl_k``), a child run per trial, and
the comparison table (Markdown, CSV), bar chart and, for k, the line plot as parent artifacts.
"""
import argparse
import sys

from alignlab.platform.experiment import run_experiment

ROWS = ["a", "b", "c", "d", "e"]
PSL_K = [1, 2, 4, 8]
METRICS = ["eval/rsum", "eval/uni_rsum", "eval/i2t_r1", "eval/t2i_r1"]

if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", choices=["rows", "k"], default=None, help="run one of the two sweeps")
    known, rest = pre.parse_known_args(sys.argv[1:])
    if known.only is None and any(a.startswith("--grid") for a in rest):
        pre.error("--grid restricts one sweep's axis: name that sweep with --only")
    if known.only in (None, "rows"):
        run_experiment(
            description=__doc__, default_preset="simla_demo",
            grid={"model.simla.row": ROWS}, group_by=["model.simla.row"], metrics=METRICS,
            title="SIMLA Table 1: components (a ITM, b +ITC, c +MLM, d +MIM, e +PSL)",
            argv=rest, name_suffix="-rows")
    if known.only in (None, "k"):
        run_experiment(
            description=__doc__, default_preset="simla_demo",
            grid={"model.simla.psl_k": PSL_K}, group_by=["model.simla.psl_k"], metrics=METRICS,
            title="SIMLA: retrieval against the number of PSL pseudo-labels k",
            argv=rest, name_suffix="-psl_k", line_x="model.simla.psl_k")
