"""Ray Train pre-training: DDP over ``scaling.num_workers`` workers, fp16 autocast + GradScaler on
CUDA (bf16 or fp32 elsewhere), AdamW with warm-up and decay, gradient accumulation and clipping,
checkpoints every ``tracking.checkpoint_every`` steps and at the end, and resume.

Resume: every checkpoint holds model, optimiser, scheduler, scaler, step and epoch. A worker
failure restarts the workers (``FailureConfig``) from the latest checkpoint; a killed driver
resumes the same way when the same command is run again, because the Train run name is derived
from the resolved config (``tracking.run_name`` overrides it) and Ray Train V2 restores a run
whose name and storage it finds. The step count and learning-rate schedule continue from the
checkpoint; the data stream restarts its epoch (a streaming order cannot be rewound).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from alignlab.platform import config as config_lib
from alignlab.platform.config import Config, OptimConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


# --------------------------------------------------------------------------------------------
# Pieces of the loop, usable without Ray
# --------------------------------------------------------------------------------------------


def lr_multiplier(step: int, optim: OptimConfig) -> float:
    """LR / peak LR at ``step``: linear warm-up from 0, then linear or cosine decay to
    ``min_lr`` at ``max_steps`` (MVPTR §4.1: warm-up, then linear decay to 0; SIMLA: cosine to
    1e-5)."""
    warmup = optim.warmup_steps or int(optim.warmup_ratio * optim.max_steps)
    floor = optim.min_lr / optim.lr if optim.lr else 0.0
    if warmup and step < warmup:
        return step / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, optim.max_steps - warmup))
    if optim.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' padding-free 1-d tensors and temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "log_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision actually used, checked against the device."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision.precision = 'fp16' needs a CUDA device (autocast + GradScaler); "
                         "valid choices on CPU: 'bf16', 'fp32', 'auto'")
    return precision


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ w_k L_k (MVPTR eq. 5, SIMLA eq. 10); an objective without a configured weight counts 1."""
    return sum(weights.get(k, 1.0) * v for k, v in losses.items())


