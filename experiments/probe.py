"""A quick in-process screen of a preset change before it gets a full run.

    python experiments/probe.py mvptr_flickr8k_cpu --steps 200 --eval-images 200 \
        model.mvptr.text_pass=single_masked

trains PRESET (with the overrides) for ``--steps`` steps in this process, on the trainer's own
``Runner`` over a ``LocalContext``, and scores it on the first ``--eval-images`` images of the
evaluation split. The training rows are the split prepared once by the same ``Preprocessor`` as
Ray Data (augmentation and masking seeded by ``--seed``), shuffled by ``--seed`` and cut to
``steps x data.batch_size``: two probes with the same seed and batch size train on the same rows
in the same order, so they differ by their overrides only. The schedule is the preset's compressed
to ``--steps`` (``optim.max_steps``), as a shorter run of the preset would have it, whatever
time budget the preset sets (``optim.max_minutes`` is 0 here: probes compare at equal steps).

A probe is not a run: no Ray, no checkpoints, no MLflow, one pass over a sample of the split, and a
gallery smaller than the standard one. The README's "in-process probes" are this script; a change
that a probe favours still needs the full run (``alignlab train PRESET overrides``) before it
goes into a preset. One JSON line (the overrides, training seconds, losses and ``eval/*``) is
printed and appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def training_rows(cfg, inputs, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of ``cfg.data.batch_size`` rows drawn without replacement from the
    prepared training split, in an order fixed by ``seed``."""
    from alignlab.platform import ingest

    parts = list(ingest.local_batches(cfg.data, cfg.objectives, inputs, cfg.data.train_split, 1024, train=True,
                                      seed=seed))
    rows = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
    bs, n = cfg.data.batch_size, len(rows["image_key"])
    if steps * bs > n:
        raise SystemExit(f"--steps {steps} x data.batch_size {bs} = {steps * bs} rows; the training split "
                         f"{cfg.data.train_split!r} of {cfg.data.shards} has {n}: a probe reads each row once")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:steps * bs])
    return [{k: v[order[i:i + bs]] for k, v in rows.items()} for i in range(0, steps * bs, bs)]


def probe(preset: str, overrides: list[str], steps: int, seed: int = 0, eval_images: int = 200,
          threads: int = 1, log_every: int = 50) -> dict:
    from alignlab.platform import ingest, shards
    from alignlab.platform.config import load_config
    from alignlab.platform.train import LocalContext, Runner, prepare

    cfg = load_config(preset, [*overrides, f"optim.max_steps={steps}", "optim.max_minutes=0", f"seed={seed}",
                               f"data.eval_max_images={eval_images}", f"scaling.cpus_per_worker={threads}",
                               "scaling.num_workers=1"])
    info = prepare(cfg)
    inputs = info.spec.input_spec(cfg.model, cfg.objectives)
    batches = training_rows(cfg, inputs, steps, seed)

    def split(name: str, ids: tuple[str, ...] = ()):
        return lambda: ingest.local_eval_batches(cfg.data, cfg.objectives, inputs, name, cfg.data.eval_batch_size,
                                                 id_columns=ids)

    ctx = LocalContext(lambda: batches, split(cfg.data.eval_split), device=torch.device("cpu"),
                       compositional_epoch=split(cfg.data.compositional_split, shards.COMPOSITIONAL_COLUMNS)
                       if cfg.data.compositional_split else lambda: [])
    runner = Runner(cfg, info.spec, info.vocab, ctx, steps_per_epoch=len(batches)).setup()
    runner.model.train()
    start, losses = time.perf_counter(), {}
    while runner.step < steps:
        if runner.train_step() is None:
            continue
        if runner.step % log_every == 0 or runner.step == steps:
            losses = {k: round(v, 4) for k, v in runner.log().items() if k.startswith("loss/")}
            print(f"step {runner.step}/{steps}  {time.perf_counter() - start:.0f} s  {losses}", flush=True)
    train_s = time.perf_counter() - start
    metrics = runner.evaluate()
    # the steps the runner took, not the ones asked for: a short epoch would show here
    return {"preset": preset, "overrides": overrides, "seed": seed, "steps": runner.step,
            "batch_size": cfg.data.batch_size, "threads": threads, "precision": runner.precision,
            "train_s": round(train_s, 1), **losses,
            **{k: round(v, 3) for k, v in metrics.items() if k.startswith("eval/")}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=200, help="the first N images of the evaluation split")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (two probes side by side: 1 each)")
    ap.add_argument("--out", default="probes.jsonl", help="JSON lines file the result is appended to")
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options, as in the docstring
    result = probe(args.preset, args.overrides, args.steps, args.seed, args.eval_images, args.threads)
    line = json.dumps(result)
    print(line, flush=True)
    with Path(args.out).open("a") as f:
        f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
