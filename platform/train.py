"""Pre-training: a small :class:`Runner` (set-up and resume, ``train_step``, ``log``, ``evaluate``,
``save_checkpoint`` / ``load_checkpoint``, ``run``) and the Ray Train driver around it: DDP over
``scaling.num_workers`` workers, fp16 autocast + GradScaler on CUDA (bf16 or fp32 elsewhere),
AdamW with warm-up and decay, gradient accumulation and clipping, checkpoints every
``tracking.checkpoint_every`` steps and at the end, and resume.

The runner reaches its environment only through a :class:`WorkerContext` (rank, data, the
latest checkpoint, reporting), so every method runs without Ray in the unit tests; on Ray Train
the context is :class:`RayContext`.

Resume: every checkpoint (``platform/checkpoint.py``) holds the model, optimiser, scheduler,
scaler, RNG, step and epoch. A worker failure restarts the workers (``FailureConfig``) from the
newest checkpoint that reads back (:meth:`Runner.resume`); a killed driver resumes the same way
when the same command is run again, because the Train run name is derived from the resolved
config (``tracking.run_name`` overrides it) and Ray Train V2 restores a run whose name and
storage it finds. The step count and
learning-rate schedule continue from the checkpoint, and so does the data: the checkpoint holds
its epoch and how many batches of it the steps read, and the restarted stream begins at that
epoch's pass past those rows (``ingest.stream_source``), in the order the run read them. That is
exact up to the trainer's shuffle buffer (``data.shuffle_buffer`` rows: those it held at the
checkpoint are drawn afresh, others read twice) and the rows skipped as bad before the checkpoint
(the resumed stream skips that many fewer). Before, a resumed stream started again at the first
rows of its pass, so a run stopped more often than once a pass never read the rest of it.

Epochs: the training data is one stream of passes over the split (``ingest.build_dataset``); an
epoch ends where the next pass's first row arrives, or where the stream ends.

Metrics reach MLflow exactly once per step: rank 0 holds each window's metrics until Ray Train
has registered the next checkpoint, then logs them. A run killed between checkpoints resumes from the
last one and logs the steps after it afresh, so no step appears twice in a metric's history
(MLflow's history is append-only). The console shows every window as it happens.

Non-finite losses: a step whose total loss is NaN or Inf on any worker is skipped like an fp16
overflow (no optimiser step, counted in ``train/nonfinite_skipped``); after
``optim.nonfinite_patience`` such steps in a row the run fails with :class:`NonFiniteLossError`,
naming the step and the losses. Evaluation refuses non-finite weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Protocol

import numpy as np
import torch

from alignlab.models import downstream
from alignlab.models.base import ModelSpec, PretrainingModel, Vocab
from alignlab.models.config import without_init_sources
from alignlab.platform import config as config_lib
from alignlab.platform.checkpoint import CheckpointContents, read_checkpoint, write_checkpoint
from alignlab.platform.config import Config, OptimConfig
from alignlab.platform.ingest import PASS_COLUMN
# Imported with the trainer, not at the first evaluation: a worker then evaluates with the code it
# trained with, even when the working tree changes under a long run.
from alignlab.platform.evaluate import (evaluate_compositional, evaluate_retrieval, evaluate_task, load_shortlist,
                                       resolve_checkpoint)

log = logging.getLogger(__name__)
# Logged to MLflow after the metrics a committed checkpoint covers, with its step: the mark that
# they reached the run (Runner.resume).
CHECKPOINT_MARK = "train/checkpoint_step"


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses for ``optim.nonfinite_patience`` steps in a row, or
    evaluation found non-finite weights."""


# --------------------------------------------------------------------------------------------
# Pure pieces of the loop
# --------------------------------------------------------------------------------------------


def schedule_position(step: int, optim: OptimConfig, seconds: float = 0.0) -> float:
    """Where a run is on its schedule, in steps: ``step``, or, with a time budget
    (``optim.max_minutes``), the step that ``seconds`` of training would be at if the budget's
    minutes spanned ``max_steps`` steps, where that is further. The run ends at ``max_steps``."""
    if not optim.max_minutes:
        return float(step)
    return max(float(step), optim.max_steps * seconds / (60.0 * optim.max_minutes))