def run_key(cfg: Config) -> str:
    """A stable Train run name: the same resolved config resumes the same run."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    digest = hashlib.sha1(config_lib.dump_yaml(cfg).encode()).hexdigest()[:10]
    return f"{cfg.model.architecture}-{digest}"


# --------------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from alignlab.models.base import Vocab
    from alignlab.models.registry import build_model
    from alignlab.platform.evaluate import evaluate_retrieval
    from alignlab.platform.tracking import RunLogger

    cfg = config_lib.from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray starts workers with one OpenMP thread whatever they hold; a CPU worker that holds
        # scaling.cpus_per_worker cores should compute on all of them.
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    precision = resolve_precision(cfg.precision.precision, device)
    autocast = autocast_factory(precision, device)

    torch.manual_seed(cfg.seed)
    raw = build_model(cfg.model, cfg.objectives, Vocab(**loop_config["vocab"]))
    model = ray.train.torch.prepare_model(
        raw, parallel_strategy_kwargs={"find_unused_parameters": getattr(raw, "find_unused_parameters", False)})
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.optim))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch = state["step"], state["epoch"]
        log.info("rank %d resumed from step %d (epoch %d)", rank, step, epoch)

    logger = RunLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    counter = loop_config.get("counter")
    if logger:
        logger.log_metrics({"train/resumed_from_step": float(step)}, step)
    local_batch = cfg.data.batch_size // world
    steps_per_epoch = max(1, loop_config["steps_per_epoch"])
    shard = ray.train.get_dataset_shard("train")

    def save_and_report(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "step": step, "epoch": epoch, "config": loop_config["cfg"]}, Path(d) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if rank == 0:
            batches = ray.train.get_dataset_shard("eval").iter_torch_batches(batch_size=cfg.data.eval_batch_size)
            metrics = {f"eval/{k}": v for k, v in evaluate_retrieval(
                raw, batches, device, max_images=cfg.data.eval_max_images, k_captions=cfg.eval.k_captions,
                k_images=cfg.eval.k_images, rerank_itm=cfg.eval.rerank, autocast=autocast).items()}
            logger.log_metrics(metrics, step)
        if world > 1:
            dist.barrier()
        return metrics

    model.train()
    window = {"samples": 0, "wait": 0.0, "start": time.perf_counter()}
    # Per key: (sum over steps, number of steps that produced it). A loss present in only some
    # steps (SemVLP's per-mode losses) is averaged over those steps, not diluted by the others.
    sums: dict[str, tuple[float, int]] = {}
    last_metrics: dict[str, float] = {}
    while step < cfg.optim.max_steps:
        batches = iter(shard.iter_torch_batches(batch_size=local_batch, drop_last=True, device=device,
                                                prefetch_batches=cfg.data.prefetch_batches,
                                                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None))
        while step < cfg.optim.max_steps:
            raw.begin_step(step, steps_per_epoch)
            step_sums = _accumulate(model, batches, cfg, world, local_batch, scaler, autocast, window)
            if step_sums is None:  # epoch exhausted; a partial accumulation is dropped, not stepped
                optimizer.zero_grad(set_to_none=True)
                epoch += 1
                break
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            for k, v in step_sums.items():
                total, count = sums.get(k, (0.0, 0))
                sums[k] = (total + v, count + 1)
            if step == cfg.optim.max_steps:
                break
            logged = step % cfg.tracking.log_every == 0
            if logged:
                last_metrics = _window_metrics(sums, window, world, device)
                last_metrics.update({"lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                                     "train/step": float(step)})
                if counter is not None and rank == 0:
                    last_metrics.update(_skip_metrics(counter))
                if logger:
                    logger.log_metrics(last_metrics, step)
                sums, window = {}, {"samples": 0, "wait": 0.0, "start": time.perf_counter()}
            if cfg.tracking.eval_every and step % cfg.tracking.eval_every == 0:
                last_metrics.update(evaluate())
            # Every rank reports at the same steps: ray.train.report is a barrier.
            if step % cfg.tracking.checkpoint_every == 0:
                save_and_report(last_metrics)
            elif logged:
                ray.train.report(last_metrics)
    final = _window_metrics(sums, window, world, device) if sums else {}
    final.update({"lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch, "train/step": float(step)})
    if counter is not None and rank == 0:
        final.update(_skip_metrics(counter))
    if logger:
        logger.log_metrics(final, step)
    final.update(evaluate())
    save_and_report(final)


def _accumulate(model, batches, cfg: Config, world: int, local_batch: int, scaler, autocast, window: dict
                ) -> dict[str, float] | None:
    """Forward/backward over ``grad_accum`` micro-batches (DDP syncs gradients only on the last).
    Returns the step's mean losses, or None when the epoch ran out first."""
    out_sums: dict[str, float] = {}
    accum = cfg.optim.grad_accum
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(batches, None)
        window["wait"] += time.perf_counter() - t0
        if batch is None:
            return None
        last = micro == accum - 1
        with (contextlib.nullcontext() if last or world == 1 else model.no_sync()):
            with autocast():
                out = model(batch)
                total = weighted_total(out.losses, cfg.objectives.weights)
            scaler.scale(total / accum).backward()
        window["samples"] += local_batch * world
        for k, v in out.losses.items():
            out_sums[f"loss/{k}"] = out_sums.get(f"loss/{k}", 0.0) + v.item() / accum
        out_sums["loss/total"] = out_sums.get("loss/total", 0.0) + total.item() / accum
        for k, v in out.metrics.items():
            out_sums[f"model/{k}"] = out_sums.get(f"model/{k}", 0.0) + float(v) / accum
    return out_sums


def _skip_metrics(counter) -> dict[str, float]:
    import ray

    snapshot = ray.get(counter.snapshot.remote())
    skipped = snapshot["counts"]
    out = {f"data/skipped_{k}": float(v) for k, v in skipped.items()}
    out["data/skipped_total"] = float(sum(skipped.values()))
    # Notes are rows kept with a flaw: logged apart, never in the skipped total.
    out.update({f"data/{k}": float(v) for k, v in snapshot["notes"].items()})
    return out


