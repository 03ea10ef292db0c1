"""SIMLA's ablations on the embedded synthetic set, as two Ray Tune sweeps (SIMLA's spec,
``models/simla.py``), each trial pre-training and then evaluating retrieval (uni-modal, and ITM
re-ranked):

* ``rows``: Table 1's rows (``model.simla.row``: a = ITM, b = + ITC, c = + MLM, d = + MIM,
  e = + PSL), k = 4;
* ``k``: the number of PSL pseudo-labels ``model.simla.psl_k`` in {1, 2, 4, 8} with every
  component on (the appendix's k; the paper found k = 4 best), with a plot of the metrics
  against k.

    python experiments/ablation_simla.py                         # both sweeps, local Ray + MLflow
    python experiments/ablation_simla.py --only k optim.max_steps=60   # a quick look at k alone
    python experiments/ablation_simla.py --preset simla_flickr8k       # real data
    ray job submit --working-dir . -- python experiments/ablation_simla.py

MLflow: one parent run per sweep (``<name>-rows``, ``<name>-k``), a child run per trial, and
the comparison table (Markdown, CSV), bar chart and, for k, the line plot as parent artifacts.
"""
import sys

from alignlab.platform.experiment import run_experiment

if __name__ == "__main__":
    run_experiment(__doc__, "simla_demo", metrics=["eval/rsum", "eval/uni_rsum", "eval/i2t_r1", "eval/t2i_r1"],
                   argv=sys.argv[1:])
