"""MVPTR's Table 4 on the embedded synthetic set: the full model and its four ablations (w/o MCR,
w/o MCR+Tag, w/o WPG, w/o WPG+Phrase), each pre-trained and then evaluated on retrieval with
uni-modal (Uni-RSUM) and ITM re-ranked (RSUM) scores and on the compositional split (the true
caption against its attribute / relation / count / object perturbations, pairwise accuracy by ITM
and by the uni-modal cosine; chance 0.5), over 3 seeds. The table shows each row's paired
difference to ``full`` with a 95% interval, the chance levels, and which of the paper's claims
(``models/mvptr.py``, ``TABLE4_CLAIMS``) the figures support, contradict or cannot resolve.

    python experiments/ablation_mvptr.py                        # local Ray, local MLflow store
    ray job submit --working-dir . -- python experiments/ablation_mvptr.py
    python experiments/ablation_mvptr.py --seeds 1 optim.max_steps=100    # a quick look
    python experiments/ablation_mvptr.py --preset mvptr_flickr8k          # real data
    # the rows with MVPTR's three switches for relations (not the paper's; README, "Relation
    # swaps"), at twice the steps and twice the batch, where relation swaps show in `full`
    # (0.615 and 0.782 on two seeds; 0.93 and 0.95 at 6,400 steps of 32): about 6.5 minutes a
    # trial on 2 CPUs, 67 minutes for two seeds
    python experiments/ablation_mvptr.py --seeds 2 model.mvptr.geometry_bias=true \
        model.mvptr.placed_tags=true model.mvptr.itm_negative_captions=true \
        optim.schedule=constant optim.max_steps=1600 data.batch_size=64

MLflow holds one parent run with a child per (row, seed) and the comparison table and chart as
the parent's artifacts.
"""
import sys

from alignlab.platform.experiment import run_experiment

if __name__ == "__main__":
    run_experiment(__doc__, "mvptr_demo", metrics=["eval/rsum", "eval/uni_rsum", "eval/compo/itm_acc_swap_attribute",
                                                   "eval/compo/itm_acc_swap_relation", "eval/compo/uni_acc_mean"],
                   argv=sys.argv[1:], seeds=3)