def _window_metrics(sums: dict[str, tuple[float, int]], window: dict, world: int, device: torch.device
                    ) -> dict[str, float]:
    """Means over the logging window, averaged across workers so rank 0 logs the global view."""
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k][0] / sums[k][1] for k in keys], dtype=torch.float64, device=device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(values)
        values /= world
    out = {k: float(v) for k, v in zip(keys, values.tolist())}
    elapsed = max(1e-9, time.perf_counter() - window["start"])
    out["throughput/samples_per_s"] = window["samples"] / elapsed
    out["time/data_wait_fraction"] = min(1.0, window["wait"] / elapsed)
    return out


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def init_ray(cfg: Config | None = None) -> None:
    """Join the cluster this process runs on (``ray job submit`` sets RAY_ADDRESS), or start a
    local one, with enough logical CPUs for the workers and the data stages
    (:func:`local_cluster_cpus`): Ray schedules by slots, and on a 2-core laptop or CI machine the
    stages would otherwise wait on the workers' slots."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, configure_logging=False)
    else:
        ray.init(num_cpus=local_cluster_cpus(cfg), runtime_env=env, configure_logging=False,
                 include_dashboard=False)


def local_cluster_cpus(cfg: Config | None) -> int:
    """Logical CPUs of a local cluster: the machine's, and at least the train workers' CPUs plus
    5 slots: a Tune trial's, and a Parquet read and a preprocessing actor for each of the train
    and eval datasets. The train pipeline keeps its actor until its epoch ends, even when
    training stops mid-epoch, so without the eval pipeline's own slots the final evaluation
    would wait for the rest of the epoch to be preprocessed."""
    workers = 0 if cfg is None else math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    return max(os.cpu_count() or 1, workers + 5)


def prepare(cfg: Config) -> dict[str, Any]:
    """Driver-side work shared by a single run and every sweep trial: schema validation, the
    vocabulary summary and the epoch length."""
    from alignlab.models.registry import check_objectives, model_class
    from alignlab.models.base import Vocab
    from alignlab.platform import ingest, shards
    from alignlab.platform.tokenization import load_tokenizer, vocab_info

    check_objectives(cfg.model.architecture, cfg.objectives.weights)
    train_uri = shards.child_uri(cfg.data.shards, cfg.data.train_split)
    shards.validate_shards(train_uri)
    shards.validate_shards(shards.child_uri(cfg.data.shards, cfg.data.eval_split))
    vocab: Vocab = vocab_info(load_tokenizer(cfg.data.tokenizer, cfg.data.shards), cfg.data.shards)
    rows = ingest.count_rows(train_uri)
    if cfg.data.max_train_rows:
        rows = min(rows, cfg.data.max_train_rows)
    return {"vocab": asdict(vocab), "steps_per_epoch": rows // (cfg.data.batch_size * cfg.optim.grad_accum),
            "train_rows": rows, "model_class": model_class(cfg.model.architecture)}


def fit(cfg: Config, mlflow_uri: str, mlflow_run_id: str, storage_path: str | None = None, name: str | None = None,
        callbacks: list | None = None):
    """Runs one Ray Train job; returns its ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignlab.models.base import InputSpec
    from alignlab.platform import ingest

    init_ray(cfg)
    cfg = config_lib.with_absolute_paths(cfg)
    info = prepare(cfg)
    spec: InputSpec = info["model_class"].input_spec(cfg.model, cfg.objectives)
    counter = ingest.make_counter()
    datasets = {
        "train": ingest.build_dataset(cfg.data, cfg.objectives, spec, cfg.data.train_split, train=True,
                                      counter=counter, seed=cfg.seed),
        "eval": ingest.build_dataset(cfg.data, cfg.objectives, spec, cfg.data.eval_split, train=False,
                                     counter=counter, seed=cfg.seed),
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_lib.to_dict(cfg), "vocab": info["vocab"],
                           "steps_per_epoch": info["steps_per_epoch"], "mlflow_uri": mlflow_uri,
                           "mlflow_run_id": mlflow_run_id, "counter": counter},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name or run_key(cfg),
            storage_path=storage_path or cfg.tracking.storage_path or str(Path.cwd() / "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.tracking.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def train(cfg: Config, parent_run_id: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """A single pre-training run, tracked in MLflow. Returns the final metrics and locations."""
    from alignlab.platform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri)
    key = run_key(cfg)
    run_id = _find_or_create_run(uri, cfg, key, parent_run_id, run_name)
    logger = open_run(uri, run_id, cfg)
    result = fit(cfg, uri, run_id, name=key)
    close_run(logger, result)
    return {"metrics": dict(result.metrics or {}), "mlflow_uri": uri, "mlflow_run_id": run_id,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


def open_run(uri: str, run_id: str, cfg: Config, extra_params: dict | None = None):
    """A logger on the run with the flattened resolved config, git commit and package versions
    as params, and the resolved config YAML as an artifact."""
    from alignlab.platform.tracking import RunLogger, environment_params

    logger = RunLogger(uri, run_id)
    logger.log_params({**config_lib.flatten(config_lib.to_dict(cfg)), **environment_params(), **(extra_params or {})})
    logger.log_text(config_lib.dump_yaml(cfg), "config.yaml")
    return logger


def close_run(logger, result) -> None:
    """Marks the MLflow run finished (recording where its checkpoint is) or failed (re-raising)."""
    if result.error:
        logger.finish("FAILED")
        raise result.error
    if result.checkpoint:
        logger.set_tag("checkpoint", result.checkpoint.path)
        logger.log_text(result.checkpoint.path + "\n", "checkpoint_location.txt")
    logger.finish()


def _find_or_create_run(uri: str, cfg: Config, key: str, parent_run_id: str | None, run_name: str | None) -> str:
    """The unfinished MLflow run of this Train run name (a resumed run keeps logging into it),
    or a new one."""
    from alignlab.platform.tracking import find_or_create_run

    run_id, _ = find_or_create_run(uri, cfg.tracking.experiment, {"alignlab.run_key": key}, run_name or key,
                                   parent_run_id, include_finished=False)
    return run_id