def lr_multiplier(step: int, optim: OptimConfig, seconds: float = 0.0) -> float:
    """LR / peak LR at ``step`` after ``seconds`` of training: linear warm-up from 0, then
    linear or cosine decay to ``min_lr`` at ``max_steps`` (MVPTR §4.1: warm-up, then linear decay
    to 0; SIMLA: cosine to 1e-5). With a time budget the same schedule runs on
    :func:`schedule_position`, so a run that its minutes end has warmed up for the same share of
    them and decayed to ``min_lr`` at its last step, however many steps they held."""
    position = schedule_position(step, optim, seconds)
    warmup = optim.warmup_steps or int(optim.warmup_ratio * optim.max_steps)
    floor = optim.min_lr / optim.lr if optim.lr else 0.0
    if warmup and position < warmup:
        return position / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (position - warmup) / max(1, optim.max_steps - warmup))
    if optim.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and other 1-d tensors, nor on what the model names in
    ``no_weight_decay()`` (timm's hook; temperatures here)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Devices with torch's fused AdamW kernel, where the update runs as one pass over each group.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with torch's fused kernel on the devices that have one.
    The update is the same; the per-tensor loop is a dozen elementwise kernels per parameter, and
    on the CPU it was 18% of the MVPTR Flickr8k preset's step (84 ms of 470 against 16 fused on a
    2-core Xeon; ``alignlab bench --quick``'s "optimizer" section prints the ratio). The GradScaler
    drives a fused AdamW on CUDA as it drives the loop (unscale, skip on overflow)."""
    fused = True if device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                             eps=optim.eps, fused=fused)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them oneDNN
    emulates bf16 and autocast runs slower than fp32: SIMLA's CPU step took 71 s in bf16 against
    5.4 s in fp32 on an AVX2-only EPYC, where an AVX512-BF16 CPU ran it 1.8x faster than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device, max_minutes: float = 0.0, warn: bool = True) -> str:
    """The precision actually used, checked against the device: ``auto`` is fp16 on CUDA, bf16 on
    a CPU with native bf16 (:func:`cpu_has_native_bf16`) and fp32 on any other CPU. A run sized in
    minutes (``max_minutes``) that falls back to fp32 is warned: its minutes hold a fraction of the
    steps they hold with native bf16, and nothing else in the run would say so. ``warn=False``
    resolves alike in silence (a DDP run's ranks but the first: one warning a run, not one a rank)."""
    warning = log.warning if warn else (lambda *args: None)
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if cpu_has_native_bf16():
            return "bf16"
        if max_minutes:
            # A budget in minutes is sized on CPUs with native bf16: the same MVPTR Flickr8k preset
            # (dropout 0.1, two multi-modal layers) trained 757 steps in its 44 minutes on an
            # AVX2-only EPYC against 2,659-2,742 on an AMX Xeon, and missed the reference row the
            # Xeon's runs beat. The preset's figures since: README, "Real-data signal".
            warning("precision 'auto' is fp32 on this CPU (no AVX512-BF16 or AMX): optim.max_minutes = %g "
                    "will hold about a quarter of the steps a CPU with native bf16 trains in them; compare "
                    "runs by train/step, or size this run in steps (optim.max_minutes=0 optim.max_steps=N)",
                    max_minutes)
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision.precision = 'fp16' needs a CUDA device (autocast + GradScaler); "
                         "valid choices on CPU: 'bf16', 'fp32', 'auto'")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warning("precision.precision = 'bf16' on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN "
                "emulates it, often several times slower than fp32; 'auto' picks fp32 here")
    return precision


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ w_k L_k (MVPTR eq. 5, SIMLA eq. 10); an objective without a configured weight counts 1."""
    return sum(weights.get(k, 1.0) * v for k, v in losses.items())


def config_digest(cfg: Config) -> str:
    """A digest of what a run computes: its config and, where the shard set has a manifest, the
    set's :func:`~alignlab.platform.shards.data_digest`, so a set rebuilt otherwise gives new runs
    and sweeps, never the old set's finished ones. What only changes what the run shows (the
    console's verbosity, the system metrics' sampling, the registry name of its final model, how
    many trials run at once) is not part of it: a run or sweep restarted with ``--verbose`` or
    ``--max-concurrent-trials`` resumes."""
    from alignlab.platform.shards import data_digest

    shown = replace(cfg.tracking, verbose=False, system_metrics_every=config_lib.TrackingConfig.system_metrics_every,
                    registered_model="")
    scheduled = replace(cfg.scaling, max_concurrent_trials=0)
    text = config_lib.dump_yaml(replace(cfg, tracking=shown, scaling=scheduled)) + data_digest(cfg.data.shards)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_key(cfg: Config) -> str:
    """A stable Train run name: the same resolved config on the same shard set resumes the same run."""
    return cfg.tracking.run_name or f"{cfg.model.architecture}-{config_digest(cfg)}"


def trial_cpus(cfg: Config | None) -> int:
    """Logical CPUs one run occupies: its train workers' plus 5 slots — the Tune trial's, and a
    Parquet read and a preprocessing actor for each of the train and eval datasets. The train
    pipeline is one stream for the whole run and keeps its actor until the stream ends, after
    training stops too, so without the eval pipeline's own slots an evaluation would wait for it.
    A compositional evaluation split adds its own two. A split that rank 0 prepares itself
    (``data.eval_in_worker_rows``) uses none of its two, but they are reserved all the same: the
    sizing comes before any shard is read."""
    if cfg is None:
        return 5
    workers = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    return workers + 5 + (2 if cfg.data.compositional_split else 0)  # its own read and preprocess


def local_cluster_cpus(cfg: Config | None) -> int:
    """Logical CPUs of a local cluster: the machine's, and at least the slots of the runs it is
    to hold at once (:func:`trial_cpus`, times ``scaling.max_concurrent_trials`` where set): Ray
    schedules by slots, and on a 2-core laptop or CI machine the data stages would otherwise wait
    on the workers' slots, or one trial's evaluation on another trial's stream."""
    runs = max(1, cfg.scaling.max_concurrent_trials) if cfg is not None else 1
    return max(os.cpu_count() or 1, trial_cpus(cfg) * runs)


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


