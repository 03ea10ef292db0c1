"""The dual-encoder contrastive baseline on the embedded synthetic set, swept over its two image
encoders (a ViT over pixels, a transformer over region features).

    python experiments/sweep_baseline.py                       # local Ray, local MLflow store
    ray job submit --working-dir . -- python experiments/sweep_baseline.py
    python experiments/sweep_baseline.py optim.max_steps=600   # any config override
"""
import sys

from alignlab.platform.experiment import run_experiment

if __name__ == "__main__":
    run_experiment(__doc__, "dual_encoder_demo", metrics=["eval/uni_rsum", "eval/uni_i2t_r1", "eval/uni_t2i_r1"],
                   argv=sys.argv[1:])
