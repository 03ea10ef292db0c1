"""The shared driver of the experiment scripts (``experiments/*.py``): parse a preset and
overrides, make sure the data exists, run the sweep, publish the comparison and say where to look.

Works as plain ``python experiments/X.py`` (a local Ray cluster) and under
``ray job submit --working-dir . -- python experiments/X.py`` (RAY_ADDRESS points at the cluster).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from alignlab.platform import config as config_lib
from alignlab.platform import shards


def ensure_synthetic_data(cfg: config_lib.Config) -> None:
    """Generate the embedded synthetic set when a local shard path is configured but empty (the
    demo presets point at data/synth)."""
    root = cfg.data.shards
    if "://" in root or (Path(root) / cfg.data.train_split).exists():
        return
    from alignlab.platform.synth import SynthConfig, generate

    print(f"generating the synthetic data set into {root} ...", flush=True)
    print(generate(root, SynthConfig()), flush=True)


def parse_args(description: str, default_preset: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default=default_preset, help="a preset under experiments/configs/ or a YAML file")
    parser.add_argument("--name", default="", help="sweep name (re-using one resumes that sweep)")
    parser.add_argument("--seeds", type=int, default=0, help="number of seeds per grid point (0: the script's default)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="run only these values of one of the sweep's axes (repeatable)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=3e-4")
    return parser.parse_args(argv)


def restrict_grid(grid: dict[str, list], choices: list[str]) -> dict[str, list]:
    """``grid`` with the axes named in ``choices`` (``KEY=V1,V2``) cut to those values, e.g. a
    subset of ablation rows on a small budget. Values keep the type of the axis's own values."""
    grid = dict(grid)
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


def run_experiment(description: str, default_preset: str, grid: dict[str, list], group_by: list[str],
                   metrics: list[str], title: str, argv: list[str] | None = None, seeds: int = 1,
                   name_suffix: str = "", line_x: str | None = None) -> dict[str, Any]:
    """Sweep ``grid`` (× ``seed`` over ``seeds`` seeds) on the preset and publish the comparison of
    ``metrics`` grouped by ``group_by`` (and a line plot against ``line_x``, a numeric key).
    ``name_suffix`` tells apart several sweeps of one script (a re-used name resumes a sweep).
    Returns the sweep result and the Markdown table."""
    from alignlab.platform.sweep import publish_comparison, run_sweep
    from alignlab.platform.tracking import ui_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(description, default_preset, argv)
    cfg = config_lib.load_config(args.preset, args.overrides)
    grid = restrict_grid(grid, args.grid)
    n_seeds = args.seeds or seeds
    if n_seeds > 1:
        grid = {**grid, "seed": [cfg.seed + i for i in range(n_seeds)]}
    ensure_synthetic_data(cfg)
    name = (args.name or f"{Path(args.preset).stem}-{cfg.model.architecture}") + name_suffix
    result = run_sweep(cfg, grid, name)
    # Local files for the driver's printout; the durable copies are the parent run's artifacts.
    out_dir = os.path.join("outputs", name)
    markdown = publish_comparison(result, group_by, metrics, title, out_dir, line_x)
    print(f"\n## {title}\n\n{markdown}")
    failed = [t for t in result.trials if t.error]
    for t in failed:
        print(f"trial {t.overrides} failed: {t.error}")
    print(f"MLflow parent run {result.parent_run_id} in {result.mlflow_uri}")
    print(f"comparison artifacts: {out_dir}")
    print(f"open the MLflow UI with:\n  {ui_command(result.mlflow_uri)}")
    return {"result": result, "markdown": markdown}