class WorkerContext(Protocol):
    """What a :class:`Runner` needs from the process it runs in."""

    rank: int
    world: int
    device: torch.device

    def wrap(self, model: PretrainingModel) -> torch.nn.Module:
        """The model as trained (DDP across workers), sharing ``model``'s parameters."""

    def train_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of this worker's training batches, on ``device``."""

    def eval_batches(self, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
        """The evaluation split (rank 0 only), on CPU."""

    def compositional_batches(self, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
        """The compositional split (``data.compositional_split``; rank 0 only), on CPU."""

    def resume_checkpoints(self) -> Iterable[ContextManager[str]]:
        """The checkpoints to resume from, newest first, each opened as a local directory when
        entered (none on a fresh run)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Hands metrics (and rank 0's checkpoint) over; every rank calls it at the same steps."""

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over workers (identity for one)."""

    def data_metrics(self) -> dict[str, float]:
        """Data-quality counters (``data/skipped_*``) to log."""

    def stream_started(self, first_pass: int, rows_read: int) -> None:
        """Every rank, before the first batch of a training stream: the stream starts at pass
        ``first_pass`` (the epoch), past the ``rows_read`` rows of it that steps already read."""

    def epoch_skips(self, epoch: int) -> dict[str, int]:
        """Distinct rows skipped by the training read of ``epoch``, by reason (rank 0)."""


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def last_logged_step(self, key: str) -> int | None:
        """The highest step of ``key`` the run already holds, or None."""

    def set_tag(self, key: str, value: str) -> None:
        """Sets a run tag: facts about this attempt that are not hyper-parameters (what
        ``precision: auto`` resolved to), which a resumed attempt may overwrite."""


@dataclass
class Window:
    """Per-key (sum over steps, steps that produced it), and the samples and data wait since the
    window opened. A loss present in only some steps (SemVLP's per-mode losses) is averaged over
    those steps, not diluted by the others. ``start`` moves forward past evaluations and
    checkpoints (:meth:`Runner._outside_window`), so the window's time is training time."""

    sums: dict[str, tuple[float, int]] = field(default_factory=dict)
    samples: int = 0
    wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    paused_at: float | None = None

    def add(self, step_means: dict[str, float]) -> None:
        for k, v in step_means.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v, count + 1)

    def elapsed(self) -> float:
        end = time.perf_counter() if self.paused_at is None else self.paused_at
        return max(1e-9, end - self.start)


class Runner:
    """One worker's pre-training loop. ``sink`` (rank 0 only) receives the metrics once their
    step is covered by a reported checkpoint."""

    def __init__(self, cfg: Config, spec: ModelSpec, vocab: Vocab, ctx: WorkerContext, steps_per_epoch: int,
                 sink: MetricSink | None = None):
        self.cfg, self.spec, self.vocab, self.ctx = cfg, spec, vocab, ctx
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.sink = sink
        self.step = self.epoch = 0
        self.nonfinite_run = self.nonfinite_skipped = 0
        self.epoch_batches = 0  # batches this worker read in the current epoch
        # (metrics, the step MLflow shows them at, the training step that produced them)
        self.pending: list[tuple[dict[str, float], int, float]] = []
        self.logged_through = -1  # training steps whose metrics the run already holds
        self.window = Window()
        # The windows' time summed (data wait included, evaluations and checkpoints not): what a
        # budget like "45 minutes of training" counts. A checkpoint carries it, so a resumed run
        # counts the steps it kept, not the ones it trains again.
        self.train_seconds = 0.0
        # The training time the schedule and a time budget read: the workers' mean, agreed on at
        # every step, so that every DDP replica steps with the same LR and stops at the same step.
        self.schedule_seconds = 0.0
        self.last_metrics: dict[str, float] = {}
        self._batches: Iterator | None = None
        self.stream_pass = 0  # the latest pass of the training stream seen in the current iteration

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> "Runner":
        cfg, device = self.cfg, self.ctx.device
        if device.type == "cpu":
            # Ray starts workers with one OpenMP thread whatever they hold; a CPU worker that
            # holds scaling.cpus_per_worker cores should compute on all of them.
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        self.precision = resolve_precision(cfg.precision.precision, device, cfg.optim.max_minutes,
                                           warn=self.ctx.rank == 0)
        self.autocast = autocast_factory(self.precision, device)
        if self.ctx.rank == 0:
            log.info("precision %s (configured %s) on %s", self.precision, cfg.precision.precision, device.type)
        if self.sink is not None:
            # What `precision: auto` became on this device: runs of one config compare only where
            # it is the same, and the params show only what was configured. A tag, not a param: a
            # run resumed on another machine may resolve it otherwise.
            self.sink.set_tag("alignlab.precision", self.precision)
        torch.manual_seed(cfg.seed)
        # A fine-tuning run's pre-trained weights come from its checkpoint, not the init sources.
        model_cfg = without_init_sources(cfg.model) if cfg.finetune.init else cfg.model
        self.model = downstream.build(cfg.finetune.task, self.spec, model_cfg, cfg.objectives, self.vocab)
        if cfg.finetune.init:
            # The pre-trained weights, before any resume replaces them with the fine-tuned ones.
            pretrained = read_checkpoint(cfg.finetune.init).model
            getattr(self.model, "backbone", self.model).load_state_dict(pretrained)
        self.model = self.model.to(device)
        self.trained = self.ctx.wrap(self.model)
        self.optimizer = adamw(self.model, cfg.optim, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.optim, self.schedule_seconds))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        # The shortlist retriever: rank 0 evaluates with it; every rank scores its batches with
        # it where the model trains on the shortlist's near misses (shortlist_scores).
        self.scores_batches = downstream.input_spec(cfg.finetune.task, self.spec, cfg.model,
                                                    cfg.objectives).shortlist_scores
        self.shortlist = None
        if cfg.eval.shortlist and (self.ctx.rank == 0 or self.scores_batches):
            self.shortlist = load_shortlist(cfg.eval.shortlist, map_location=device)[0].eval().requires_grad_(False)
        self.resume()
        return self

    def resume(self) -> None:
        """Loads the newest checkpoint that reads back. A refused one (truncated, corrupt, or
        holding more than tensors) is named in a warning and the one before it is tried: Ray
        keeps ``CheckpointConfig.num_to_keep`` of them. When every one is refused the run
        fails, naming each, rather than silently training from scratch.

        Falling back means re-training steps whose metrics the run already logged. MLflow's
        history is append-only, so those steps are not logged again (the first measurement
        stands): each step appears once in every metric's history.

        Metrics reach MLflow only once a committed checkpoint covers them, so a kill between
        the commit and the logging would lose the checkpoint's own steps: the checkpoint
        carries them, and they are logged here unless its ``train/checkpoint_step`` mark (the
        last thing logged after a commit) shows they were."""
        from alignlab.platform.checkpoint import CheckpointError

        refused: list[str] = []
        for candidate in self.ctx.resume_checkpoints():
            with candidate as d:
                try:
                    unlogged = self.load_checkpoint(d)
                except CheckpointError as e:
                    log.warning("rank %d: %s; trying the checkpoint before it", self.ctx.rank, e)
                    refused.append(str(e))
                    continue
            log.info("rank %d resumed from step %d (epoch %d, its stream past the %d rows read)%s", self.ctx.rank,
                     self.step, self.epoch, self.epoch_rows_read(),
                     f", after refusing {len(refused)} newer checkpoint(s)" if refused else "")
            if self.sink is not None:
                last = self.sink.last_logged_step("train/step")
                self.logged_through = -1 if last is None else last
                marked = self.sink.last_logged_step(CHECKPOINT_MARK)
                if marked is None or marked < self.step:
                    self.pending = [(e["metrics"], e["step"], math.inf if e["at_step"] is None else e["at_step"])
                                    for e in unlogged]
                    self._flush()
            self._record({"train/resumed_from_step": float(self.step),
                          "train/resumed_epoch_rows": float(self.epoch_rows_read()),
                          "train/checkpoints_refused": float(len(refused))}, replayable=False)
            return
        if refused:
            raise CheckpointError("no checkpoint of this run could be resumed from:\n  " + "\n  ".join(refused))

    # -- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        trainer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(),
                   "nonfinite_skipped": self.nonfinite_skipped, "epoch_batches": self.epoch_batches,
                   "train_seconds": self.train_seconds + self.window.elapsed()}
        unlogged = [{"metrics": m, "step": step, "at_step": None if math.isinf(at) else at}
                    for m, step, at in self.pending]
        if self.ctx.device.type == "cuda":
            trainer["cuda_rng"] = torch.cuda.get_rng_state(self.ctx.device)
        write_checkpoint(directory, CheckpointContents(model=self.model.state_dict(), step=self.step,
                                                       epoch=self.epoch, config=config_lib.to_dict(self.cfg),
                                                       vocab=asdict(self.vocab), trainer=trainer,
                                                       unlogged_metrics=unlogged))

    def load_checkpoint(self, directory: str) -> list[dict]:
        """Restores the training state; returns the metrics the checkpoint carries unlogged."""
        ckpt = read_checkpoint(directory, map_location=self.ctx.device)
        self.model.load_state_dict(ckpt.model)
        t = ckpt.trainer
        # The kernel is this device's choice, not the writer's: torch restores a saved group's
        # `fused` / `foreach` (and places its step counters by them), so a checkpoint of the
        # per-tensor loop, or of another device, would resume on that loop.
        saved = t["optimizer"]
        groups = [{**g, "fused": own["fused"], "foreach": own["foreach"]}
                  for g, own in zip(saved["param_groups"], self.optimizer.param_groups)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        self.scheduler.load_state_dict(t["scheduler"])
        self.scaler.load_state_dict(t["scaler"])
        torch.set_rng_state(t["rng"].cpu())
        if "cuda_rng" in t and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(t["cuda_rng"].cpu(), self.ctx.device)
        self.nonfinite_skipped = int(t.get("nonfinite_skipped", 0))
        self.train_seconds = self.schedule_seconds = float(t.get("train_seconds", 0.0))
        self.epoch_batches = int(t.get("epoch_batches", 0))  # checkpoints before it: the pass's start
        self.step, self.epoch = ckpt.step, ckpt.epoch
        return ckpt.unlogged_metrics

    # -- one optimiser step ---------------------------------------------------------------

    def epoch_rows_read(self) -> int:
        """Rows of the current epoch's pass that every worker's batches have read together."""
        return self.epoch_batches * (self.cfg.data.batch_size // self.ctx.world) * self.ctx.world

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        if self._batches is None:
            # Every rank, not only rank 0: the stream's reads are made when the first rank asks
            # for a batch, and all ranks resumed from the same checkpoint.
            self.ctx.stream_started(self.epoch, self.epoch_rows_read())
            self._batches = iter(self.ctx.train_batches(self.cfg.data.batch_size // self.ctx.world))
            self.stream_pass = self.epoch
        t0 = time.perf_counter()
        batch = next(self._batches, None)
        self.window.wait += time.perf_counter() - t0
        if batch is not None and PASS_COLUMN in batch:
            # A stream of several passes (ingest.build_dataset): the first row of a later pass
            # ends the epoch, when the pass before has been prepared whole (the stream keeps its
            # order), so its skip counts are complete. The shuffle buffer mixes the two passes'
            # rows around that point (data.shuffle_buffer rows and up to a block).
            batch = dict(batch)
            latest = int(batch.pop(PASS_COLUMN).max())
            for _ in range(latest - self.stream_pass):
                self._end_epoch()
            self.stream_pass = max(self.stream_pass, latest)
        return batch

    def _end_epoch(self) -> None:
        self._record_epoch_skips()
        self.epoch += 1
        self.epoch_batches = 0

    def train_step(self) -> dict[str, float] | None:
        """Forward/backward over ``grad_accum`` micro-batches (DDP syncs gradients on the last
        only), then one optimiser step. Returns the step's mean losses, or None when the training
        stream ran out first (a partial accumulation is dropped, not stepped, and the epoch
        advances; the next step starts the stream anew)."""
        cfg = self.cfg
        self.model.begin_step(self.step, self.steps_per_epoch)
        accum = cfg.optim.grad_accum
        means: dict[str, float] = {}
        finite = True
        for micro in range(accum):
            batch = self._next_batch()
            if batch is None:
                if not self.epoch_batches:
                    raise RuntimeError(f"epoch {self.epoch} of the training split yielded no batch of "
                                       f"{self.cfg.data.batch_size // self.ctx.world} rows: every row skipped "
                                       f"(see data/skipped_*), or fewer rows than a batch on this worker")
                self.optimizer.zero_grad(set_to_none=True)
                self._end_epoch()
                self._batches = None
                return None
            self.epoch_batches += 1
            sync = micro == accum - 1 or self.ctx.world == 1
            if self.scores_batches:
                batch = {**batch, "shortlist_scores": self.shortlist_scores(batch)}
            with contextlib.nullcontext() if sync else self.trained.no_sync():
                with self.autocast():
                    out = self.trained(batch)
                    total = weighted_total(out.losses, cfg.objectives.weights)
                self.scaler.scale(total / accum).backward()
            finite = finite and bool(torch.isfinite(total.detach()))
            self.window.samples += len(batch["input_ids"]) * self.ctx.world
            for k, v in {**{f"loss/{k}": v for k, v in out.losses.items()}, "loss/total": total}.items():
                means[k] = means.get(k, 0.0) + float(v.detach()) / accum
            for k, v in out.metrics.items():
                means[f"model/{k}"] = means.get(f"model/{k}", 0.0) + float(v) / accum
        # Every worker must agree to skip (the flag's mean is 1 only where every worker's is) and
        # on the training time the schedule reads: one collective for both.
        agreed = self.ctx.all_mean(torch.tensor([float(finite), self.train_seconds + self.window.elapsed()],
                                                dtype=torch.float64, device=self.ctx.device)).tolist()
        self.schedule_seconds = agreed[1]
        if agreed[0] < 1.0:
            self._skip_nonfinite(means)
            if self.scaler.is_enabled():  # as after an fp16 overflow: a smaller scale next step
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.nonfinite_run = 0
            if cfg.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.window.add(means)
        return means

    @torch.no_grad()
    def shortlist_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, B) cosine of the shortlist retriever's image i and caption j embeddings (its
        embeddings are L2-normalised), the similarity its ranking sorts by."""
        with self.autocast():
            images, texts = self.shortlist.embed_images(batch), self.shortlist.embed_texts(batch)
        return images.float() @ texts.float().t()

    def _skip_nonfinite(self, means: dict[str, float]) -> None:
        self.nonfinite_run += 1
        self.nonfinite_skipped += 1
        log.warning("step %d: non-finite loss on a worker, step skipped (%s)", self.step,
                    ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()) if k.startswith("loss/")))
        if self.nonfinite_run >= self.cfg.optim.nonfinite_patience:
            losses = {k: v for k, v in means.items() if k.startswith("loss/")}
            raise NonFiniteLossError(f"non-finite loss for {self.nonfinite_run} steps in a row, the last at step "
                                     f"{self.step} (optim.nonfinite_patience = {self.cfg.optim.nonfinite_patience}); "
                                     f"losses there: {losses}")

    # -- metrics --------------------------------------------------------------------------

    def log(self) -> dict[str, float]:
        """Closes the logging window: its per-key means (averaged across workers, so rank 0
        holds the global view), throughput, data wait, LR and data counters."""
        w, keys = self.window, sorted(self.window.sums)
        values = torch.tensor([w.sums[k][0] / w.sums[k][1] for k in keys], dtype=torch.float64,
                              device=self.ctx.device)
        if keys:
            values = self.ctx.all_mean(values)
        out = {k: float(v) for k, v in zip(keys, values.tolist())}
        elapsed = w.elapsed()
        self.train_seconds += elapsed
        out.update({"throughput/samples_per_s": w.samples / elapsed,
                    "time/data_wait_fraction": min(1.0, w.wait / elapsed),
                    "time/train_seconds": self.train_seconds,
                    "lr": self.scheduler.get_last_lr()[0], "train/epoch": self.step / self.steps_per_epoch,
                    "train/step": float(self.step), "train/nonfinite_skipped": float(self.nonfinite_skipped)})
        if self.ctx.rank == 0:
            out.update(self.ctx.data_metrics())
            # A run in minutes shows its minutes: its max_steps only caps it, and read as "N/M" the
            # cap looked like a run stopping far short of its end.
            optim = self.cfg.optim
            of_steps = "" if optim.max_minutes else f"/{optim.max_steps}"
            of_minutes = f" of {optim.max_minutes:g}" if optim.max_minutes else ""
            log.info("step %d%s  %.1f samples/s  loss %.4f  data wait %.0f%%  trained %.1f%s min", self.step,
                     of_steps, out["throughput/samples_per_s"], out.get("loss/total", float("nan")),
                     100 * out["time/data_wait_fraction"], self.train_seconds / 60, of_minutes)
        self.window = Window()
        self._record(out)
        return out

    def _record(self, metrics: dict[str, float], step: int | None = None, replayable: bool = True) -> None:
        """Holds ``metrics`` for MLflow at ``step`` (the training step unless given) until a
        checkpoint covers them. ``replayable``: whether a resume re-trains what produced them
        (steps the run already logged are then not logged again)."""
        self.last_metrics.update(metrics)
        if self.sink is not None:
            self.pending.append((dict(metrics), self.step if step is None else step,
                                 self.step if replayable else math.inf))

    def _record_epoch_skips(self) -> None:
        """The skip counts of the training read of the epoch just read (or the part of it read
        at the end of the run), with the epoch as the step."""
        if self.ctx.rank == 0:
            skips = self.ctx.epoch_skips(self.epoch)
            metrics = {f"data/epoch_skipped_{k}": float(v) for k, v in skips.items()}
            self._record({**metrics, "data/epoch_skipped_total": float(sum(skips.values()))}, step=self.epoch)

    def _flush(self) -> None:
        for metrics, step, at_step in self.pending:
            if at_step > self.logged_through:
                self.sink.log_metrics(metrics, step)
        self.pending.clear()

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Rank 0 evaluates, the other ranks wait: a downstream task's metric and baselines
        (``downstream/<task>/...``); otherwise zero-shot retrieval on the evaluation split
        (``eval/...``, or ``downstream/retrieval/...`` after retrieval fine-tuning), and the
        compositional accuracies where a compositional split is configured."""
        metrics: dict[str, float] = {}
        task = self.cfg.finetune.task
        if self.ctx.rank == 0:
            bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteLossError(f"step {self.step}: non-finite weights in {bad[:5]} (of {len(bad)}); "
                                         f"not evaluating a diverged model")
            if task and task != "retrieval":
                metrics = {f"downstream/{task}/{k}": v for k, v in evaluate_task(
                    self.model, self.ctx.eval_batches(self.cfg.data.eval_batch_size), self.ctx.device,
                    self.autocast).items()}
                self._record(metrics)
                self.ctx.all_mean(torch.zeros(1, device=self.ctx.device))  # a barrier
                return metrics
            ev = self.cfg.eval
            prefix = "downstream/retrieval/" if task else "eval/"
            metrics = {f"{prefix}{k}": v for k, v in evaluate_retrieval(
                self.model, self.ctx.eval_batches(self.cfg.data.eval_batch_size), self.ctx.device,
                max_images=self.cfg.data.eval_max_images, k_captions=ev.k_captions, k_images=ev.k_images,
                rerank_itm=ev.rerank, autocast=self.autocast, shortlist=self.shortlist).items()}
            if self.cfg.data.compositional_split:
                metrics.update({f"eval/{k}": v for k, v in evaluate_compositional(
                    self.model, self.ctx.compositional_batches(self.cfg.data.eval_batch_size), self.ctx.device,
                    self.autocast).items()})
            self._record(metrics)
        self.ctx.all_mean(torch.zeros(1, device=self.ctx.device))  # a barrier
        return metrics

    # -- the loop -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Reports the step's metrics with rank 0's checkpoint, then releases the pending metrics
        to MLflow: they are now covered by a checkpoint, so they will never be logged again."""
        with tempfile.TemporaryDirectory() as d:
            if self.ctx.rank == 0:
                self._record({CHECKPOINT_MARK: float(self.step)}, replayable=False)
                self.save_checkpoint(d)
            self.ctx.report(self._progress(), d if self.ctx.rank == 0 else None)
        if self.sink is not None:
            self._flush()

    def _progress(self) -> dict[str, float]:
        """What a report carries: the latest metrics, the run's length and the share of it done,
        which a time budget moves (for a sweep's console and its ETA)."""
        return {**self.last_metrics, "train/max_steps": float(self.cfg.optim.max_steps),
                "train/progress": self.progress()}

    def end_stream(self) -> None:
        """Closes the training stream's iterator, which stops its prefetch threads (and the
        executor, where this process runs it): a stream left open past ``ray.shutdown()`` has a
        thread call into the shut-down core worker, which then exits the process with status 1."""
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
        self._batches = None

    @contextlib.contextmanager
    def _outside_window(self):
        """Leaves what runs inside out of the open window's time, so neither its samples/s nor
        ``time/train_seconds`` count a mid-run evaluation or checkpoint."""
        w = self.window
        w.paused_at = time.perf_counter()
        try:
            yield
        finally:
            w.start += time.perf_counter() - w.paused_at
            w.paused_at = None

    def progress(self) -> float:
        """The share of the run done, in [0, 1]: its schedule position over ``max_steps`` (the
        workers agree: it reads the step and :attr:`schedule_seconds`)."""
        optim = self.cfg.optim
        return min(1.0, schedule_position(self.step, optim, self.schedule_seconds) / optim.max_steps)

    def finished(self) -> bool:
        """Whether the run has reached ``max_steps`` or spent ``max_minutes``."""
        return self.progress() >= 1.0

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        if self.finished():
            log.info("rank %d: the checkpoint is at step %d of %d after %.1f minutes of training (budget: %s); "
                     "nothing to train", self.ctx.rank, self.step, cfg.optim.max_steps, self.schedule_seconds / 60,
                     f"{cfg.optim.max_minutes:g} min" if cfg.optim.max_minutes else "none")
        self.model.train()
        if not self.window.samples:  # building the model and resuming are not training
            self.window.start = time.perf_counter()
        while not self.finished():
            if self.train_step() is None:
                continue
            at_end = self.finished()
            logged = self.step % cfg.tracking.log_every == 0 and not at_end
            if logged:
                self.log()
            if cfg.tracking.eval_every and self.step % cfg.tracking.eval_every == 0 and not at_end:
                with self._outside_window():
                    self.evaluate()
            # Every rank reports at the same steps: the report is a barrier.
            if self.step % cfg.tracking.checkpoint_every == 0 and not at_end:
                with self._outside_window():
                    self.checkpoint()
            elif logged:
                self.ctx.report(self._progress(), None)
        self.end_stream()
        if self.window.sums or not self.last_metrics:
            self.log()
        self._record_epoch_skips()
        with self._outside_window():  # the checkpoint's training time leaves the final evaluation out
            self.evaluate()
            self.checkpoint()
        return dict(self.last_metrics)


class LocalContext:
    """:class:`WorkerContext` of one in-process worker without Ray (unit tests, notebooks,
    benchmarks): ``train_epoch()`` yields one epoch of batches (already sized), ``eval_epoch()``
    the evaluation split. Reported checkpoints are kept as Ray keeps them, the newest
    ``num_to_keep`` as ``checkpoint_root/checkpoint_<n>``, and the next runner on the same root
    resumes from them; its stream then starts past the rows the checkpoint's steps read, as Ray
    Data's does. ``quality``: the :class:`~alignlab.platform.ingest.DataQuality` that the
    batches' reads count skipped rows in (and that hears where each stream starts), if any."""

    rank, world = 0, 1

    def __init__(self, train_epoch, eval_epoch=lambda: [], checkpoint_root: str | None = None,
                 device: str | torch.device = "cpu", compositional_epoch=lambda: [], quality=None,
                 num_to_keep: int = 2):
        self.train_epoch, self.eval_epoch, self.compositional_epoch = train_epoch, eval_epoch, compositional_epoch
        self.root = Path(checkpoint_root) if checkpoint_root else None
        self.device = torch.device(device)
        self.quality, self.num_to_keep = quality, num_to_keep
        self.reports: list[tuple[dict[str, float], bool]] = []
        self.rows_read = 0

    def wrap(self, model):
        return model

    def train_batches(self, batch_size):
        batches, skip = iter(self.train_epoch()), self.rows_read
        while skip > 0 and (batch := next(batches, None)) is not None:
            skip -= len(batch["input_ids"])
        return batches

    def eval_batches(self, batch_size):
        return self.eval_epoch()

    def compositional_batches(self, batch_size):
        return self.compositional_epoch()

    def checkpoints(self) -> list[Path]:
        """The kept checkpoints, newest first."""
        return sorted((d for d in self.root.glob("checkpoint_*") if d.is_dir()), reverse=True) if self.root else []

    def resume_checkpoints(self):
        return [contextlib.nullcontext(str(d)) for d in self.checkpoints()]

    def report(self, metrics, checkpoint_dir):
        import shutil

        self.reports.append((metrics, checkpoint_dir is not None))
        if checkpoint_dir and self.root:
            kept = self.checkpoints()
            number = int(kept[0].name.split("_")[1]) + 1 if kept else 0
            staging = self.root / "incoming"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint_dir, staging)
            staging.rename(self.root / f"checkpoint_{number:06d}")
            for old in kept[self.num_to_keep - 1:]:
                shutil.rmtree(old)

    def all_mean(self, values):
        return values

    def data_metrics(self):
        return {}

    def stream_started(self, first_pass, rows_read):
        self.rows_read = rows_read
        if self.quality is not None:
            self.quality.begin_stream(first_pass, rows_read)

    def epoch_skips(self, epoch):
        return self.quality.epoch_counts(epoch) if self.quality is not None else {}


# --------------------------------------------------------------------------------------------
# On Ray Train
# --------------------------------------------------------------------------------------------


def shard_batches(shard, data: config_lib.DataConfig, batch_size: int, device: torch.device,
                  seed: int | None = None) -> Iterator:
    """One epoch of a training shard (a Ray Data ``DataIterator``) as the trainer reads it; each
    call starts the shard's pipeline anew. ``seed`` fixes the local shuffle buffer's draws (None:
    fresh ones). Shared with ``alignlab bench``, which times this iteration on a driver-side shard
    without Ray Train."""
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                    prefetch_batches=data.prefetch_batches,
                                    local_shuffle_buffer_size=data.shuffle_buffer or None,
                                    local_shuffle_seed=seed if data.shuffle_buffer else None)


class RayContext:
    """:class:`WorkerContext` of a Ray Train worker. ``in_worker``: the evaluation datasets
    (``eval``, ``compositional``) that rank 0 prepares itself (``data.eval_in_worker_rows``), each
    as (split, inputs, id columns); the others are Ray Data shards."""

    def __init__(self, cfg: Config, spec: ModelSpec, counter=None, in_worker: dict | None = None):
        import ray.train
        import ray.train.torch

        self.cfg, self.spec, self.counter = cfg, spec, counter
        self.in_worker = in_worker or {}
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": model.find_unused_parameters})

    def train_batches(self, batch_size):
        import ray.train

        # Seeded by the run's seed and this worker's rank: a run repeats its batches, and the
        # ranks' buffers draw apart.
        seed = int(np.random.SeedSequence([self.cfg.seed, self.rank]).generate_state(1)[0])
        return shard_batches(ray.train.get_dataset_shard("train"), self.cfg.data, batch_size, self.device, seed)

    def eval_batches(self, batch_size):
        return self._evaluation("eval", batch_size)

    def compositional_batches(self, batch_size):
        return self._evaluation("compositional", batch_size)

    def _evaluation(self, name: str, batch_size: int):
        import ray.train

        from alignlab.platform import ingest

        if name in self.in_worker:
            split, inputs, ids = self.in_worker[name]
            return ingest.local_eval_batches(self.cfg.data, self.cfg.objectives, inputs, split, batch_size,
                                             id_columns=ids, counter=self.counter)
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=batch_size)

    def resume_checkpoints(self):
        """Ray Train's latest checkpoint, then the older ones it keeps beside it in the run's
        storage (local or object storage), newest first: Ray names them
        ``checkpoint_<date and time>``, so their names sort by age."""
        import posixpath

        import pyarrow.fs
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        name = posixpath.basename(latest.path)
        listing = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(posixpath.dirname(latest.path)))
        older = sorted((i.path for i in listing if i.type == pyarrow.fs.FileType.Directory
                        and posixpath.basename(i.path).startswith("checkpoint_")
                        and posixpath.basename(i.path) < name), reverse=True)
        return [latest.as_directory()] + [ray.train.Checkpoint(p, filesystem=latest.filesystem).as_directory()
                                         for p in older]

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)
        if checkpoint_dir:
            # report() only queues the checkpoint: Ray Train registers it (and writes the run's
            # snapshot, which a restarted driver reads) when its controller next polls the
            # workers, up to RAY_TRAIN_HEALTH_CHECK_INTERVAL_S later. A kill in between resumes
            # from the checkpoint before, so the metrics flushed after this return must wait.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def all_mean(self, values):
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def data_metrics(self):
        if self.counter is None:
            return {}
        import ray

        snapshot = ray.get(self.counter.snapshot.remote())
        skipped = snapshot["counts"]
        out = {f"data/skipped_{k}": float(v) for k, v in skipped.items()}
        out["data/skipped_total"] = float(sum(skipped.values()))
        # Notes are rows kept with a flaw: logged apart, never in the skipped total.
        out.update({f"data/{k}": float(v) for k, v in snapshot["notes"].items()})
        return out

    def stream_started(self, first_pass, rows_read):
        if self.counter is not None:
            import ray

            ray.get(self.counter.begin_stream.remote(first_pass, rows_read))

    def epoch_skips(self, epoch):
        if self.counter is None:
            return {}
        import ray

        return ray.get(self.counter.epoch_counts.remote(epoch))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from alignlab.platform.tracking import RunLogger, system_metrics

    cfg: Config = loop_config["cfg"]
    uri, run_id = loop_config["mlflow_uri"], loop_config["mlflow_run_id"]
    ctx = RayContext(cfg, loop_config["spec"], loop_config.get("counter"), loop_config.get("in_worker", {}))
    sink = RunLogger(uri, run_id) if ctx.rank == 0 else None
    runner = Runner(cfg, loop_config["spec"], loop_config["vocab"], ctx, loop_config["steps_per_epoch"], sink)
    # One system-metrics monitor per machine, in its first worker: it samples the whole machine
    # (every GPU on it), so the machine's other workers would only log the same figures again.
    train_ctx = ray.train.get_context()
    monitor = system_metrics(uri, run_id, cfg.tracking.system_metrics_every, train_ctx.get_node_rank()) \
        if train_ctx.get_local_rank() == 0 else contextlib.nullcontext()
    with monitor:
        runner.setup().run()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def init_ray(cfg: Config | None = None, quiet: bool = False) -> None:
    """Join the cluster this process runs on (``ray job submit`` sets RAY_ADDRESS), or start a
    local one with :func:`local_cluster_cpus` slots. ``quiet``: the cluster's processes print
    into the Ray session's log files only, not also onto this driver's stdout (a sweep's console,
    :mod:`alignlab.platform.console`)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, configure_logging=False, log_to_driver=not quiet)
    else:
        env["worker_process_setup_hook"] = "alignlab.platform.console.quiet_placement_group_cleaner"
        ray.init(num_cpus=local_cluster_cpus(cfg), runtime_env=env, configure_logging=False,
                 include_dashboard=False, log_to_driver=not quiet)
    if quiet:
        from alignlab.platform import console

        print(f"the output of Ray's processes (train workers, data stages, Tune) goes to {console.ray_log_dir()}; "
              f"--verbose (tracking.verbose=true) shows it here", flush=True)


@dataclass
class Prepared:
    """Driver-side facts of a run, computed once: the architecture, the vocabulary summary and
    the epoch length."""

    spec: ModelSpec
    vocab: Vocab
    steps_per_epoch: int
    train_rows: int


def prepare(cfg: Config) -> Prepared:
    """Shared by a single run and every sweep trial: schema validation of both splits, the
    vocabulary summary and the epoch length."""
    from alignlab.models.registry import get_spec
    from alignlab.platform import ingest, shards
    from alignlab.platform.tokenization import load_tokenizer, vocab_info

    train_uri = shards.child_uri(cfg.data.shards, cfg.data.train_split)
    for split in (cfg.data.train_split, cfg.data.eval_split, cfg.data.compositional_split):
        if split:
            shards.validate_shards(shards.child_uri(cfg.data.shards, split))
    vocab = vocab_info(load_tokenizer(cfg.data.tokenizer, cfg.data.shards), cfg.data.shards)
    if cfg.finetune.init:
        # The task set must share the pre-training vocabularies but its answers (the task's classes).
        from alignlab.platform.checkpoint import read_meta
        from alignlab.platform.evaluate import check_vocabularies

        _, pretrained = read_meta(cfg.finetune.init)
        check_vocabularies(pretrained, vocab, cfg.data.shards, fields=("tags", "concepts"))
        vocab = replace(vocab, pretrained_answers=pretrained.answers)
    rows = ingest.count_rows(train_uri)
    if cfg.data.max_train_rows:
        rows = min(rows, cfg.data.max_train_rows)
    step_rows = cfg.data.batch_size * cfg.optim.grad_accum
    if rows < step_rows:
        # Batches drop their ragged end, so such an epoch has no step and a run would never end.
        raise config_lib.ConfigError(
            f"{train_uri}: the training split has {rows} rows, fewer than one optimiser step takes "
            f"(data.batch_size = {cfg.data.batch_size} x optim.grad_accum = {cfg.optim.grad_accum}); lower "
            f"data.batch_size or use a larger split")
    spec = get_spec(cfg.model.architecture)
    if not cfg.eval.shortlist and downstream.input_spec(cfg.finetune.task, spec, cfg.model,
                                                        cfg.objectives).shortlist_scores:
        raise config_lib.ConfigError(
            f"model.architecture {cfg.model.architecture!r} is configured to train on the shortlist retriever's "
            f"near misses (shortlist_scores), but eval.shortlist is empty: set eval.shortlist=<the retriever's "
            f"MLflow run id or checkpoint folder>, or draw the model's negatives another way")
    return Prepared(spec=spec, vocab=vocab,
                    steps_per_epoch=rows // (cfg.data.batch_size * cfg.optim.grad_accum), train_rows=rows)


def dataset_config(datasets: dict[str, Any]):
    """Ray Train's dataset config for a run: the training stream split among the workers, the
    evaluation datasets whole to each, and every dataset keeping its own execution options.
    Without those Ray Train gives each dataset the driver's global options, which dropped the
    training stream's ``preserve_order`` (``ingest.build_dataset``): its blocks then reached the
    trainer in the order they finished, so a seed did not fix the batches (two runs of
    ``alignlab train mvptr_demo`` logged 9.4309 and 9.4322 at step 50; 31 of the first 60 batches
    alike), a pass's rows could arrive after the next pass's, and a resumed stream could not skip
    the rows read in the run's order."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"],
                                execution_options={role: ds.context.execution_options for role, ds in datasets.items()})


