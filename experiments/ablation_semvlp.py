"""SemVLP's ablations on the embedded synthetic set, as two Ray Tune sweeps (SemVLP's spec,
``models/semvlp.py``); each trial pre-trains and then evaluates retrieval by ITM re-ranking (SemVLP
has no contrastive objective, so the uni-modal ranking only shortlists candidates):

* ``L_s`` (Figure 3): where the cross-modal attention starts (``model.semvlp.cross_layer``), with
  two-stream-only pre-training as in §4.3; the paper tried 2, 4, 6, 8, 10 of 12 layers, i.e.
  L/6 ... 5L/6, scaled to the preset's L (1, 2, 3 of the demo's 4), with a line plot;
* ``modes`` (Table 4): the pre-training mode (``model.semvlp.mode``: single-stream only,
  two-stream only, both alternating) at the preset's L_s.

    python experiments/ablation_semvlp.py                              # both sweeps, local Ray + MLflow
    python experiments/ablation_semvlp.py --only modes optim.max_steps=60   # a quick look at Table 4
    python experiments/ablation_semvlp.py --preset semvlp_flickr8k           # real data
    ray job submit --working-dir . -- python experiments/ablation_semvlp.py

MLflow: one parent run per sweep (``<name>-L_s``, ``<name>-modes``), a child run per trial, and the
comparison table (Markdown, CSV), bar chart and, for L_s, the line plot as parent artifacts.
"""
import sys

from alignlab.platform.experiment import run_experiment

if __name__ == "__main__":
    run_experiment(__doc__, "semvlp_demo", metrics=["eval/rsum", "eval/i2t_r1", "eval/t2i_r1"], argv=sys.argv[1:])
