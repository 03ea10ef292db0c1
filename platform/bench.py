"""``alignlab bench``: AlignLab's speed as figures measured side by side in one run, one table per
section, written as JSON. Shared machines are noisy, so each section names what it compares and
its figures are rates or ratios taken in the same run; absolute times are context only.

``--gpu`` (CUDA GPUs; a few minutes, models past a 330 s budget skipped):

* **training**: each model of ``experiments/bench.yaml`` (every architecture at its paper's base
  size) trains on synthetic batches shaped as the data stage shapes real ones
  (:func:`synthetic_batch`), in fp16 autocast with a GradScaler and in bf16 autocast. Each step is
  a training step: forward, backward, gradient clipping and AdamW. Per precision: samples/s per
  GPU, MFU, peak memory, the steps the GradScaler skipped on overflow, and the losses that went
  NaN or Inf. MFU = FLOPs of the forward and backward passes, counted by torch's
  ``FlopCounterMode`` on one pass over step indices 0..n-1, divided by the wall time of a second,
  uninstrumented pass over the same indices (the steps whose work depends on the index, such as
  SemVLP's mode, match), over the GPU's dense fp16/bf16 peak.
* **nccl all-gather**: the all-gather with gradient under the global-batch objectives
  (``models.objectives.gather_with_grad``), one process per GPU over NCCL: gathered values and the
  backward's gradient checked against hand-computed ones, and the bus bandwidth at a few sizes.

``--quick`` (CPU, one thread, no Ray; about a minute on an idle core):

* **objectives**: the batched WPG (``wpg_similarity`` + ``wpg_hinge``), hard-negative sampling
  (``global_hard_negatives``) and PSL pseudo-labels (``psl_targets``) against per-sample Python
  loops computing the same (``*_loop`` below) on the same inputs at batch 256 and the papers'
  shapes, timed in turn; ``same_result`` checks them equal (sampling with the same generator).
* **evaluation**: ``evaluate.rerank`` at N = 1k and 5k images of 5 captions with a cheap match
  function: multi-modal pairs (N·k_c + 5N·k_i), their time, and the uni-modal N x 5N part.
* **rerank states**: each architecture's own ITM re-ranking (demo size, fresh weights, 100
  synthetic images) from the uni-modal states it encodes once per item, against the same model
  encoding every re-scored pair anew; both must rank alike. SemVLP fuses from the input, so it
  has nothing to cache and its ratio is about 1.
* **step shares**: the demo-size training step of each architecture split into forward, backward
  and optimiser, and the cost of an objective as the step-time difference between a variant
  without it (the configs' own ablation switches, listed in ``bench.yaml``) and its reference.
* **optimizer**: the trainer's AdamW step (torch's fused kernel on the CPU) against the per-tensor
  loop it replaced, over each architecture's demo-size parameters with the same gradients;
  ``same_result`` checks both reach the same weights.
* **scaling**: the first architecture's ``Runner`` step under DDP over gloo with 1 and 2 CPU
  workers (spawned processes, one thread each) at the preset's global batch: samples/s, the
  speedup, and the communication share (the step's time under ``no_sync``, which skips the
  gradient all-reduce, against the step as trained).

``--ray`` (a local Ray cluster started in this process, on the synthetic set generated into a
temporary folder and on it 10 times over, its training files hard-linked; each architecture of
``bench.yaml``'s ``ray`` plan at demo size; ``--sections`` picks a subset; 5-10 minutes on 2
cores). CPU time and memory are read from ``/proc`` for this process and every process it started
(:class:`ProcessTree`: the driver, Ray's daemons and its workers):

* **ingest**: training rows through read, decode, augment, tokenize and mask on the Ray Data
  pipeline (``ingest.build_dataset``, iterated on the driver) against this process running the
  same ``Preprocessor`` on the same split (``ingest.local_batches``), in turn, each from a cold
  start: rows per wall second and per CPU second, start-up included, and the CPU seconds by
  process (driver, Preprocessor workers, other workers, daemons); ``per_core`` is Ray's rows per
  CPU second over the loop's (the target is >= 0.8) and ``overhead`` the share of Ray's CPU time
  outside its Preprocessor workers.
* **epochs**: a few small epochs read as a Ray Train worker reads its shard (``streaming_split``
  and ``train.shard_batches``), no model, as one execution of a stream of passes (the trainer's)
  and, in turn, as a new execution per epoch (before it): the first batch's wait, the wait from
  an epoch's last batch to the next one's first, and the steady gap between batches.
* **memory**: peak RSS of the driver, the workers together, the largest worker and Ray's daemons
  while one epoch of the first architecture streams through the same iteration, on 1x and 10x
  the synthetic set; streaming keeps the 10x row within 10% of the 1x one.
* **data wait**: each architecture's ``Runner`` (one CPU worker) fed by that iteration through a
  ``LocalContext``: the trainer's own ``time/data_wait_fraction`` and samples/s over steps inside
  the first epoch, after a warm-up; then four alternating blocks of a quarter as many steps, fed
  by the stream and by its batches replayed from memory, whose mean step times give
  ``stream_cost``, what the data stage working beside the step costs it.
  ``data_wait_flickr8k`` (opt-in, ``--sections``): the same
  for each architecture's Flickr8k CPU preset on its own shards (``bench.yaml``'s
  ``ray_flickr8k`` plan; ``data/flickr8k``, built from ``../shared/data``).
* **leftover**: the first architecture's training pipeline stopped after a few batches (the
  iterator kept, as a trainer keeps it through its final evaluation), as one pass and as a
  stream of passes: the CPU seconds its Preprocessor workers still spend until they idle, how
  long that takes, and the rows the stream had left.
* **pacing**: the first architecture's training stream read by a consumer slower than it,
  without and with the floor under Ray Data's scheduling loop (``loop_pacing``): the CPU the
  split coordinator spends while the stream waits, and the reader's wall time.

The JSON: ``{"bench": "gpu" | "quick" | "ray", "environment": {python, torch, cuda, gpu, gpu_count, driver,
peak_tflops, ...}, "sections": [{"name", "compares", "seconds", "error", "rows": [...]}]}``.
A row that failed holds an ``error``; the command then exits non-zero, after writing everything
it measured. The JSON is rewritten after every row, so a run stopped by a timeout keeps its
figures.

``--gpu`` imports nothing of Ray or MLflow, so it runs where only torch, timm, numpy, pyyaml and
pyarrow are installed (``experiments/gpu_check.sh``).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import itertools
import json
import math
import os
import platform as host
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import yaml

from alignlab.models.base import CONCEPT_MASK, CONCEPT_OFFSET, CONCEPT_PAD, IGNORE, InputSpec, PretrainingModel, Vocab
from alignlab.platform import config as config_lib
from alignlab.platform.config import Config
from alignlab.platform.ingest import image_key
from alignlab.platform.masking import bert_mask, block_mask, chain_mask, object_mask, random_phrase_mask

PLAN_FILE = config_lib.PRESET_DIR.parent / "bench.yaml"

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name, first match wins.
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))

GPU_PRECISIONS = ("fp16", "bf16")
GPU_STEPS = 20  # counted, then timed, step indices
GPU_BUDGET_S = 330.0  # models still untried after this are skipped, so the run ends well inside 7 min
NCCL_SIZES_MIB = (1, 16, 128)
NCCL_TIMEOUT_S = 90
# SIMLA's α ramp reads the epoch length; any value far beyond the steps run keeps α near its start.
STEPS_PER_EPOCH = 1000


class BenchError(RuntimeError):
    """A bench that cannot run here (no GPU, a malformed plan); the message says why."""


# --------------------------------------------------------------------------------------------
# Output: one printer and one JSON writer for every section
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned columns (the union of their keys, in first-seen order); nested figures
    (dicts, such as the last losses) are left to the JSON."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k, v in r.items() if k not in columns and not isinstance(v, dict)]
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


class Report:
    """Sections of figures, printed as each ends and written to ``out`` as JSON after every change."""

    def __init__(self, bench: str, out: str | Path | None, environment: dict[str, Any]):
        self.out = Path(out) if out else None
        self.data: dict[str, Any] = {"bench": bench, "environment": environment, "sections": []}

    @contextlib.contextmanager
    def section(self, name: str, compares: str) -> Iterator[list[dict[str, Any]]]:
        """Yields the section's row list; the caller appends rows (calling :meth:`write` to save
        them as they come). An exception ends the section as its ``error``, not the run."""
        sec: dict[str, Any] = {"name": name, "compares": compares, "seconds": None, "error": None, "rows": []}
        self.data["sections"].append(sec)
        start = time.perf_counter()
        try:
            yield sec["rows"]
        except Exception as e:  # one broken section must not cost the others' figures
            traceback.print_exc()
            sec["error"] = f"{type(e).__name__}: {e}"
        finally:
            sec["seconds"] = round(time.perf_counter() - start, 3)
            self.print_section(sec)
            self.write()

    @staticmethod
    def print_section(sec: dict[str, Any]) -> None:
        print(f"\n== {sec['name']} ({sec['seconds']:.1f} s): {sec['compares']}")
        if sec["rows"]:
            print(format_table(sec["rows"]))
        if sec["error"]:
            print(f"ERROR: {sec['error']}")
        sys.stdout.flush()

    def write(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(self.out.suffix + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            tmp.replace(self.out)

    def failed(self) -> bool:
        return any(s["error"] or any("error" in r for r in s["rows"]) for s in self.data["sections"])


def environment() -> dict[str, Any]:
    from alignlab.platform.train import cpu_has_native_bf16

    env: dict[str, Any] = {"python": host.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "cpu_native_bf16": cpu_has_native_bf16(), "gpu": None, "gpu_count": 0, "driver": None}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), driver=_driver_version())
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if gpu_name and key in gpu_name:
            return tflops
    return None


# --------------------------------------------------------------------------------------------
# Synthetic batches, shaped as the data stage shapes real ones
# --------------------------------------------------------------------------------------------


def synthetic_vocab(size: int = 30522, tags: int = 1600, concepts: int = 5000, answers: int = 0,
                    seed: int = 0) -> Vocab:
    """A :class:`Vocab` of BERT-base-uncased's size and special ids (the papers' tokenizer), a tag
    vocabulary of Visual Genome's 1600 object classes, and phrase concepts of 1 to 3 random word
    ids each (MVPTR's [obj], [attr, obj], [subj, rel, obj])."""
    rng = np.random.default_rng(seed)
    first_word = Vocab(size).mask_id + 1
    return Vocab(size=size, tags=tuple(f"tag{i}" for i in range(tags)),
                 concepts=tuple(tuple(int(t) for t in rng.integers(first_word, size, rng.integers(1, 4)))
                                for _ in range(concepts)),
                 answers=tuple(f"answer{i}" for i in range(answers)))


def synthetic_batch(spec: InputSpec, cfg: Config, vocab: Vocab, n: int, seed: int = 0,
                    captions_per_image: int = 5) -> dict[str, torch.Tensor]:
    """A training batch of ``n`` rows with every key, dtype and shape that
    :class:`~alignlab.platform.ingest.Preprocessor` yields for ``spec`` under ``cfg.data`` and
    ``cfg.objectives``, with random content: captions of random length, ``captions_per_image``
    rows per image (as COCO and Flickr, so hard negatives must skip the other captions of an
    image), between half and all of ``max_regions`` regions per image with one tag per region,
    phrase concepts whose words occur in the caption (so chain masking has words to follow), and
    all masking done by the data stage's own functions (``platform/masking.py``)."""
    rng = np.random.default_rng(seed)
    data, objectives = cfg.data, cfg.objectives
    image_of = np.arange(n) // captions_per_image
    n_images = int(image_of[-1]) + 1
    out: dict[str, np.ndarray] = {}

    # Captions: [CLS] words [SEP] [PAD]...; phrase concepts' words written at the front.
    length = data.max_text_len
    lengths = rng.integers(max(3, length // 2), length + 1, n)
    first_word = max(vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) + 1
    ids = rng.integers(first_word, vocab.size, (n, length))
    if spec.phrases:
        phrase_ids = np.full((n, data.max_phrases), CONCEPT_PAD, dtype=np.int64)
        for i in range(n):
            pos, kept = 1, []
            drawn = min(len(vocab.concepts), rng.integers(1, data.max_phrases + 1))
            for c in rng.choice(len(vocab.concepts), drawn, replace=False):
                words = vocab.concepts[c]
                if pos + len(words) < lengths[i] - 1:
                    ids[i, pos:pos + len(words)] = words
                    pos += len(words)
                    kept.append(c + CONCEPT_OFFSET)
            phrase_ids[i, :len(kept)] = kept
        out["phrase_ids"], out["phrase_mask"] = phrase_ids, phrase_ids >= CONCEPT_OFFSET
    attention = np.arange(length)[None] < lengths[:, None]
    ids[:, 0] = vocab.cls_id
    ids[np.arange(n), lengths - 1] = vocab.sep_id
    out["input_ids"] = np.where(attention, ids, vocab.pad_id).astype(np.int64)
    out["attention_mask"] = attention.astype(np.int64)
    if spec.mlm:
        special = np.isin(out["input_ids"], [vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id])
        out["mlm_input_ids"], out["mlm_labels"] = bert_mask(out["input_ids"], ~special & attention,
                                                            objectives.mlm_prob, vocab.mask_id, (0, vocab.size), rng)
        if spec.phrases:
            out["mlm_phrase_ids"] = chain_mask(out["phrase_ids"], [frozenset(c) for c in vocab.concepts],
                                               out["input_ids"], out["mlm_labels"] != IGNORE, CONCEPT_MASK,
                                               CONCEPT_OFFSET)
            if spec.random_phrases:
                out["mlm_phrase_ids"] = random_phrase_mask(out["phrase_ids"], out["mlm_phrase_ids"],
                                                           objectives.mlm_prob, len(vocab.concepts), rng)

    if spec.pixels:
        size = data.image_size
        out["pixels"] = rng.integers(0, 256, (n_images, 3, size, size), dtype=np.uint8)[image_of]
    if spec.regions or spec.tags or spec.objects:
        k, dim = data.max_regions, cfg.model.image.region_dim
        counts = rng.integers(max(1, k // 2), k + 1, n_images)
        region_mask = np.arange(k)[None] < counts[:, None]
        corner = rng.random((n_images, k, 2)) * 0.7
        boxes = np.concatenate([corner, corner + 0.1 + 0.2 * rng.random((n_images, k, 2))], -1) * region_mask[..., None]
        # Pooled detector features are non-negative; the last 6 are the box and its size (shards.py).
        feats = rng.random((n_images, k, dim)) * region_mask[..., None]
        if dim > 6:
            feats[..., -6:] = np.concatenate([boxes, boxes[..., 2:] - boxes[..., :2]], -1)
        region_tags = rng.integers(0, max(1, len(vocab.tags)), (n_images, k))
        region_mask, boxes, feats, region_tags = (a[image_of] for a in (region_mask, boxes, feats, region_tags))
        out.update(region_features=feats.astype(np.float32), region_mask=region_mask, boxes=boxes.astype(np.float32))
        if spec.tags:
            tag_ids = np.full((n, data.max_tags), CONCEPT_PAD, dtype=np.int64)
            t = min(k, data.max_tags)
            tag_ids[:, :t] = np.where(region_mask, region_tags + CONCEPT_OFFSET, CONCEPT_PAD)[:, :t]
            out["tag_ids"], out["tag_mask"] = tag_ids, tag_ids >= CONCEPT_OFFSET
            if spec.tag_words:
                # One word piece per tag, tag class c written as word id first_word + c, masked
                # as the data stage masks tags written as words.
                words = first_word + (tag_ids - CONCEPT_OFFSET) % (vocab.size - first_word)
                out["tag_ids"] = np.where(out["tag_mask"], words, vocab.pad_id)
                if spec.mcr:
                    out["mcr_tag_ids"], out["mcr_labels"] = bert_mask(out["tag_ids"], out["tag_mask"],
                                                                      objectives.mlm_prob, vocab.mask_id,
                                                                      (0, vocab.size), rng)
            elif spec.mcr:
                out["mcr_tag_ids"], labels = bert_mask(tag_ids, out["tag_mask"], objectives.mcr_prob, CONCEPT_MASK,
                                                       (CONCEPT_OFFSET, CONCEPT_OFFSET + len(vocab.tags)), rng)
                out["mcr_labels"] = np.where(labels != IGNORE, labels - CONCEPT_OFFSET, IGNORE)
        if spec.objects:
            selected = object_mask(region_mask, objectives.object_mask_prob, rng)
            out["object_mask"] = selected
            out["masked_region_features"] = np.where(selected[..., None], 0.0, out["region_features"]).astype(np.float32)
            out["object_labels"] = np.where(selected, region_tags, IGNORE).astype(np.int64)
    if spec.mim:
        out["mim_mask"] = block_mask(n, spec.mim_grid, spec.mim_ratio, rng, min_block=spec.mim_min_block)
    if spec.qa and vocab.answers:
        out["answer_labels"] = rng.integers(0, len(vocab.answers), n).astype(np.int64)
    out["image_key"] = np.array([image_key(f"bench-image-{i}") for i in image_of], dtype=np.int64)
    out["caption_key"] = np.array([image_key(f"bench-caption-{i}") for i in range(n)], dtype=np.int64)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Training steps of one model
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingBench:
    """One model's training steps on a synthetic batch, run by the trainer's own
    :class:`~alignlab.platform.train.Runner` on a :class:`~alignlab.platform.train.LocalContext`
    that yields the batch forever: forward and backward under autocast, the GradScaler, gradient
    clipping, AdamW and the schedule, exactly as in training. Every measurement starts a fresh
    runner (same seed: same initial weights)."""

    def __init__(self, cfg: Config, vocab: Vocab, device: torch.device, seed: int = 0):
        from alignlab.models.registry import get_spec

        self.cfg, self.vocab, self.device, self.seed = cfg, vocab, torch.device(device), seed
        self.spec = get_spec(cfg.model.architecture)
        self.inputs = self.spec.input_spec(cfg.model, cfg.objectives)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in synthetic_batch(self.inputs, self.cfg, self.vocab, n, self.seed).items()}

    def runner(self, precision: str, batch: dict[str, torch.Tensor]):
        """A set-up runner training on ``batch`` in ``precision`` on one worker."""
        from alignlab.platform.train import LocalContext, Runner

        cfg = self.cfg
        cfg = replace(cfg, precision=replace(cfg.precision, precision=precision),
                      data=replace(cfg.data, batch_size=len(batch["input_ids"])),
                      scaling=replace(cfg.scaling, num_workers=1))
        ctx = LocalContext(lambda: itertools.repeat(batch), device=self.device)
        return Runner(cfg, self.spec, self.vocab, ctx, STEPS_PER_EPOCH).setup()

    def measure(self, precision: str, batch_size: int, steps: int, peak: float | None = None) -> dict[str, Any]:
        """Steps 0..steps-1 once with their FLOPs counted (also the warm-up), then again timed.
        FlopCounterMode counts matrix products and attention, so the optimiser adds nothing."""
        from torch.utils.flop_counter import FlopCounterMode

        device = self.device
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runner = self.runner(precision, self.batch(batch_size))
        flops, skipped, losses = 0, 0, []

        def run() -> None:
            nonlocal skipped
            scale = runner.scaler.get_scale()
            losses.append(runner.train_step())
            skipped += runner.scaler.get_scale() < scale  # backed off: an overflow or non-finite step

        def restart() -> None:
            # Both passes run the same step indices and draw the same random numbers (masks,
            # sampled negatives), so work that depends on either is the same in both.
            runner.step = 0
            torch.manual_seed(self.seed)

        restart()
        for _ in range(steps):
            with FlopCounterMode(display=False) as counter:
                run()
            flops += counter.get_total_flops()
        restart()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        _sync(device)
        seconds = time.perf_counter() - start
        tflops = flops / seconds / 1e12
        nonfinite = sorted({k.removeprefix("loss/") for step in losses for k, v in step.items()
                            if k.startswith("loss/") and not math.isfinite(v)})
        return {"params_m": sum(p.numel() for p in runner.model.parameters() if p.requires_grad) / 1e6,
                "samples_per_s": batch_size * steps / seconds, "step_ms": 1e3 * seconds / steps,
                "tflop_per_step": flops / steps / 1e12, "tflops": tflops, "mfu": tflops / peak if peak else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                "skipped_steps": skipped, "steps": 2 * steps, "nonfinite_losses": nonfinite,
                "last_losses": {k.removeprefix("loss/"): round(v, 4) for k, v in losses[-1].items()
                                if k.startswith("loss/")}}

    def measure_fitting(self, precision: str, batch_size: int, steps: int, peak: float | None = None
                        ) -> dict[str, Any]:
        """:meth:`measure` at ``batch_size``, halved while it runs out of GPU memory."""
        while True:
            try:
                return {"batch": batch_size, **self.measure(precision, batch_size, steps, peak)}
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
            # Outside the except block, whose traceback held the failed runner; measure frees it.
            batch_size //= 2


def load_plan(kind: str, path: Path = PLAN_FILE) -> list[dict[str, Any]]:
    """The models of ``bench.yaml``'s ``kind`` list, each with its loaded config."""
    with open(path) as f:
        plan = (yaml.safe_load(f) or {}).get(kind)
    if not plan or not plan.get("models"):
        raise BenchError(f"{path}: no '{kind}: models:' list")
    entries = []
    for m in plan["models"]:
        overrides = list(plan.get("common", [])) + list(m.get("overrides", []))
        entries.append({"name": m["name"], "preset": m["preset"], "overrides": overrides,
                        "reference": m.get("reference"), "cfg": config_lib.load_config(m["preset"], overrides)})
    return entries


# --------------------------------------------------------------------------------------------
# NCCL all-gather with gradient
# --------------------------------------------------------------------------------------------


def all_gather_fn() -> tuple[str, Callable]:
    """The functional all-gather that ``gather_with_grad`` calls, and its name."""
    from alignlab.models.objectives import functional_all_gather

    fn = functional_all_gather()
    return fn.__name__, fn


def _wait(x: torch.Tensor) -> torch.Tensor:
    """A functional collective's result, completed (its AsyncCollectiveTensor waited on)."""
    return x.wait() if hasattr(x, "wait") else x


def _gather_worker(rank: int, world: int, port: int, backend: str, sizes_mib: tuple[int, ...], iters: int,
                   result: str) -> None:
    import torch.distributed as dist

    from alignlab.models.objectives import gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    name, fn = all_gather_fn()
    # gather_with_grad leaves a 1-worker group alone, and needs all_gather_single: otherwise the
    # function under it is called directly.
    via = "gather_with_grad" if world > 1 and name == "all_gather_single" else name

    def gather(x: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(x)[0] if via == "gather_with_grad" else fn(x.contiguous(), 0, dist.group.WORLD)

    rows = []
    for mib in sizes_mib:
        cols = 1024
        n = max(1, mib * 2**20 // (4 * cols))
        base = torch.arange(n * cols, dtype=torch.float32, device=device).view(n, cols) % 4096
        x = (base + 4096 * rank).requires_grad_()
        out = gather(x)
        expected = torch.cat([base + 4096 * r for r in range(world)])
        weights = torch.arange(world * n, dtype=torch.float32, device=device)[:, None] % 7 + 1
        (out * weights).sum().backward()
        # The backward reduce-scatters: each rank's rows get the sum of every rank's gradient.
        grad_ok = torch.equal(x.grad, world * weights[rank * n:(rank + 1) * n].expand(n, cols))
        values_ok = torch.equal(out.detach(), expected)
        with torch.no_grad():
            for i in range(3 + iters):
                if i == 3:
                    _sync(device)
                    start = time.perf_counter()
                _wait(gather(x))
            _sync(device)
            seconds = (time.perf_counter() - start) / iters
        algbw = world * x.numel() * 4 / seconds / 1e9  # bytes landed per rank per second
        rows.append({"world": world, "backend": backend, "via": via, "mib_per_rank": round(n * cols * 4 / 2**20, 2),
                     "values_ok": values_ok, "grad_ok": grad_ok, "ms": 1e3 * seconds, "algbw_gbs": algbw,
                     # nccl-tests' convention: (world - 1) / world of the output crosses links
                     "busbw_gbs": algbw * (world - 1) / world})
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(target: Callable, world: int, args: tuple, timeout_s: float, what: str) -> Any:
    """Runs ``target(rank, world, port, *args, result_path)`` in ``world`` spawned processes
    (a loopback rendezvous on ``port``) and returns the JSON rank 0 wrote to ``result_path``. A
    rank still running after ``timeout_s`` is killed, and a hang or a failed rank is an error
    naming ``what`` and the ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "result.json")
        procs = [ctx.Process(target=target, args=(r, world, port, *args, result)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"{what} ranks {hung} still running after {timeout_s:.0f} s")
        failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode}
        if failed:
            raise RuntimeError(f"{what} ranks exited with codes {failed} (their traceback is above)")
        return json.loads(Path(result).read_text())


def nccl_all_gather(world: int, backend: str = "nccl", sizes_mib: tuple[int, ...] = NCCL_SIZES_MIB, iters: int = 10,
                    timeout_s: float = NCCL_TIMEOUT_S) -> list[dict[str, Any]]:
    """:func:`_gather_worker` on ``world`` ranks (:func:`run_ranks`)."""
    return run_ranks(_gather_worker, world, (backend, tuple(sizes_mib), iters), timeout_s, "all-gather")


# --------------------------------------------------------------------------------------------
# DDP scaling on the CPU (--quick)
# --------------------------------------------------------------------------------------------

SCALING_STEPS = 8  # timed per arm, after one warm-up step
SCALING_TIMEOUT_S = 300


def _scaling_worker(rank: int, world: int, port: int, cfg: Config, steps: int, result: str) -> None:
    """One of ``world`` gloo processes training the trainer's own Runner under DDP on synthetic
    batches (``data.batch_size`` split over the workers, as Ray Train splits it): ``steps``
    rounds of a step as trained and a step under ``no_sync`` (no gradient all-reduce), each
    timed between barriers; the medians (interleaved, so a shared machine's load weighs on both
    alike)."""
    import torch.distributed as dist

    from alignlab.platform.train import LocalContext, Runner

    torch.set_num_threads(1)  # the --quick convention: per-core figures, one core per worker
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))

    class DDPContext(LocalContext):
        def wrap(self, model):
            return torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=model.find_unused_parameters)

        def all_mean(self, values):
            values = values.clone()
            dist.all_reduce(values)
            return values / world

    bench = TrainingBench(cfg, synthetic_vocab(), torch.device("cpu"), seed=rank)  # each rank its own rows
    batch = bench.batch(cfg.data.batch_size // world)
    ctx = DDPContext(lambda: itertools.repeat(batch))
    ctx.rank, ctx.world = rank, world
    runner = Runner(replace(cfg, scaling=replace(cfg.scaling, num_workers=world)), bench.spec, bench.vocab, ctx,
                    STEPS_PER_EPOCH).setup()
    runner.model.train()

    def timed(sync: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        with contextlib.nullcontext() if sync else runner.trained.no_sync():
            runner.train_step()
        dist.barrier()
        return time.perf_counter() - start

    timed(sync=True)
    rounds = [(timed(sync=True), timed(sync=False)) for _ in range(steps)]
    if rank == 0:
        Path(result).write_text(json.dumps({"synced_s": float(np.median([s for s, _ in rounds])),
                                            "unsynced_s": float(np.median([u for _, u in rounds]))}))
    dist.destroy_process_group()


def ddp_step_times(cfg: Config, world: int, steps: int = SCALING_STEPS,
                   timeout_s: float = SCALING_TIMEOUT_S) -> dict[str, float]:
    """:func:`_scaling_worker` on ``world`` ranks (:func:`run_ranks`)."""
    return run_ranks(_scaling_worker, world, (cfg, steps), timeout_s, "DDP")


def bench_scaling(report: Report, plan: list[dict[str, Any]], worlds: tuple[int, ...] = (1, 2),
                  steps: int = SCALING_STEPS) -> None:
    """The first plan entry's training step under DDP over gloo with each of ``worlds`` CPU
    workers (one thread each), at the preset's global batch."""
    entry = plan[0]
    cfg = entry["cfg"]
    compares = (f"{entry['name']}'s Runner step under DDP on gloo, CPU workers of one thread each, global batch "
                f"{cfg.data.batch_size} split over them, medians of {steps} rounds of a step as trained and one "
                f"under no_sync (no gradient all-reduce): samples_per_s (global), speedup = over 1 worker, "
                f"comm_share = 1 - no_sync step / step as trained; the workers share the machine's cores with "
                f"whatever else runs")
    with report.section("scaling", compares) as rows:
        for world in worlds:
            t = ddp_step_times(cfg, world, steps)
            rows.append({"model": entry["name"], "workers": world, "batch": cfg.data.batch_size,
                         "samples_per_s": cfg.data.batch_size / t["synced_s"], "step_ms": 1e3 * t["synced_s"],
                         "unsynced_step_ms": 1e3 * t["unsynced_s"], "comm_share": 1 - t["unsynced_s"] / t["synced_s"]})
            rows[-1]["speedup"] = rows[-1]["samples_per_s"] / rows[0]["samples_per_s"]
            report.write()


# --------------------------------------------------------------------------------------------
# Objectives: batched against a per-sample loop (--quick)
# --------------------------------------------------------------------------------------------
# The loops below compute what the batched objectives in models/objectives.py compute, one sample
# at a time, the way the papers' equations read. They are the reference the batched versions are
# timed against, and tests/test_bench.py checks that both give the same result.


def wpg_similarity_loop(phrases: torch.Tensor, regions: torch.Tensor, phrase_mask: torch.Tensor,
                        region_mask: torch.Tensor) -> torch.Tensor:
    """S_wpg (MVPTR eq. 2) pair by pair: the mean over its phrases of the best cosine over its regions."""
    import torch.nn.functional as F

    out = []
    for c, r, pm, rm in zip(phrases, regions, phrase_mask.bool(), region_mask.bool()):
        c, r = F.normalize(c[pm].float(), dim=-1), F.normalize(r[rm].float(), dim=-1)
        out.append((c @ r.t()).amax(-1).mean() if len(c) else c.new_zeros(()))
    return torch.stack(out)


def wpg_hinge_loop(positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    return torch.stack([(margin + n - p).clamp(min=0) for p, n in zip(positive, negative)]).mean()


def hard_negatives_loop(logits: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor, mode: str = "sample",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row from p ∝ exp(S/τ) over the columns of other images, row by row."""
    idx, valid = [], []
    for row, key in zip(logits, row_ids):
        same = col_ids == key
        ok = not bool(same.all())
        w = row.float().masked_fill(same, float("-inf")).softmax(-1) if ok else torch.ones_like(row, dtype=torch.float)
        idx.append(w.argmax() if mode == "hardest" else torch.multinomial(w, 1, generator=generator)[0])
        valid.append(ok)
    return torch.stack(idx), torch.tensor(valid)


def psl_targets_loop(attn_row: torch.Tensor, token_ids: torch.Tensor, special_mask: torch.Tensor, k: int,
                     vocab_size: int) -> torch.Tensor:
    """SIMLA's pseudo-labels caption by caption: the tokens at its k most attended eligible positions."""
    targets = torch.zeros(token_ids.shape[0], vocab_size)
    for b in range(token_ids.shape[0]):
        eligible = (~special_mask[b]).nonzero().squeeze(1)
        top = eligible[attn_row[b, eligible].float().topk(min(k, len(eligible))).indices]
        targets[b, token_ids[b, top]] = 1.0
    return targets


def objective_inputs(n: int = 256, seed: int = 0) -> dict[str, Any]:
    """Inputs at the papers' shapes for ``n`` captions, 5 per image: MVPTR's multi-modal phrase and
    region states (5 phrases, 50 regions, width 768) of each caption with its image and with a hard
    negative image, the contrastive logits of the batch, and SIMLA's [CLS] attention rows over
    30 tokens with BERT's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    phrases, regions, length, vocab = 5, 50, 30, 30522

    def counts(lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi + 1, (n, 1), generator=g)

    keys = torch.arange(n) // 5
    specials = torch.arange(length)[None] >= counts(8, length)  # padding after each caption
    specials[:, 0] = True  # [CLS]
    return {
        "wpg": dict(phrases=[torch.randn(n, phrases, 768, generator=g) for _ in range(2)],
                    regions=[torch.randn(n, regions, 768, generator=g) for _ in range(2)],
                    phrase_mask=torch.arange(phrases)[None] < counts(0, phrases),
                    region_mask=[torch.arange(regions)[None] < counts(10, regions) for _ in range(2)]),
        "negatives": dict(logits=torch.randn(n, n, generator=g) / 0.07, row_ids=keys, col_ids=keys),
        "psl": dict(attn_row=torch.rand(n, length, generator=g).softmax(-1),
                    token_ids=torch.randint(999, vocab, (n, length), generator=g), special_mask=specials,
                    k=4, vocab_size=vocab),
    }


def objective_pairs(inputs: dict[str, Any]) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(name, batched, loop) per objective on ``inputs``; each returns what is compared."""
    from alignlab.models.objectives import global_hard_negatives, psl_targets, wpg_hinge, wpg_similarity

    w, h, p = inputs["wpg"], inputs["negatives"], inputs["psl"]

    def wpg(similarity, hinge):
        s = [similarity(w["phrases"][i], w["regions"][i], w["phrase_mask"], w["region_mask"][i]) for i in (0, 1)]
        return torch.stack(s), hinge(s[0], s[1], 0.2)

    def negatives(fn):
        return fn(h["logits"], h["row_ids"], h["col_ids"], "sample", torch.Generator().manual_seed(0))

    return [("wpg_similarity + wpg_hinge", lambda: wpg(wpg_similarity, wpg_hinge),
             lambda: wpg(wpg_similarity_loop, wpg_hinge_loop)),
            ("global_hard_negatives (sample)", lambda: negatives(global_hard_negatives),
             lambda: negatives(hard_negatives_loop)),
            ("psl_targets", lambda: psl_targets(**p), lambda: psl_targets_loop(**p))]


def same_result(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_result(x, y) for x, y in zip(a, b))
    if a.dtype.is_floating_point:
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return torch.equal(a, b)


def interleaved_ms(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median milliseconds of each function, timed in turn ``repeats`` times, so load on a shared
    machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(1e3 * (time.perf_counter() - start))
    return [float(np.median(t)) for t in times]


def bench_objectives(report: Report, n: int = 256, repeats: int = 7) -> None:
    with report.section("objectives", f"batched objective vs a per-sample Python loop on the same inputs, batch {n} "
                                      f"(median of {repeats}, interleaved); target speedup >= 10") as rows:
        for name, batched, loop in objective_pairs(objective_inputs(n)):
            batched_ms, loop_ms = interleaved_ms([batched, loop], repeats)
            rows.append({"objective": name, "loop_ms": loop_ms, "batched_ms": batched_ms,
                         "speedup": loop_ms / batched_ms, "same_result": same_result(batched(), loop())})
            report.write()


@contextlib.contextmanager
def phase_clock(runner, seconds: dict[str, float]) -> Iterator[None]:
    """Adds each step's forward (the model's call) and optimiser (``optimizer.step``) wall time to
    ``seconds``, through hooks: the runner's code stays as it is. On the CPU only (no device
    synchronisation)."""
    marks: dict[str, float] = {}

    def mark(name: str, end: str | None = None):
        def hook(*_):
            marks[name] = time.perf_counter()
            if end:
                seconds[end] = seconds.get(end, 0.0) + marks[name] - marks[f"{end}_start"]
        return hook

    handles = [runner.model.register_forward_pre_hook(mark("forward_start")),
               runner.model.register_forward_hook(mark("forward_end", "forward")),
               runner.optimizer.register_step_pre_hook(mark("optimizer_start")),
               runner.optimizer.register_step_post_hook(mark("optimizer_end", "optimizer"))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def bench_step_shares(report: Report, plan: list[dict[str, Any]], repeats: int = 5) -> None:
    """Each plan entry's CPU training step at its preset's batch and threads (the runner's own
    step), the entries' steps interleaved round by round after one warm-up round; medians."""
    compares = ("CPU training step per variant (median of interleaved steps): forward, the optimiser step, and "
                "backward_ms = the rest (loss sum, backward, clipping); removed_share = (reference step - this step) "
                "/ reference step, the share of the reference's step that the objective(s) this variant lacks cost")
    with report.section("step shares", compares) as rows:
        vocab, cpu = synthetic_vocab(), torch.device("cpu")
        runs = []
        for entry in plan:
            tb = TrainingBench(entry["cfg"], vocab, cpu)
            runs.append((entry, tb.runner("fp32", tb.batch(entry["cfg"].data.batch_size)), []))
        for r in range(repeats + 1):
            for entry, runner, times in runs:
                seconds: dict[str, float] = {}
                with phase_clock(runner, seconds):
                    start = time.perf_counter()
                    runner.train_step()
                    seconds["step"] = time.perf_counter() - start
                if r:
                    times.append(seconds)
        step_ms = {}
        for entry, runner, times in runs:
            ms = {k: 1e3 * float(np.median([t[k] for t in times])) for k in ("step", "forward", "optimizer")}
            step_ms[entry["name"]] = ms["step"]
            ref = entry["reference"]
            rows.append({"model": entry["name"], "batch": runner.cfg.data.batch_size, "threads": torch.get_num_threads(),
                         "step_ms": ms["step"], "forward_ms": ms["forward"],
                         "backward_ms": ms["step"] - ms["forward"] - ms["optimizer"], "optimizer_ms": ms["optimizer"],
                         "reference": ref, "removed_share": 1 - ms["step"] / step_ms[ref] if ref else None})


def bench_optimizer(report: Report, plan: list[dict[str, Any]], steps: int = 3, repeats: int = 7) -> None:
    """The trainer's AdamW (:func:`~alignlab.platform.train.adamw`: torch's fused kernel on the
    CPU) against torch's per-tensor loop over the same parameters, each architecture of the plan
    at its demo size (variants left out: they share their reference's parameters). Two copies of
    the model get the same seeded gradients; ``same_result``: ``steps`` updates of each reach the
    same weights; then the steps are timed in turn."""
    from alignlab.platform.train import adamw, param_groups

    compares = ("AdamW step over each model's trainable parameters: torch's per-tensor loop (what the trainer ran "
                "before) against the trainer's fused kernel, the same gradients (median of interleaved steps)")
    with report.section("optimizer", compares) as rows:
        vocab, cpu = synthetic_vocab(), torch.device("cpu")
        for entry in plan:
            if entry["reference"]:
                continue
            cfg = entry["cfg"]
            tb = TrainingBench(cfg, vocab, cpu)
            models = [tb.runner("fp32", tb.batch(2)).model for _ in range(2)]
            gen = torch.Generator().manual_seed(0)
            for p, q in zip(*(m.parameters() for m in models)):
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
                    q.grad = p.grad.clone()
            loop = torch.optim.AdamW(param_groups(models[0], cfg.optim.weight_decay), lr=cfg.optim.lr,
                                     betas=cfg.optim.betas, eps=cfg.optim.eps, foreach=False)
            fused = adamw(models[1], cfg.optim, cpu)
            for _ in range(steps):
                loop.step(), fused.step()
            same = same_result([p.detach() for p in models[0].parameters()],
                               [p.detach() for p in models[1].parameters()])
            loop_ms, fused_ms = interleaved_ms([loop.step, fused.step], repeats)
            trainable = sum(p.numel() for p in models[0].parameters() if p.requires_grad)
            rows.append({"model": entry["name"], "trainable_params": trainable, "loop_ms": loop_ms,
                         "fused_ms": fused_ms, "speedup": loop_ms / fused_ms, "same_result": same})
            report.write()


# --------------------------------------------------------------------------------------------
# Evaluation growth (--quick)
# --------------------------------------------------------------------------------------------


def bench_rerank(report: Report, sizes: tuple[int, ...] = (1000, 5000), captions_per_image: int = 5,
                 k_captions: int = 128, k_images: int = 64, dim: int = 64, repeats: int = 3) -> None:
    """``evaluate.rerank`` with a cheap match function (a dot product of small embeddings), so its
    time is the re-ranking's own: ``match_s`` the multi-modal pairs, N·k_c + 5N·k_i of them
    (linear in N), ``unimodal_s`` the N x 5N similarities and their top-k (quadratic in N, but
    cheap per entry)."""
    from alignlab.platform.evaluate import rerank

    compares = (f"re-ranked retrieval at N images x {captions_per_image} captions, k_c={k_captions}, k_i={k_images}, "
                f"cheap match: pairs must be N*k_c + {captions_per_image}N*k_i (linear in N), the similarities "
                f"and top-k N^2 (median of {repeats}, sizes in turn); the last row is the ratio of the largest N to "
                f"the smallest")
    with report.section("evaluation", compares) as rows:
        timings: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
        pairs_of: dict[int, int] = {}
        for _ in range(repeats):  # the sizes in turn, so load on a shared machine falls on both
            for n in sizes:
                g = torch.Generator().manual_seed(n)
                img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
                txt = torch.nn.functional.normalize(torch.randn(captions_per_image * n, dim, generator=g), dim=-1)
                match_s = 0.0

                def match(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    nonlocal match_s
                    start = time.perf_counter()
                    score = (img[i] * txt[t]).sum(-1)
                    match_s += time.perf_counter() - start
                    return score

                start = time.perf_counter()
                _, _, pairs_of[n] = rerank(img @ txt.t(), k_captions, k_images, match)
                timings[n].append((match_s, time.perf_counter() - start))
        for n in sizes:
            match_s, total_s = (float(np.median(x)) for x in zip(*timings[n]))
            rows.append({"images": n, "captions": captions_per_image * n, "pairs": pairs_of[n],
                         "pairs_expected": n * k_captions + captions_per_image * n * k_images,
                         "match_s": match_s, "unimodal_s": total_s - match_s, "total_s": total_s})
        first, last = rows[0], rows[-1]
        rows.append({"images": f"{last['images']}/{first['images']}", "pairs": last["pairs"] / first["pairs"],
                     "pairs_expected": last["pairs_expected"] / first["pairs_expected"],
                     **{k: last[k] / first[k] for k in ("match_s", "unimodal_s", "total_s")}})


class PairByPair(PretrainingModel):
    """``model`` re-encoding both sides of every re-scored pair: the base class's default
    ``match_*_states`` keep the inputs, so ``match_from_states`` is ``model.match_scores`` of
    each pair's raw inputs (how re-ranking ran before the models cached their uni-modal states)."""

    def __init__(self, model: PretrainingModel):
        super().__init__()
        self.model = model

    def embed_images(self, batch):
        return self.model.embed_images(batch)

    def embed_texts(self, batch):
        return self.model.embed_texts(batch)

    def match_scores(self, images, texts):
        return self.model.match_scores(images, texts)


def bench_rerank_states(report: Report, plan: list[dict[str, Any]], images: int = 100, captions_per_image: int = 5,
                        k_captions: int = 16, k_images: int = 8, repeats: int = 3) -> None:
    """ITM re-ranked retrieval (``evaluate_retrieval``) of each architecture with an ITM head, at
    its plan size with fresh weights, on one synthetic gallery: from the states it encodes once
    per image and caption, against :class:`PairByPair` encoding every pair anew. The plan's
    variants (entries with a ``reference``) share their reference's retrieval and are skipped."""
    from alignlab.models.registry import get_spec
    from alignlab.platform.evaluate import evaluate_retrieval

    compares = (f"ITM re-ranked retrieval, {images} images x {captions_per_image} captions, k_c={k_captions}, "
                f"k_i={k_images}: uni-modal states encoded once per item vs every re-scored pair encoded anew "
                f"(median of {repeats}, interleaved); speedup = per_pair_s / states_s, same_rsum: both rank alike")
    with report.section("rerank states", compares) as rows:
        vocab, cpu = synthetic_vocab(), torch.device("cpu")
        for entry in plan:
            cfg = entry["cfg"]
            spec = get_spec(cfg.model.architecture)
            if entry["reference"] or spec.model.match_scores is PretrainingModel.match_scores:
                continue
            torch.manual_seed(0)
            model = spec.build(cfg.model, cfg.objectives, vocab)
            batch = synthetic_batch(spec.input_spec(cfg.model, cfg.objectives), cfg, vocab,
                                    images * captions_per_image, captions_per_image=captions_per_image)
            results: dict[str, dict[str, float]] = {}

            def evaluate(name: str, m: PretrainingModel) -> None:
                results[name] = evaluate_retrieval(m, [batch], cpu, max_images=images, k_captions=k_captions,
                                                   k_images=k_images, batch_size=cfg.data.eval_batch_size)

            states_ms, pair_ms = interleaved_ms([lambda: evaluate("states", model),
                                                 lambda: evaluate("per_pair", PairByPair(model))], repeats)
            rows.append({"model": entry["name"], "pairs": results["states"]["itm_pairs"],
                         "per_pair_s": pair_ms / 1e3, "states_s": states_ms / 1e3, "speedup": pair_ms / states_ms,
                         "same_rsum": results["states"]["rsum"] == results["per_pair"]["rsum"]})
            report.write()


# --------------------------------------------------------------------------------------------
# The Ray data path (--ray): ingest, epoch boundaries, memory, data wait
# --------------------------------------------------------------------------------------------

SAMPLE_INTERVAL_S = 0.2
INGEST_ROWS = 20000  # per pipeline, from a cold start
EPOCH_ROWS = 640  # 20 batches of 32 per epoch: the boundary's cost does not grow with the epoch
EPOCHS = 3
MEMORY_SCALE = 10
LEFTOVER_BATCHES = 5  # read before the reader stops
LEFTOVER_QUIET_S, LEFTOVER_MAX_S = 3.0, 120.0  # the data stage counts as stopped after this long idle
# CPU seconds of the Preprocessor workers that count as work: an idle actor's threads still take a
# little (about 0.01 CPU s/s here), and the other workers more (idle ones poll), so only the
# Preprocessor's count, and only past this much since the last count.
LEFTOVER_BUSY_CPU_S = 0.05
WAIT_WARMUP_STEPS, WAIT_STEPS = 5, 20


def _proc_tree(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc/<pid>/stat``'s parent ids."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


class ProcessTree:
    """CPU seconds and resident memory of this process and every process it started, read from
    ``/proc`` (Linux): a local Ray cluster's GCS, raylet and workers are its descendants, and
    Ray's own metrics count neither the raylet's nor the driver's time. A thread samples every
    ``interval`` s (a process that exits between two samples loses at most that much CPU time);
    :meth:`sample` also samples on the spot. RSS counts the object store's shared pages a
    process has touched too."""

    TICK, PAGE = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.root, self.interval = os.getpid(), interval
        self.cpu: dict[int, float] = {}  # the latest CPU seconds of every process seen
        self.kind: dict[int, str] = {}
        self.preprocessing: set[int] = set()  # workers seen running the Preprocessor
        self.peaks: dict[str, float] = {}
        self.lock = threading.Lock()

    def _classify(self, pid: int) -> str:
        """``driver``, ``preprocessing`` (a worker seen running the Preprocessor: Ray titles its
        worker processes "ray::<task or actor>" with setproctitle, "ray::IDLE" between tasks),
        ``worker`` or ``ray_system`` (GCS, raylet, monitors, Ray's agents). Read at every sample:
        a process can start as a launcher and become a worker under the same id."""
        if pid == self.root:
            return "driver"
        if pid in self.preprocessing:
            return "preprocessing"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()[:200]
        except OSError:
            return self.kind.get(pid, "ray_system")
        if cmd.startswith(b"ray::") and b"Preprocessor" in cmd:
            self.preprocessing.add(pid)
            return "preprocessing"
        if (cmd.startswith(b"ray::") and not cmd.split(b"\0")[0].endswith(b"Agent")) or b"default_worker" in cmd:
            return "worker"
        return "ray_system"

    def sample(self) -> None:
        totals: dict[str, float] = {}
        with self.lock:
            for pid in _proc_tree(self.root):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                except OSError:
                    continue
                # utime, stime and rss: fields 14, 15 and 24 of proc(5), counted after the name.
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self.TICK
                rss = int(fields[21]) * self.PAGE
                self.kind[pid] = self._classify(pid)
                kind = "worker" if self.kind[pid] == "preprocessing" else self.kind[pid]  # memory: all workers
                totals[kind] = totals.get(kind, 0.0) + rss
                if kind == "worker":
                    self.peaks["worker_max"] = max(self.peaks.get("worker_max", 0.0), rss)
            for kind, rss in totals.items():
                self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds so far by kind of process (:meth:`_classify`), each process counted under
        its latest kind."""
        self.sample()
        out: dict[str, float] = {}
        with self.lock:
            for pid, cpu in self.cpu.items():
                out[self.kind[pid]] = out.get(self.kind[pid], 0.0) + cpu
        return out

    def cpu_seconds(self) -> float:
        self.sample()
        return sum(self.cpu.values())

    def reset_peaks(self) -> dict[str, float]:
        """Starts the peaks afresh; returns the resident bytes by kind of process now."""
        with self.lock:
            self.peaks = {}
        self.sample()
        return dict(self.peaks)

    def __enter__(self) -> "ProcessTree":
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stream_rate(batches: Callable[[], Iterator[dict[str, torch.Tensor]]], tree: ProcessTree,
                rows: int) -> dict[str, float]:
    """Consumes ``rows`` rows of ``batches()`` from its start: rows per second of wall time and
    per CPU second of every process of the tree, the share of that CPU time spent in processes
    running the Preprocessor (in this process for the local loop: all of it), and the wait for
    the first batch. Only the whole run is comparable: Ray Data hands the preprocessed rows over
    in blocks of up to ``DataContext.target_max_block_size`` (128 MiB, thousands of rows here),
    so after its first batch the driver drains rows prepared meanwhile, faster than any pipeline
    prepares them."""
    t0, cpu0 = time.perf_counter(), tree.cpu_by_kind()
    n, first = 0, None
    for batch in batches():
        n += len(batch["input_ids"])
        if first is None:
            first = time.perf_counter()
        if n >= rows:
            break
    end, cpu1 = time.perf_counter(), tree.cpu_by_kind()
    if n < rows:
        raise BenchError(f"the split ended after {n} of the {rows} rows to time")
    cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    total = sum(cpu.values())
    return {"rows": n, "first_batch_s": first - t0, "rows_per_s": n / (end - t0), "cores": total / (end - t0),
            "rows_per_cpu_s": n / total, "cpu_s": total,
            **{f"{k}_cpu_s": cpu.get(k, 0.0) for k in ("driver", "preprocessing", "worker", "ray_system")}}


@contextlib.contextmanager
def ray_cluster(cfg: Config) -> Iterator[None]:
    """The trainer's own local cluster (:func:`~alignlab.platform.train.init_ray`), started in
    this process and shut down after; the cluster's output stays in its log files. The process
    tree's figures count only a cluster this process started."""
    import ray
    import ray.data

    from alignlab.platform.train import init_ray

    started = not ray.is_initialized()  # a cluster this process already joined (a test's) stays up
    init_ray(cfg, quiet=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        if started:
            settle_streams()
            ray.shutdown()


# The threads of Ray Data's iterators (its make_async_gen) that read blocks with ray.get.
RAY_DATA_ITERATOR_THREADS = ("map_tp_filling_worker", "map_tp_transforming_worker")


def settle_streams(timeout_s: float = 30.0) -> None:
    """Lets closed training streams finish their calls into Ray while the cluster still answers
    them. A closed stream's reading thread can still be waiting on the block it asked for, and
    a stream dropped in a reference cycle closes (and calls Ray) only when the garbage collector
    finds it: after ``ray.shutdown()`` either call ends the process with status 1 ("The core
    worker has already been shutdown"), or hangs it at exit. Threads still alive after
    ``timeout_s`` are left to that."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if t.name.startswith(RAY_DATA_ITERATOR_THREADS):
            t.join(max(0.0, deadline - time.monotonic()))


def on_shards(cfg: Config, root: str | Path, **data: Any) -> Config:
    """``cfg`` reading the shard set at ``root``, with further ``data`` fields replaced."""
    return replace(cfg, data=replace(cfg.data, shards=str(root), **data))


def scaled_shards(root: Path, out: Path, times: int) -> Path:
    """``root``'s shard set with its training split ``times`` over: every training file linked
    ``times`` times under new names (hard links, so no disk), the vocabularies and the other
    splits linked once. Streaming memory depends on the rows' count and size, not on whether
    they repeat."""
    out.mkdir(parents=True, exist_ok=True)
    for item in root.iterdir():
        if item.name == "train":
            (out / "train").mkdir(exist_ok=True)
            for f in sorted(item.glob("*.parquet")):
                for i in range(times):
                    os.link(f, out / "train" / f"{f.stem}-copy{i:03d}{f.suffix}")
        elif not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    return out


def _architectures(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in plan if not e["reference"]]


def _inputs(cfg: Config):
    from alignlab.models.registry import get_spec

    return get_spec(cfg.model.architecture).input_spec(cfg.model, cfg.objectives)


def bench_ingest(report: Report, plan: list[dict[str, Any]], root: Path, tree: ProcessTree,
                 rows: int = INGEST_ROWS) -> None:
    """Per architecture: ``build_dataset``'s training pipeline against ``local_batches`` (the
    same Preprocessor on the same split's rows in this process), in turn, each from a cold start
    (the pipeline's start-up included: every epoch pays it)."""
    from alignlab.platform.ingest import build_dataset, local_batches

    compares = (f"{rows} training rows through read -> decode -> augment -> tokenize -> mask, start-up included: the "
                f"Ray Data pipeline (build_dataset as configured, iter_torch_batches on the driver) vs this process "
                f"running the same Preprocessor (local_batches). cores = CPU seconds of every process of the run "
                f"per wall second; rows_per_cpu_s = rows per such CPU second; *_cpu_s = those CPU seconds by "
                f"process: the driver, the workers that ran the Preprocessor, the other workers (reads, footers, "
                f"the split coordinator), Ray's daemons. ray/local: the ratios; per_core = rows_per_cpu_s's "
                f"(target >= 0.8); overhead = the share of Ray's CPU time outside its Preprocessor workers")
    rates = ("first_batch_s", "rows_per_s", "cores", "rows_per_cpu_s")
    with report.section("ingest", compares) as out:
        for entry in _architectures(plan):
            cfg = on_shards(entry["cfg"], root)
            data, spec, bs = cfg.data, _inputs(cfg), cfg.data.batch_size
            local = stream_rate(lambda: local_batches(data, cfg.objectives, spec, data.train_split, bs, train=True,
                                                      seed=cfg.seed), tree, rows)
            capped = replace(data, max_train_rows=rows + bs)
            ray = stream_rate(lambda: build_dataset(capped, cfg.objectives, spec, data.train_split, train=True,
                                                    seed=cfg.seed).iter_torch_batches(batch_size=bs), tree, rows)
            for name, r in (("local", local), ("ray", ray)):
                out.append({"model": entry["name"], "pipeline": name, **r})
            per_core = ray["rows_per_cpu_s"] / local["rows_per_cpu_s"]
            out.append({"model": entry["name"], "pipeline": "ray/local", **{k: ray[k] / local[k] for k in rates},
                        "per_core": per_core, "overhead": 1 - ray["preprocessing_cpu_s"] / ray["cpu_s"]})
            report.write()


def epoch_times(cfg: Config, epochs: int, one_stream: bool) -> list[list[float]]:
    """The arrival time of every batch of ``epochs`` epochs of the training pipeline, read as a
    Ray Train worker reads its shard (``streaming_split`` and ``shard_batches``), with no training
    step between batches. ``one_stream``: one iteration of a stream of ``epochs`` passes, cut into
    epochs of equal batch counts (where a trainer counting steps crosses them; the shuffle buffer
    mixes the passes' rows near the seam); otherwise a one-pass dataset iterated once per epoch,
    each epoch a new execution (the trainer before the stream)."""
    from alignlab.platform.ingest import build_dataset
    from alignlab.platform.train import shard_batches

    ds = build_dataset(cfg.data, cfg.objectives, _inputs(cfg), cfg.data.train_split, train=True, seed=cfg.seed,
                       passes=epochs if one_stream else 1)
    (shard,) = ds.streaming_split(1, equal=True)
    t0 = time.perf_counter()

    def arrivals() -> list[float]:
        return [time.perf_counter() - t0 for _ in shard_batches(shard, cfg.data, cfg.data.batch_size,
                                                                 torch.device("cpu"))]

    if not one_stream:
        return [arrivals() for _ in range(epochs)]
    times = arrivals()
    per = len(times) // epochs
    return [times[i * per:(i + 1) * per] for i in range(epochs)]


def bench_epochs(report: Report, plan: list[dict[str, Any]], root: Path, rows: int = EPOCH_ROWS,
                 epochs: int = EPOCHS) -> None:
    """Each architecture's training pipeline read for ``epochs`` epochs as one stream of passes
    (``build_dataset(passes=epochs)``, the trainer's) and, in turn, as a one-pass dataset executed
    anew every epoch (the trainer before the stream)."""
    compares = (f"{epochs} epochs of {rows} training rows read as a Ray Train worker reads its shard "
                f"(streaming_split + shard_batches), no model, for each architecture in turn: one execution of a "
                f"stream of {epochs} passes (build_dataset's) vs a new execution per epoch (before it). "
                f"first_batch_s = the first epoch's start-up, boundary_s = last batch of an epoch to the first of "
                f"the next (median; the stream's epochs cut by batch count), max_gap_s = the longest wait between "
                f"two batches after the first, steady_ms = between batches within an epoch (median: the pipeline "
                f"runs ahead of a reader without a model)")
    with report.section("epochs", compares) as out:
        # Untimed: the cluster's first Ray Data execution starts more than any later one does
        # (19.9 s against 10.6 s for the next architecture's first batch), which would weigh on
        # whichever arm came first.
        epoch_times(on_shards(_architectures(plan)[0]["cfg"], root, max_train_rows=rows), 1, one_stream=True)
        for entry in _architectures(plan):
            cfg = on_shards(entry["cfg"], root, max_train_rows=rows)
            for one_stream in (True, False):
                times = epoch_times(cfg, epochs, one_stream)
                flat = [t for epoch in times for t in epoch]
                steady = float(np.median([b - a for t in times for a, b in zip(t[1:], t[2:])]))
                out.append({"model": entry["name"], "execution": "one stream" if one_stream else "per epoch",
                            "batches_per_epoch": [len(t) for t in times], "first_batch_s": times[0][0],
                            "boundary_s": float(np.median([nxt[0] - prev[-1] for prev, nxt in zip(times, times[1:])])),
                            "max_gap_s": max(b - a for a, b in zip(flat, flat[1:])), "steady_ms": 1e3 * steady})
                report.write()


def leftover_after_stop(cfg: Config, passes: int, batches: int, tree: ProcessTree, quiet_s: float = LEFTOVER_QUIET_S,
                        max_s: float = LEFTOVER_MAX_S) -> dict[str, float]:
    """Reads ``batches`` batches of the training pipeline of ``passes`` passes as the trainer does,
    then stops reading and keeps the iterator (the trainer holds it through its final evaluation):
    the CPU seconds the Preprocessor workers spend afterwards, until ``quiet_s`` pass without
    :data:`LEFTOVER_BUSY_CPU_S` more, and when that was (after the stop; at most ``max_s``), with
    the other workers' CPU seconds over that time."""
    from alignlab.platform.ingest import build_dataset
    from alignlab.platform.train import shard_batches

    ds = build_dataset(cfg.data, cfg.objectives, _inputs(cfg), cfg.data.train_split, train=True, seed=cfg.seed,
                       passes=passes)
    (shard,) = ds.streaming_split(1, equal=True)
    reader = iter(shard_batches(shard, cfg.data, cfg.data.batch_size, torch.device("cpu")))
    for _ in range(batches):
        next(reader)

    def data_cpu() -> dict[str, float]:
        cpu = tree.cpu_by_kind()
        return {k: cpu.get(k, 0.0) for k in ("preprocessing", "worker")}

    start, t0 = data_cpu(), time.perf_counter()
    last, busy_until = start, t0
    while time.perf_counter() - t0 < max_s and time.perf_counter() - busy_until < quiet_s:
        time.sleep(SAMPLE_INTERVAL_S)
        now = data_cpu()
        if now["preprocessing"] - last["preprocessing"] > LEFTOVER_BUSY_CPU_S:
            busy_until, last = time.perf_counter(), now
    reader.close()  # its prefetch threads, before the cluster goes (Runner.end_stream)
    del shard, ds
    gc.collect()
    return {"preprocessing_cpu_s": last["preprocessing"] - start["preprocessing"],
            "other_workers_cpu_s": last["worker"] - start["worker"], "busy_s": busy_until - t0}


def bench_leftover(report: Report, plan: list[dict[str, Any]], root: Path, tree: ProcessTree,
                   batches: int = LEFTOVER_BATCHES, passes: int = EPOCHS, quiet_s: float = LEFTOVER_QUIET_S) -> None:
    """The first architecture's training pipeline stopped after ``batches`` batches, as one pass
    (the trainer before the stream) and as a stream of ``passes`` passes, in turn."""
    from alignlab.platform.ingest import count_rows
    from alignlab.platform.shards import child_uri

    entry = _architectures(plan)[0]
    cfg = on_shards(entry["cfg"], root)
    compares = (f"{entry['name']}'s training pipeline read for {batches} batches as the trainer reads it, then no "
                f"more (the iterator kept, as through the final evaluation), as one pass and as a stream of {passes} "
                f"passes: preprocessing_cpu_s = the CPU seconds its Preprocessor workers spend after the stop, "
                f"until {quiet_s:.0f} s pass with less than {LEFTOVER_BUSY_CPU_S} more; busy_s = how long after "
                f"the stop that was; other_workers_cpu_s = the other Ray workers' CPU seconds meanwhile (reads, "
                f"the split coordinator, idle workers' polling); rows_left = the stream's rows not read, the most "
                f"the stage could still prepare")
    with report.section("leftover", compares) as out:
        rows = count_rows(child_uri(str(root), cfg.data.train_split))
        for n in (1, passes):
            read = batches * cfg.data.batch_size
            out.append({"model": entry["name"], "passes": n, "rows_read": read, "rows_left": n * rows - read,
                        **leftover_after_stop(cfg, n, batches, tree, quiet_s)})
            report.write()


PACING_BATCHES, PACING_HOLD_S = 40, 0.25  # a trainer slower than its stream
PACING_LEAD_S = 20.0  # the stream's head start, to run ahead up to its backpressure limits
PACING_PASSES, PACING_STORE_BYTES = 100, 32 * 2**20


def paced_read(cfg: Config, floor: bool, tree: ProcessTree, batches: int = PACING_BATCHES,
               hold_s: float = PACING_HOLD_S, lead_s: float = PACING_LEAD_S) -> dict[str, float]:
    """Reads ``batches`` batches of the training stream as the trainer does, after its first batch
    and a head start of ``lead_s``, holding each for ``hold_s`` (a step the stream keeps ahead of), with the scheduling-loop floor
    (:mod:`~alignlab.platform.loop_pacing`) or without it: wall seconds, and the CPU seconds
    (and cores: per wall second) of the Preprocessor workers and of the other workers, where the
    split coordinator's scheduling loop runs."""
    from alignlab.platform.ingest import build_dataset
    from alignlab.platform.loop_pacing import SchedulingLoopFloor
    from alignlab.platform.train import shard_batches

    # Passes enough that the stream cannot finish within the read, and an object-store budget
    # small enough that it reaches its backpressure limits within the head start, as a training
    # run's stream does after minutes, and then waits on its consumer for hours.
    ds = build_dataset(cfg.data, cfg.objectives, _inputs(cfg), cfg.data.train_split, train=True, seed=cfg.seed,
                       passes=PACING_PASSES)
    from ray.data import ExecutionResources

    ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=PACING_STORE_BYTES)
    if not floor:
        ds.context.custom_execution_callback_classes = [
            c for c in ds.context.custom_execution_callback_classes if c is not SchedulingLoopFloor]
    (shard,) = ds.streaming_split(1, equal=True)
    reader = iter(shard_batches(shard, cfg.data, cfg.data.batch_size, torch.device("cpu")))
    next(reader)  # start-up and the first block aside
    time.sleep(lead_s)
    t0, cpu0 = time.perf_counter(), tree.cpu_by_kind()
    for _ in range(batches):
        time.sleep(hold_s)
        next(reader)
    wall, cpu1 = time.perf_counter() - t0, tree.cpu_by_kind()
    reader.close()
    del shard, ds
    gc.collect()
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in ("preprocessing", "worker")}
    return {"wall_s": wall, "preprocessing_cpu_s": cpu["preprocessing"], "other_workers_cpu_s": cpu["worker"],
            "other_workers_cores": cpu["worker"] / wall}


def bench_pacing(report: Report, plan: list[dict[str, Any]], root: Path, tree: ProcessTree,
                 batches: int = PACING_BATCHES, hold_s: float = PACING_HOLD_S, lead_s: float = PACING_LEAD_S) -> None:
    """The first architecture's training stream read by a slow consumer, without the
    scheduling-loop floor and with it, in turn."""
    from alignlab.platform.loop_pacing import HELD_LOOP_FLOOR_S, LOOP_FLOOR_S

    entry = _architectures(plan)[0]
    cfg = on_shards(entry["cfg"], root)
    compares = (f"{entry['name']}'s training stream read as the trainer reads it, each of {batches} batches "
                f"held {hold_s} s (a step slower than the stream), without and with the floor under Ray Data's "
                f"scheduling loop (loop_pacing: {LOOP_FLOOR_S * 1e3:.0f} ms, {HELD_LOOP_FLOOR_S * 1e3:.0f} ms while "
                f"the reader has output it has not taken): "
                f"other_workers_cores = CPU seconds per wall second of the Ray workers outside the Preprocessor "
                f"(the split coordinator, whose loop spins once the stream is ahead); wall_s should match (the "
                f"floor costs the reader nothing)")
    with report.section("pacing", compares) as out:
        for floor in (False, True):
            out.append({"model": entry["name"], "floor": floor, **paced_read(cfg, floor, tree, batches, hold_s, lead_s)})
            report.write()
        without, with_ = out
        out.append({"model": entry["name"], "floor": "without/with",
                    **{k: without[k] / with_[k] for k in ("wall_s", "other_workers_cores") if with_[k]}})


def bench_memory(report: Report, plan: list[dict[str, Any]], sets: dict[int, Path], tree: ProcessTree) -> None:
    """Peak RSS while one epoch of the first architecture's training split streams through the
    trainer's shard iteration, on each of ``sets`` ({times the base set: its root}, the base
    first)."""
    from alignlab.platform.train import shard_batches

    entry = _architectures(plan)[0]
    scale = max(sets)
    compares = (f"peak resident memory (MiB, sampled every {SAMPLE_INTERVAL_S} s) while one epoch of {entry['name']}'s "
                f"training split streams through build_dataset + streaming_split + shard_batches, on the synthetic "
                f"set and on it x{scale} (its files linked {scale} times): driver (and its growth during the "
                f"epoch), all Ray workers together, the largest worker, Ray's daemons (the object store's pages "
                f"included); streaming should keep the x{scale} row within 10% of x1 (ratio)")
    from alignlab.platform.ingest import build_dataset

    with report.section("memory", compares) as out:
        for times, shards_root in sets.items():
            cfg = on_shards(entry["cfg"], shards_root)
            ds = build_dataset(cfg.data, cfg.objectives, _inputs(cfg), cfg.data.train_split, train=True, seed=cfg.seed)
            (shard,) = ds.streaming_split(1, equal=True)
            gc.collect()
            before = tree.reset_peaks()
            start = time.perf_counter()
            n = sum(len(b["input_ids"]) for b in shard_batches(shard, cfg.data, cfg.data.batch_size, torch.device("cpu")))
            tree.sample()
            mib = {k: v / 2**20 for k, v in tree.peaks.items()}
            out.append({"model": entry["name"], "data": f"x{times}", "rows": n, "seconds": time.perf_counter() - start,
                        "driver_mib": mib.get("driver"), "driver_added_mib": mib.get("driver") - before["driver"] / 2**20,
                        "workers_mib": mib.get("worker"),
                        "largest_worker_mib": mib.get("worker_max"), "ray_system_mib": mib.get("ray_system")})
            report.write()
        small, large = out
        out.append({"model": entry["name"], "data": f"x{scale}/x1", "rows": large["rows"] / small["rows"],
                    **{k: large[k] / small[k] for k in ("driver_mib", "workers_mib", "largest_worker_mib",
                                                        "ray_system_mib") if small[k] and large[k]}})


class StreamOrReplay:
    """A training stream's batches, or, while ``replay`` is set, the ones it last yielded (up to
    ``keep``) again from memory: the same steps with and without the stream preparing batches
    beside them. ``source`` names where the last batch came from. Closing the iteration (the
    Runner's ``end_stream``) closes the stream, which stops a Ray Data iterator's threads while
    the cluster is up; left to the garbage collector, they outlived ``ray.shutdown()``."""

    def __init__(self, stream: Iterable, keep: int):
        self.stream, self.kept = iter(stream), collections.deque(maxlen=keep)
        self.replay, self.source = False, ""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        replayed = 0
        try:
            while True:
                if self.replay and self.kept:
                    batch, self.source = self.kept[replayed % len(self.kept)], "memory"
                    replayed += 1
                else:
                    batch = next(self.stream, None)
                    if batch is None:
                        return
                    self.kept.append(batch)
                    self.source = "stream"
                yield batch
        finally:
            if hasattr(self.stream, "close"):
                self.stream.close()


def bench_data_wait(report: Report, plan: list[dict[str, Any]], root: Path | None, warmup: int = WAIT_WARMUP_STEPS,
                    steps: int = WAIT_STEPS, name: str = "data wait") -> None:
    """Each architecture's Runner (its preset's size, one CPU worker) fed by the Ray pipeline as
    on Ray Train; the fraction is the trainer's own ``time/data_wait_fraction`` over ``steps``
    steps after ``warmup`` (its window closed once after the warm-up), inside the first epoch.
    Then four alternating blocks of ``steps // 4`` steps (at least 1), from the stream and
    replayed from memory (:class:`StreamOrReplay`): ``stream_cost`` is the ratio of their mean step times, what the
    data stage running beside the step costs it (interleaved, so a machine's drift cancels).
    ``root``: the shard set every preset reads; None: each preset's own (``ray_flickr8k``)."""
    from alignlab.platform.ingest import build_dataset
    from alignlab.platform.train import LocalContext, Runner, prepare, shard_batches

    block = max(1, steps // 4)
    compares = (f"the trainer's time/data_wait_fraction (time in next(batch) / wall time) of each architecture's "
                f"Runner (its preset, one CPU worker) fed by build_dataset + streaming_split + shard_batches, "
                f"over {steps} steps after {warmup}, inside the first epoch; the data workers share the machine's "
                f"cores with the step. Then 4 alternating blocks of {block} steps fed by the stream and by its "
                f"batches replayed from memory: stream_cost = mean step from the stream / from memory")
    with report.section(name, compares) as out:
        for entry in _architectures(plan):
            cfg = entry["cfg"] if root is None else on_shards(entry["cfg"], root)
            cfg = replace(cfg, tracking=replace(cfg.tracking, checkpoint_every=10**9, log_every=10**9))
            info = prepare(cfg)
            ds = build_dataset(cfg.data, cfg.objectives, _inputs(cfg), cfg.data.train_split, train=True, seed=cfg.seed)
            (shard,) = ds.streaming_split(1, equal=True)
            source = StreamOrReplay(shard_batches(shard, cfg.data, cfg.data.batch_size, torch.device("cpu")), block)
            ctx = LocalContext(lambda: source)
            runner = Runner(cfg, info.spec, info.vocab, ctx, info.steps_per_epoch).setup()
            runner.model.train()

            def step(runner: Runner = runner) -> float:
                t0 = time.perf_counter()
                if runner.train_step() is None:
                    raise BenchError(f"{entry['name']}: the epoch ended inside the measured steps")
                return time.perf_counter() - t0

            for _ in range(warmup):
                runner.train_step()
            runner.log()
            for _ in range(steps):
                step()
            m = runner.log()
            times: dict[str, list[float]] = {"stream": [], "memory": []}
            for b in range(4):
                source.replay = b % 2 == 1
                for _ in range(block):
                    dt = step()
                    times[source.source].append(dt)
            runner.end_stream()
            stream_ms, memory_ms = (1e3 * statistics.mean(times[k]) for k in ("stream", "memory"))
            out.append({"model": entry["name"], "preset": entry["preset"], "batch": cfg.data.batch_size,
                        "precision": cfg.precision.precision, "steps": steps,
                        "samples_per_s": m["throughput/samples_per_s"],
                        "step_ms": 1e3 * cfg.data.batch_size / m["throughput/samples_per_s"],
                        "data_wait": m["time/data_wait_fraction"],
                        "step_ms_stream": stream_ms, "step_ms_memory": memory_ms,
                        "stream_cost": stream_ms / memory_ms})
            report.write()
            del runner, shard, ds
            gc.collect()


RAY_SECTIONS = ("ingest", "epochs", "memory", "data_wait", "leftover", "pacing")
# Opt-in: they need shard sets built from ../shared/data, which a fresh clone does not have.
REAL_DATA_SECTIONS = ("data_wait_flickr8k",)


def run_ray_sections(report: Report, plan: list[dict[str, Any]], sections: list[str] = list(RAY_SECTIONS),
                     shards_root: str | Path | None = None) -> None:
    """The Ray ``sections`` on ``shards_root`` (default: the synthetic set, generated into a
    temporary folder) and on it ``MEMORY_SCALE`` times over, in one local cluster."""
    from alignlab.platform.synth import generate

    with contextlib.ExitStack() as stack:
        if shards_root is None:
            shards_root = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "synth"
            generate(str(shards_root))
        root = Path(shards_root)
        scaled = scaled_shards(root, Path(stack.enter_context(tempfile.TemporaryDirectory())), MEMORY_SCALE)
        stack.enter_context(ray_cluster(plan[0]["cfg"]))
        tree = stack.enter_context(ProcessTree())
        run = {"ingest": lambda: bench_ingest(report, plan, scaled, tree),
               "epochs": lambda: bench_epochs(report, plan, root),
               "memory": lambda: bench_memory(report, plan, {1: root, MEMORY_SCALE: scaled}, tree),
               "data_wait": lambda: bench_data_wait(report, plan, root),
               "data_wait_flickr8k": lambda: bench_data_wait(report, load_plan("ray_flickr8k"), None,
                                                             name="data wait, Flickr8k"),
               "leftover": lambda: bench_leftover(report, plan, root, tree),
               "pacing": lambda: bench_pacing(report, plan, root, tree)}
        for name in sections:
            run[name]()

# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def bench_training(report: Report, plan: list[dict[str, Any]], device: torch.device, precisions: tuple[str, ...],
                   steps: int, peak: float | None, budget_s: float) -> None:
    """The training section: every model of ``plan`` at its paper's per-GPU batch, per precision;
    models not started within ``budget_s`` are skipped."""
    start = time.perf_counter()
    vocab = synthetic_vocab()
    compares = (f"training steps (fwd+bwd+clip+AdamW) per precision at the paper's per-GPU batch; MFU = counted "
                f"FLOPs / wall time / {peak or 'unknown'} TFLOP/s peak; skipped = GradScaler overflow steps of "
                f"{2 * steps}")
    with report.section("training", compares) as rows:
        for entry in plan:
            cfg = entry["cfg"]
            head = {"model": entry["name"], "precision": None}
            if time.perf_counter() - start > budget_s:
                rows.append({**head, "error": f"skipped: past the {budget_s:.0f} s budget"})
                continue
            paper_batch = cfg.data.batch_size // cfg.scaling.num_workers
            t0 = time.perf_counter()
            bench = None
            try:
                bench = TrainingBench(cfg, vocab, device)
                for precision in precisions:
                    row = {**head, "precision": precision, "paper_batch": paper_batch}
                    try:
                        row.update(bench.measure_fitting(precision, paper_batch, steps, peak))
                    except Exception as e:  # the other precision still runs
                        traceback.print_exc()
                        row["error"] = f"{type(e).__name__}: {e}"
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    rows.append(row)
                    report.write()
            except Exception as e:  # the model did not build: the next one still runs
                traceback.print_exc()
                rows.append({**head, "error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 1)})
            del bench
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_runner_resume(report: Report, device: torch.device, precision: str = "fp16", steps: int = 16) -> None:
    """The trainer itself on the device: :class:`~alignlab.platform.train.Runner` in ``precision``
    (fp16: autocast + GradScaler) over synthetic batches, ``steps`` straight against ``steps / 2``,
    a checkpoint written and read back onto the device, and ``steps / 2`` more, resuming at an epoch
    boundary (a resumed stream restarts its epoch); the weights of the two runs must agree up to
    the device's non-deterministic reductions."""
    from alignlab.models.registry import get_spec
    from alignlab.platform.train import LocalContext, Runner

    compares = (f"the real Runner on {device.type} in {precision}: {steps} steps straight vs {steps // 2} + "
                f"checkpoint + resume + {steps // 2}; max weight difference, GradScaler scale, skipped steps")
    with report.section("runner resume", compares) as rows:
        (entry,) = load_plan("runner")
        cfg = config_lib.load_config(entry["preset"], [*entry["overrides"], f"precision.precision={precision}",
                                                       f"scaling.use_gpu={str(device.type == 'cuda').lower()}",
                                                       f"optim.max_steps={steps}", "optim.warmup_steps=2"])
        spec = get_spec(cfg.model.architecture)
        vocab = synthetic_vocab(size=1000, tags=20, concepts=50)
        inputs = spec.input_spec(cfg.model, cfg.objectives)
        epoch = [{k: v.to(device) for k, v in synthetic_batch(inputs, cfg, vocab, cfg.data.batch_size, seed=i).items()}
                 for i in range(steps // 2)]

        def runner(root: str | None = None) -> Runner:
            return Runner(cfg, spec, vocab, LocalContext(lambda: epoch, checkpoint_root=root, device=device),
                          steps_per_epoch=len(epoch)).setup()

        def train(r: Runner, n: int) -> dict[str, float]:
            r.model.train()
            for _ in range(n):
                while (means := r.train_step()) is None:
                    pass
            return means

        t0 = time.perf_counter()
        straight = runner()
        last = train(straight, steps)
        _sync(device)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as root:
            first = runner(root)
            train(first, steps // 2)
            first.checkpoint()
            resumed = runner(root)
            resumed_at, scale_at = resumed.step, resumed.scaler.get_scale() if resumed.scaler.is_enabled() else None
            train(resumed, steps - steps // 2)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in
                   zip(straight.model.state_dict().values(), resumed.model.state_dict().values()))
        rows.append({"model": cfg.model.architecture, "precision": precision, "steps_per_s": steps / seconds,
                     "resumed_at_step": resumed_at, "scale_after_resume": scale_at,
                     "scale_saved": first.scaler.get_scale() if first.scaler.is_enabled() else None,
                     "nonfinite_skipped": straight.nonfinite_skipped, "max_weight_diff": diff,
                     "final_loss": last["loss/total"]})


def bench_all_gather(report: Report, world: int, backend: str = "nccl",
                     sizes_mib: tuple[int, ...] = NCCL_SIZES_MIB) -> None:
    with report.section(f"{backend} all-gather", f"{all_gather_fn()[0]} with gradient (what gather_with_grad runs) on "
                                                 f"{world} process(es): values and gradient checked, bandwidth per "
                                                 f"size") as rows:
        rows += nccl_all_gather(world, backend, sizes_mib)


def run_gpu(args: argparse.Namespace, out: str) -> Report:
    if not torch.cuda.is_available():
        raise BenchError(f"--gpu needs a CUDA GPU and torch sees none (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda or 'no CUDA: a CPU-only build'}); run it on a GPU machine, e.g. "
                         f"experiments/gpu_check.sh")
    env = environment()
    peak = args.peak_tflops or peak_tflops(env["gpu"])
    env.update(peak_tflops=peak, peak_source="--peak-tflops" if args.peak_tflops else "table" if peak else None)
    print(json.dumps(env))
    report = Report("gpu", out, env)
    report.write()
    bench_runner_resume(report, torch.device("cuda", 0))
    bench_training(report, load_plan("gpu"), torch.device("cuda", 0), GPU_PRECISIONS, GPU_STEPS, peak, GPU_BUDGET_S)
    bench_all_gather(report, torch.cuda.device_count())
    return report


def run_quick(out: str) -> Report:
    # One thread: per-core figures, and on a shared machine OpenMP's spinning threads otherwise
    # slow batched kernels many times over whenever another process runs (the loops barely).
    torch.set_num_threads(1)
    report = Report("quick", out, environment())
    report.write()
    bench_objectives(report)
    bench_rerank(report)
    plan = load_plan("quick")
    bench_rerank_states(report, plan)
    bench_step_shares(report, plan)
    bench_optimizer(report, plan)
    bench_scaling(report, plan)
    return report


def run_ray(out: str, sections: str = "") -> Report:
    # One thread per process, as in --quick: the data workers and the step share the cores.
    torch.set_num_threads(1)
    names = [s for s in sections.split(",") if s] or list(RAY_SECTIONS)
    unknown = [s for s in names if s not in RAY_SECTIONS + REAL_DATA_SECTIONS]
    if unknown:
        raise BenchError(f"--sections: no Ray section {', '.join(unknown)}; choose from "
                         f"{', '.join(RAY_SECTIONS + REAL_DATA_SECTIONS)}")
    report = Report("ray", out, environment())
    report.write()
    run_ray_sections(report, load_plan("ray"), names)
    return report


def run(args: argparse.Namespace) -> None:
    """``alignlab bench``: exits non-zero when a bench cannot run or a figure failed."""
    mode = "gpu" if args.gpu else "ray" if getattr(args, "ray", False) else "quick"
    out = args.out or f"bench-{mode}.json"
    try:
        report = {"gpu": lambda: run_gpu(args, out), "ray": lambda: run_ray(out, getattr(args, "sections", "")),
                  "quick": lambda: run_quick(out)}[mode]()
    except BenchError as e:
        sys.exit(f"alignlab bench: error: {e}")
    print(f"\nfigures written to {out}")
    if report.failed():
        sys.exit("alignlab bench: some figures failed (their error is in the table and the JSON)")


if __name__ == "__main__":
    from alignlab.platform.cli import main

    main(["bench", *sys.argv[1:]])
