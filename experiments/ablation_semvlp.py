"""SemVLP's ablations on the embedded synthetic set, as two Ray Tune sweeps; each trial pre-trains
and then evaluates retrieval by ITM re-ranking (SemVLP has no contrastive objective, so the
uni-modal ranking only shortlists candidates):

* Figure 3: where the cross-modal attention starts, L_s (``model.semvlp.cross_layer``), with
  two-stream-only pre-training as in §4.3 ("we pre-train SemVLP with only high-level semantic
  alignment"); the paper tried 2, 4, 6, 8, 10 of 12 layers, i.e. L/6 ... 5L/6, which this script
  scales to the preset's L (1, 2, 3 of the demo's 4). A line plot of the metrics against L_s;
* Table 4: the pre-training mode (``model.semvlp.mode``: single-stream only, two-stream only,
  both alternating) at the preset's L_s, as a table.

    python experiments/ablation_semvlp.py                              # both sweeps, local Ray + MLflow
    python experiments/ablation_semvlp.py --only modes optim.max_steps=60   # a quick look at Table 4
    python experiments/ablation_semvlp.py --preset semvlp_flickr8k           # real data
    ray job submit --working-dir . -- python experiments/ablation_semvlp.py

MLflow: one parent run per sweep (``<name>-L_s``, ``<name>-modes``), a child run per trial, and the
comparison table (Markdown, CSV), bar chart and, for L_s, the line plot as parent artifacts.
"""
import argparse
import sys

from alignlab.platform import config as config_lib
from alignlab.platform.experiment import parse_args, run_experiment

MODES = ["single", "two", "both"]
METRICS = ["eval/rsum", "eval/i2t_r1", "eval/t2i_r1"]


def cross_layers(num_layers: int) -> list[int]:
    """Figure 3's L_s = 2, 4, 6, 8, 10 of 12 layers as fractions k/6 of L, rounded, distinct and
    below L (L_s = L would leave two-stream mode without fusion)."""
    return sorted({min(num_layers - 1, max(1, round(k * num_layers / 6))) for k in range(1, 6)})


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", choices=["L_s", "modes"], default=None, help="run one of the two sweeps")
    known, rest = pre.parse_known_args(sys.argv[1:])
    if known.only is None and any(a.startswith("--grid") for a in rest):
        pre.error("--grid restricts one sweep's axis: name that sweep with --only")
    args = parse_args(__doc__, "semvlp_demo", rest)
    layers = config_lib.load_config(args.preset, args.overrides).model.num_layers
    if known.only in (None, "L_s"):
        run_experiment(
            description=__doc__, default_preset="semvlp_demo",
            grid={"model.semvlp.cross_layer": cross_layers(layers), "model.semvlp.mode": ["two"]},
            group_by=["model.semvlp.cross_layer"], metrics=METRICS,
            title="SemVLP Fig. 3: two-stream retrieval vs L_s",
            argv=rest, name_suffix="-L_s", line_x="model.semvlp.cross_layer")
    if known.only in (None, "modes"):
        run_experiment(
            description=__doc__, default_preset="semvlp_demo",
            grid={"model.semvlp.mode": MODES}, group_by=["model.semvlp.mode"], metrics=METRICS,
            title="SemVLP Table 4: pre-training mode",
            argv=rest, name_suffix="-modes")
