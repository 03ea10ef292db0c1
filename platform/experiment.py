"""The shared driver of the experiment scripts (``experiments/*.py``): parse a preset and
overrides, make sure the data exists, run the architecture's named ablation sweeps (its spec's
``ablations``), publish each comparison and say where to look.

Works as plain ``python experiments/X.py`` (a local Ray cluster) and under
``ray job submit --working-dir . -- python experiments/X.py`` (RAY_ADDRESS points at the cluster).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignlab.platform import config as config_lib

# The embedded synthetic set is generated here, and only here, when it is missing.
DEMO_SHARDS = config_lib.DataConfig().shards
# What `--reference` trains when it names no preset: the frozen-feature dual encoder.
REFERENCE_PRESET = "reference_flickr8k"
# The data keys a reference row takes from the experiment's config, so both see the same data.
SHARED_DATA_KEYS = ("shards", "train_split", "eval_split", "compositional_split", "eval_max_images", "max_train_rows")


def ensure_synthetic_data(cfg: config_lib.Config) -> None:
    """Generate the embedded synthetic set when the config points at the demo's own default path
    (``data/synth``) and nothing is there yet, or what is there came from an older generator
    (its manifest's ``generator``). Any other missing shard path is an error that names it: a
    typo must never train on (or write over) other data."""
    from alignlab.platform import shards
    from alignlab.platform.synth import GENERATOR_VERSION, PRODUCER, SynthConfig, generate

    root = cfg.data.shards
    train = shards.child_uri(root, cfg.data.train_split)
    demo = "://" not in root and os.path.abspath(root) == os.path.abspath(DEMO_SHARDS)
    if "://" in root or Path(train).exists():
        manifest = shards.read_manifest(root) if demo else {}
        version = manifest.get("generator", 1)
        if shards.producer_of(manifest) == PRODUCER and version != GENERATOR_VERSION:
            print(f"{root} was written by version {version} of the synthetic generator; writing it again "
                  f"with version {GENERATOR_VERSION} ...", flush=True)
            print(generate(root, SynthConfig()), flush=True)
        return
    if not demo or Path(root).exists():
        raise config_lib.ConfigError(
            f"config key 'data.shards' = {root!r}: no split {cfg.data.train_split!r} there ({train} does not exist); "
            f"build a shard set with `alignlab data build` / `alignlab data synth`, or fix data.shards / "
            f"data.train_split")
    print(f"generating the synthetic data set into {root} ...", flush=True)
    print(generate(root, SynthConfig()), flush=True)


def parse_args(description: str, default_preset: str, sweeps: list[str], argv: list[str] | None = None
               ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, help="a preset under experiments/configs/ or a YAML file")
    parser.add_argument("--name", default="", help="sweep name (re-using one resumes that sweep)")
    parser.add_argument("--seeds", type=int, default=0, help="number of seeds per grid point (0: the script's default)")
    if len(sweeps) > 1:
        parser.add_argument("--only", choices=sweeps, default=None, help="run one of the sweeps")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="run only these values of one of the sweep's axes (repeatable)")
    parser.add_argument("--reference", nargs="?", const="", default=None, metavar="PRESET",
                        help=f"add a reference row: PRESET (default: the preset's eval.reference, else "
                             f"{REFERENCE_PRESET}, the frozen-feature row) trained on the same shards with the same "
                             f"seeds and evaluated on the same split")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the reference row the preset names (eval.reference)")
    parser.add_argument("--readings", default="", metavar="paper,official",
                        help="run every row under each of these readings of the paper (model.<architecture>.reading: "
                             "the paper's text, the official code's choices) and compare them")
    parser.add_argument("--downstream", default="", metavar="vqa,snli_ve,...",
                        help="fine-tune every trial's checkpoint on these tasks (Tune trials of their own; "
                             "models/downstream.py) and add a column per task to the comparison, beside a row "
                             "fine-tuned without pre-training")
    parser.add_argument("--finetune-preset", default="", metavar="PRESET",
                        help="the fine-tuning preset laid over each checkpoint's config (default: finetune_demo)")
    parser.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="a fine-tuning override (repeatable), such as finetune.shards=data/tasks/{task}; the "
                             "positional overrides are the pre-training's")
    parser.add_argument("--max-concurrent-trials", type=int, default=0, metavar="N",
                        help="run at most N trials at once (default: as many as the cluster holds at its largest, "
                             "the autoscaler's maximum on an autoscaling cluster)")
    parser.add_argument("--register-model", default="", metavar="NAME",
                        help="register each trial's final model in MLflow's model registry as a version of NAME "
                             "(tracking.registered_model)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the output of Ray's processes, Ray Data's progress and Tune's status tables here "
                             "(tracking.verbose=true); by default they stay in the Ray session's log files and "
                             "the console shows one line per trial at its log steps")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=3e-4")
    args = parser.parse_args(argv)
    if args.max_concurrent_trials:
        args.overrides.append(f"scaling.max_concurrent_trials={args.max_concurrent_trials}")
    if args.verbose:
        args.overrides.append("tracking.verbose=true")
    if args.register_model:
        args.overrides.append(f"tracking.registered_model={args.register_model}")
    args.only = getattr(args, "only", None) or (sweeps[0] if len(sweeps) == 1 else None)
    if args.grid and args.only is None:
        parser.error(f"--grid restricts one sweep's axis: name that sweep with --only {{{','.join(sweeps)}}}")
    from alignlab.models.inputs import TASKS

    args.downstream = [t for t in args.downstream.split(",") if t]
    unknown = [t for t in args.downstream if t not in TASKS]
    if unknown:
        parser.error(f"--downstream {','.join(unknown)}: not a task; valid choices: {', '.join(TASKS)}")
    return args


def reading_key(cfg: config_lib.Config) -> str:
    """The architecture's ``reading`` switch (#15); fails, naming the key, where it has none."""
    section = getattr(cfg.model, cfg.model.architecture, None)
    if not hasattr(section, "reading"):
        raise SystemExit(f"--readings: model.{cfg.model.architecture} has no 'reading' switch; the architectures "
                         f"with readings name it in their config section")
    return f"model.{cfg.model.architecture}.reading"


def restrict_grid(grid: dict[str, tuple], choices: list[str]) -> dict[str, list]:
    """``grid`` with the axes named in ``choices`` (``KEY=V1,V2``) cut to those values, e.g. a
    subset of ablation rows on a small budget. Values keep the type of the axis's own values."""
    grid = {k: list(v) for k, v in grid.items()}
    for choice in choices:
        key, sep, values = choice.partition("=")
        if not sep or key not in grid:
            raise SystemExit(f"--grid {choice!r}: expected KEY=V1,V2 with KEY one of this sweep's axes "
                             f"{sorted(grid)}")
        kind = type(grid[key][0])
        try:
            picked = [kind(v) for v in values.split(",") if v]
        except ValueError as e:
            raise SystemExit(f"--grid {choice!r}: {e}") from None
        unknown = [v for v in picked if v not in grid[key]]
        if unknown or not picked:
            raise SystemExit(f"--grid {choice!r}: {unknown or 'no values'}; the sweep's values of {key} are "
                             f"{grid[key]}")
        grid[key] = picked
    return grid


def chance_levels(result, metrics: list[str]) -> dict[str, float]:
    """What a random scorer gets on each metric, from the evaluated gallery's size: RSUM of a
    random ranking, R@k, and 0.5 for the pairwise compositional accuracies."""
    from alignlab.platform.evaluate import chance_recall

    done = [t.metrics for t in result.trials if not t.error and "eval/eval_images" in t.metrics]
    out: dict[str, float] = {}
    if done:
        n_img, n_txt = done[0]["eval/eval_images"], done[0]["eval/eval_captions"]
        random = chance_recall(int(n_img), n_txt / n_img)
        out = {m: random[m.rsplit("/", 1)[-1].removeprefix("uni_")] for m in metrics
               if m.rsplit("/", 1)[-1].removeprefix("uni_") in random}
    out.update({m: 0.5 for m in metrics if "/compo/" in m and "_acc_" in m})
    return out


def reference_preset(args: argparse.Namespace, cfg: config_lib.Config) -> str:
    """The reference row's preset: the one `--reference PRESET` names; for a bare `--reference`,
    the preset's own (eval.reference) or else the frozen-feature row; without the flag, the
    preset's own unless `--no-reference`."""
    if args.reference is None:
        return "" if args.no_reference else cfg.eval.reference
    return args.reference or cfg.eval.reference or REFERENCE_PRESET


def reference_config(cfg: config_lib.Config, preset: str) -> config_lib.Config:
    """The reference preset on ``cfg``'s data (:data:`SHARED_DATA_KEYS`), MLflow experiment and
    store, its trials as many at once as the experiment's."""
    shared = [f"data.{k}={getattr(cfg.data, k)}" for k in SHARED_DATA_KEYS]
    shared += [f"tracking.{k}={getattr(cfg.tracking, k)}" for k in ("experiment", "mlflow_uri", "storage_path")
               if getattr(cfg.tracking, k)]
    if cfg.scaling.max_concurrent_trials:
        shared.append(f"scaling.max_concurrent_trials={cfg.scaling.max_concurrent_trials}")
    return config_lib.load_config(preset, shared)


def reference_rows(cfg: config_lib.Config, preset: str, seeds: list[int], name: str) -> dict[str, list[dict]]:
    """Trains the reference preset (:func:`reference_config`) over ``seeds``, as a sweep of its
    own, and returns its metrics as an external row of the comparison."""
    from alignlab.platform.sweep import run_sweep

    result = run_sweep(reference_config(cfg, preset), {"seed": seeds}, f"{name}-reference")
    for t in result.trials:
        if t.error:
            print(f"reference trial {t.overrides} failed: {t.error}")
    return {f"reference: {preset}": [t.metrics for t in result.trials if not t.error]}


def run_experiment(description: str, default_preset: str, metrics: list[str], argv: list[str] | None = None,
                   seeds: int = 1) -> list[dict[str, Any]]:
    """Runs the preset's architecture's ablation sweeps (its spec's ``ablations``; ``--only`` picks
    one), each grid point over ``seeds`` seeds, and publishes the comparison of ``metrics`` for
    each. Returns, per sweep, the sweep result and the Markdown table."""
    import ray

    from alignlab.models.registry import get_spec
    from alignlab.platform.console import configure_logging
    from alignlab.platform.sweep import publish_comparison, run_sweep
    from alignlab.platform.tracking import alignlab_home, runs_page, ui_command
    from alignlab.platform.train import init_ray, local_cluster_cpus

    # The preset decides the architecture, and so which sweeps exist: read it before the rest.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default_preset)
    known, _ = pre.parse_known_args(argv)
    preset_cfg = config_lib.load_config(known.preset)
    sweeps = dict(get_spec(preset_cfg.model.architecture).ablations(preset_cfg))
    args = parse_args(description, default_preset, list(sweeps), argv)
    cfg = config_lib.load_config(args.preset, args.overrides)
    configure_logging(cfg.tracking.verbose)
    sweeps = dict(get_spec(cfg.model.architecture).ablations(cfg))  # sizes may come from the overrides
    ensure_synthetic_data(cfg)
    owns_ray = not ray.is_initialized()  # a cluster this process joined before (a notebook's, a test's) stays up
    n_seeds = args.seeds or seeds
    seed_values = [cfg.seed + i for i in range(n_seeds)]
    reference = reference_preset(args, cfg)
    # One local cluster for all the sweeps below, with the slots of the largest of their trials:
    # sized by the first sweep alone (the reference row's), a later sweep's larger trial (two
    # threads a worker where the reference takes one) would wait for slots that never come.
    sized_for = [cfg] + ([reference_config(cfg, reference)] if reference else [])
    init_ray(max(sized_for, key=local_cluster_cpus), quiet=not cfg.tracking.verbose)
    external = reference_rows(cfg, reference, seed_values, args.name or Path(args.preset).stem) \
        if reference else None
    outputs = []
    chosen = [n for n in sweeps if args.only in (None, n)]
    for sweep_name, ablation in sweeps.items():
        if sweep_name not in chosen:
            continue
        grid = restrict_grid(dict(ablation.grid), args.grid if args.only == sweep_name else [])
        if n_seeds > 1:
            grid["seed"] = seed_values
        name = (args.name or f"{Path(args.preset).stem}-{cfg.model.architecture}") + \
            (f"-{sweep_name}" if len(sweeps) > 1 else "")
        readings = [r for r in args.readings.split(",") if r]
        if readings:
            grid[reading_key(cfg)] = readings
        result = run_sweep(cfg, grid, name)
        table_metrics, table_external, downstream_chance = list(metrics), dict(external or {}), {}
        if args.downstream:
            from alignlab.platform.finetune import headline_metric, run_downstream

            figures = run_downstream(result, cfg, args.downstream, name, args.finetune_preset, args.finetune)
            for t in result.trials:
                t.metrics.update(figures.by_run.get(t.mlflow_run_id, {}))
            table_metrics += [headline_metric(task) for task in args.downstream]
            if figures.scratch:
                table_external["fine-tuned without pre-training"] = [figures.scratch]
            if figures.majority:
                table_external["baseline: the most frequent train answer"] = [figures.majority]
            downstream_chance = figures.chance
        if sweep_name == chosen[-1] and owns_ray:
            # The cluster's work is done: leaving it now prints whatever Ray still has to say
            # (a raylet's warning arrives late) above the tables, which stay the last lines.
            ray.shutdown()
        # Files for the driver's printout; the durable copies are the parent run's artifacts.
        out_dir = alignlab_home() / "outputs" / name
        claims = [c for c in ablation.claims if c[3] in metrics and
                  {c[1], c[2]} <= {str(v) for v in grid[ablation.group_by]}]
        markdown = ""
        for reading in readings or [None]:
            part = replace(result, trials=[t for t in result.trials
                                           if reading is None or t.overrides.get(reading_key(cfg)) == reading])
            md = publish_comparison(part, [ablation.group_by], table_metrics, ablation.title,
                                    str(out_dir / (reading or "")), ablation.group_by if ablation.line else None,
                                    reference=ablation.reference if ablation.reference in map(str, grid[ablation.group_by])
                                    else None, chance={**chance_levels(part, metrics), **downstream_chance},
                                    external=table_external or None, claims=claims, artifact_path=reading)
            print(f"\n## {ablation.title}" + (f", reading: {reading}" if reading else "") + f"\n\n{md}")
            markdown += md
        if len(readings) > 1:
            # Every row and seed under each reading, paired: does the reading change the figures?
            md = publish_comparison(result, [reading_key(cfg)], metrics, f"{ablation.title}: readings",
                                    str(out_dir / "readings"), reference=readings[0],
                                    chance=chance_levels(result, metrics), artifact_path="readings")
            print(f"\n## {ablation.title}: readings, paired over rows and seeds\n\n{md}")
            markdown += md
        for t in result.trials:
            if t.error:
                print(f"trial {t.overrides} failed: {t.error}")
        if n_seeds < seeds:
            noise = ("no difference between rows can be told from seed noise" if n_seeds < 2 else
                     "the 95% intervals are wider than with more seeds")
            print(f"{n_seeds} seed(s) per row, fewer than this script's default of {seeds} (--seeds {n_seeds}): "
                  f"{noise}; run without --seeds for {seeds}.")
        print(f"MLflow parent run {result.parent_run_id} in {result.mlflow_uri}")
        print(f"comparison artifacts: {out_dir}")
        print(f"open the MLflow UI with:\n  {ui_command(result.mlflow_uri)}\n"
              f"and the runs at {runs_page(result.mlflow_uri, result.parent_run_id)}")
        outputs.append({"result": result, "markdown": markdown})
    return outputs