def fit(cfg: Config, mlflow_uri: str, mlflow_run_id: str, storage_path: str | None = None, name: str | None = None,
        callbacks: list | None = None):
    """Runs one Ray Train job; returns its ``Result``."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignlab.platform import ingest, shards, tracking

    cfg = config_lib.with_absolute_paths(cfg)
    info = prepare(cfg)  # bad shards are named before a local cluster starts
    tracking.log_datasets(mlflow_uri, mlflow_run_id, cfg.data.shards,
                          [(cfg.data.train_split, tracking.TRAINING), (cfg.data.eval_split, tracking.EVALUATION),
                           (cfg.data.compositional_split, tracking.EVALUATION)])
    init_ray(cfg)
    # Each run checks, not only the sweep's start: nodes the autoscaler added since are covered.
    storage_path = storage_path or tracking.resolve_storage(cfg.tracking.storage_path)
    check_cluster_storage(cfg, mlflow_uri, storage_path)
    if not sys.stdout.isatty():
        # Ray Data redraws a progress bar per operator several times a second; into a job log or
        # a pipe each redraw is a line (half a million in the main job's log), on a core's time.
        # The datasets carry the driver's DataContext to the workers that run them.
        ray.data.DataContext.get_current().enable_progress_bars = False
    inputs = eval_inputs = downstream.input_spec(cfg.finetune.task, info.spec, cfg.model, cfg.objectives)
    if cfg.eval.shortlist:
        # The workers get the folder, not a run id: they need no MLflow store to find it.
        path, _ = resolve_checkpoint(cfg.eval.shortlist, mlflow_uri)
        cfg = replace(cfg, eval=replace(cfg.eval, shortlist=path))
        eval_inputs = inputs.union(load_shortlist(path)[1])
        if inputs.shortlist_scores:  # the trainer scores every batch with the retriever
            inputs = eval_inputs
    counter = ingest.make_counter()
    evaluation = {"eval": (cfg.data.eval_split, eval_inputs, ())}
    if cfg.data.compositional_split:
        evaluation["compositional"] = (cfg.data.compositional_split, inputs, shards.COMPOSITIONAL_COLUMNS)
    in_worker = {}
    datasets = {
        # One stream for the whole run: enough passes for max_steps from wherever it starts (a
        # resumed run's at its checkpoint; a stream cut short by skipped rows starts anew at the
        # next epoch).
        "train": ingest.build_dataset(cfg.data, cfg.objectives, inputs, cfg.data.train_split, train=True,
                                      counter=counter, seed=cfg.seed,
                                      passes=math.ceil(cfg.optim.max_steps / info.steps_per_epoch)),
    }
    for role, (split, spec, ids) in evaluation.items():
        uri = shards.child_uri(cfg.data.shards, split)
        if ingest.count_rows(uri) <= cfg.data.eval_in_worker_rows:
            ingest.split_inputs(spec, uri, train=False, id_columns=ids)  # a bad file fails here, as below
            in_worker[role] = (split, spec, ids)
        else:
            datasets[role] = ingest.build_dataset(cfg.data, cfg.objectives, spec, split, train=False, counter=counter,
                                                  seed=cfg.seed, id_columns=ids)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "spec": info.spec, "vocab": info.vocab, "steps_per_epoch": info.steps_per_epoch,
                           "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id, "counter": counter,
                           "in_worker": in_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name or run_key(cfg),
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.tracking.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=dataset_config(datasets),
    )
    with _sigint_handler_kept():
        return trainer.fit()


@contextlib.contextmanager
def _sigint_handler_kept():
    """Puts back the process's SIGINT handler after a Ray Train run. On the main thread
    ``TorchTrainer.fit`` installs one (Ctrl-C aborts the run) whose closure holds the run's
    controller actor; left installed, it kept that finished controller (~700 MB) and the actors it
    holds alive until the next run, and a later Ctrl-C went to a run long over."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back from here.
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def check_cluster_storage(cfg: Config, mlflow_uri: str, storage_path: str) -> None:
    """Fails at start-up where the run's checkpoints or MLflow store sit on a local path that a
    node of the cluster (alive now, or one the autoscaler may add) cannot reach
    (:func:`alignlab.platform.cluster.check_shared_storage`)."""
    from alignlab.platform import cluster

    cluster.check_shared_storage({"tracking.storage_path": storage_path, "tracking.mlflow_uri": mlflow_uri},
                                 cluster.autoscaling_config(cfg.scaling.autoscaling_config), cluster.ray_nodes_seeing)


def train(cfg: Config, parent_run_id: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """A single pre-training run, tracked in MLflow. Returns the final metrics and locations.
    A config whose run already finished is not trained again: its metrics are returned."""
    from alignlab.platform import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri)
    key = run_key(cfg)
    done = tracking.find_run(uri, cfg.tracking.experiment, {"alignlab.run_key": key}, status="FINISHED")
    if done is not None:
        log.warning("run %s (MLflow run %s) already finished; to train again, set tracking.run_name=<new name> "
                    "or change the config", key, done.info.run_id)
        return {"metrics": dict(done.data.metrics), "mlflow_uri": uri, "mlflow_run_id": done.info.run_id,
                "checkpoint": done.data.tags.get("checkpoint"), "already_finished": True}
    run_id, _ = tracking.find_or_create_run(uri, cfg.tracking.experiment, {"alignlab.run_key": key}, run_name or key,
                                            parent_run_id, include_finished=False)
    logger = tracking.open_run(uri, run_id, cfg)
    with tracking.failure_marks(logger):
        result = fit(cfg, uri, run_id, name=key)
    tracking.close_run(logger, result, cfg)
    return {"metrics": dict(result.metrics or {}), "mlflow_uri": uri, "mlflow_run_id": run_id,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}
