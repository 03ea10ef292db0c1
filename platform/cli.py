"""The ``alignlab`` command line."""
from __future__ import annotations

import argparse
import sys

from alignlab.models.inputs import TASKS


def _synth(args: argparse.Namespace) -> None:
    from alignlab.platform.synth import TASK_SIZES, SynthConfig, generate, generate_task

    given = {k: v for k, v in (("n_train_images", args.train_images), ("n_test_images", args.test_images)) if v}
    cfg = SynthConfig(**{**(TASK_SIZES if args.task else {}), **given}, image_size=args.image_size, seed=args.seed,
                      rows_per_file=args.rows_per_file)
    print(generate_task(args.out, args.task, cfg, args.vocab_from) if args.task else generate(args.out, cfg))


def _train(args: argparse.Namespace) -> None:
    from alignlab.platform.config import load_config
    from alignlab.platform.experiment import ensure_synthetic_data
    from alignlab.platform.tracking import runs_page, ui_command
    from alignlab.platform.train import train

    cfg = load_config(args.preset, args.overrides + ([f"tracking.registered_model={args.register_model}"]
                                                     if args.register_model else []))
    ensure_synthetic_data(cfg)
    out = train(cfg)
    for k, v in sorted(out["metrics"].items()):
        if isinstance(v, float):
            print(f"{k:32s} {v:.4f}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"MLflow run {out['mlflow_run_id']}; open the UI with:\n  {ui_command(out['mlflow_uri'])}\n"
          f"and the runs at {runs_page(out['mlflow_uri'], out['mlflow_run_id'])}")


def _sweep(args: argparse.Namespace) -> None:
    import yaml

    from alignlab.platform.config import ConfigError, load_config
    from alignlab.platform.experiment import ensure_synthetic_data
    from alignlab.platform.report import publish_comparison
    from alignlab.platform.sweep import run_sweep
    from alignlab.platform.tracking import runs_page, ui_command

    from alignlab.platform.console import configure_logging

    cfg = load_config(args.preset, args.overrides + ([f"scaling.max_concurrent_trials={args.max_concurrent_trials}"]
                                                     if args.max_concurrent_trials else [])
                      + (["tracking.verbose=true"] if args.verbose else []))
    configure_logging(cfg.tracking.verbose)
    grid = {}
    for g in args.grid:
        if "=" not in g:
            raise ConfigError(f"--grid {g!r} must look like key=v1,v2")
        key, values = g.split("=", 1)
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    ensure_synthetic_data(cfg)
    result = run_sweep(cfg, grid, args.name)
    print(publish_comparison(result, list(grid), [args.metric], f"sweep {args.name}", f"outputs/{args.name}"))
    print(f"open the MLflow UI with:\n  {ui_command(result.mlflow_uri)}\n"
          f"and the runs at {runs_page(result.mlflow_uri, result.parent_run_id)}")


def retrieval_lines(metrics: dict[str, float]) -> list[str]:
    """What `alignlab eval` prints of a retrieval evaluation. An evaluation that did not re-rank
    (a model without an ITM head, such as the reference's dual encoder, or ``eval.rerank=false``)
    logs its one ranking under both names; printing it twice, once as "ITM re-ranked", would read
    as a re-ranker that changed nothing, so it says there was none."""
    lines = [f"{int(metrics['eval_images'])} images, {int(metrics['eval_captions'])} captions scored"]
    reranked = "itm_pairs" in metrics
    rows = [("uni_", "uni-modal")] + ([("", "ITM re-ranked")] if reranked else [])
    for prefix, label in rows:
        if f"{prefix}rsum" in metrics:
            cells = "  ".join(f"{d}_r{k} {metrics[f'{prefix}{d}_r{k}']:.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
            lines.append(f"{label:14s} {cells}  RSUM {metrics[f'{prefix}rsum']:.1f}")
    if not reranked:
        lines.append("not re-ranked (no ITM head, or eval.rerank=false): eval/rsum is the uni-modal ranking")
    return lines


def _eval(args: argparse.Namespace) -> None:
    from alignlab.platform.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.shards, args.split, args.max_images, args.overrides,
                                  mlflow_uri=args.mlflow_uri)
    run_id = metrics.pop("mlflow_run_id", None)
    if "examples" in metrics:  # a fine-tuned task model
        print(f"{int(metrics.pop('examples'))} examples scored")
        for k, v in metrics.items():
            print(f"{k:14s} {v:.2f}")
        if run_id:
            print(f"logged as downstream/<task>/<split>/* in MLflow run {run_id}")
        return
    print("\n".join(retrieval_lines(metrics)))
    if run_id:
        print(f"logged as eval/<split>/* in MLflow run {run_id}")


def _export(args: argparse.Namespace) -> None:
    from alignlab.platform.export import export

    out = export(args.checkpoint, args.out_dir, args.mlflow_uri)
    print(f"exported to {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); load it with:\n"
          f"  from alignlab.models.pretrained import from_pretrained\n"
          f"  from alignlab.platform.export import Processor\n"
          f"  model, processor = from_pretrained({str(out)!r}), Processor.from_pretrained({str(out)!r})")


def _finetune(args: argparse.Namespace) -> None:
    from alignlab.platform.finetune import finetune
    from alignlab.platform.tracking import runs_page, ui_command

    out = finetune(args.task, getattr(args, "from"), args.preset, args.overrides, args.mlflow_uri)
    for k, v in sorted(out["metrics"].items()):
        if k.startswith("downstream/"):
            print(f"{k:40s} {v:.2f}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"MLflow run {out['mlflow_run_id']}" + (f", a child of the pre-training run {out['parent_run_id']}"
                                                 if out["parent_run_id"] else "") +
          f"; open the UI with:\n  {ui_command(out['mlflow_uri'])}\n"
          f"and the runs at {runs_page(out['mlflow_uri'], out['mlflow_run_id'])}")


def _bench(args: argparse.Namespace) -> None:
    from alignlab.platform.bench import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, generate and inspect image-text shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate the embedded synthetic multi-level set")
    synth.add_argument("--out", required=True, help="output directory or URI")
    synth.add_argument("--train-images", type=int, default=0, help="default 2000 (a task: 1500)")
    synth.add_argument("--test-images", type=int, default=0, help="default 200 (a task: 300)")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--rows-per-file", type=int, default=2000)
    synth.add_argument("--task", choices=[t for t in TASKS if t != "retrieval"],
                       help="write this downstream task's synthetic set instead of the pre-training set")
    synth.add_argument("--vocab-from", default="", metavar="DIR",
                       help="with --task: the synthetic pre-training set whose vocabularies the task set shares")
    synth.set_defaults(func=_synth)

    train = sub.add_parser("train", help="one pre-training run (Ray Train) tracked in MLflow")
    train.add_argument("preset", help="a preset under experiments/configs/ or a YAML file")
    train.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=3e-4")
    train.add_argument("--register-model", default="", metavar="NAME",
                       help="register the final model in MLflow's model registry as NAME (tracking.registered_model)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="retrieval of a trained checkpoint on any split, logged to MLflow")
    ev.add_argument("checkpoint", help="a checkpoint directory or an MLflow run id (its 'checkpoint' tag)")
    ev.add_argument("--shards", default="", help="shard set (default: the checkpoint's own)")
    ev.add_argument("--split", default="", help="split to score (default: the checkpoint's data.eval_split)")
    ev.add_argument("--max-images", type=int, default=0, help="gallery size cap (default: the checkpoint's)")
    ev.add_argument("--mlflow-uri", default="", help="store to find a run id in (default: $MLFLOW_TRACKING_URI, "
                                                      "else the local store)")
    ev.add_argument("overrides", nargs="*", help="config overrides such as eval.k_captions=64")
    ev.set_defaults(func=_eval)

    exp = sub.add_parser("export", help="write a checkpoint as a folder anyone can load: config.json, "
                                         "model.safetensors, the tokenizer, the vocabularies and a model card")
    exp.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                     help="a checkpoint directory or an MLflow run id (its 'checkpoint' tag)")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder, or an earlier export to replace")
    exp.add_argument("--mlflow-uri", default="", help="store to find a run id in (default: $MLFLOW_TRACKING_URI, "
                                                       "else the local store)")
    exp.set_defaults(func=_export)

    ft = sub.add_parser("finetune", help="fine-tune a pre-trained checkpoint on a downstream task and evaluate it "
                                         "(Ray Train), as a child of the pre-training run in MLflow")
    ft.add_argument("task", choices=TASKS)
    ft.add_argument("--from", required=True, metavar="CHECKPOINT_OR_RUN",
                    help="a checkpoint directory or an MLflow run id (its 'checkpoint' tag)")
    ft.add_argument("--preset", default="", help="the fine-tuning preset laid over the checkpoint's config "
                                                 "(default: finetune_demo)")
    ft.add_argument("--mlflow-uri", default="", help="store to find a run id in (default: $MLFLOW_TRACKING_URI, "
                                                      "else the local store)")
    ft.add_argument("overrides", nargs="*", help="config overrides such as finetune.shards=data/tasks/{task}")
    ft.set_defaults(func=_finetune)

    sweep = sub.add_parser("sweep", help="a Ray Tune grid of config overrides, one MLflow child run per trial")
    sweep.add_argument("preset")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--grid", action="append", required=True, help="key=v1,v2 (repeatable)")
    sweep.add_argument("--name", required=True, help="sweep name; the same name, config and grid again resumes it")
    sweep.add_argument("--metric", default="eval/uni_rsum")
    sweep.add_argument("--max-concurrent-trials", type=int, default=0, metavar="N",
                       help="run at most N trials at once (default: as many as the cluster holds at its largest)")
    sweep.add_argument("--verbose", action="store_true",
                       help="show Ray's process output and Tune's tables here, not only one line per trial")
    sweep.set_defaults(func=_sweep)

    bench = sub.add_parser("bench", help="speed figures, each measured side by side in one run (platform/bench.py)")
    mode = bench.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU benchmarks of the objectives and evaluation: minutes")
    mode.add_argument("--gpu", action="store_true",
                      help="each architecture's training steps at paper size, and NCCL, on the visible GPUs")
    mode.add_argument("--ray", action="store_true",
                      help="the Ray data path on a local cluster: ingest, epoch boundaries, memory, data wait "
                           "(5-10 minutes on 2 cores)")
    bench.add_argument("--sections", default="",
                       help="with --ray: a comma-separated subset of ingest,epochs,memory,data_wait,leftover,pacing; "
                            "data_wait_flickr8k (not in the default) times the Flickr8k CPU presets on "
                            "data/flickr8k")
    bench.add_argument("--out", help="JSON file for the figures (default: bench-<mode>.json)")
    bench.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16/bf16 peak, for MFU on a GPU the "
                                                        "bench does not know (H200, H100, A100)")
    bench.set_defaults(func=_bench)
    from alignlab.platform.databuild.cli import add_subcommands
    add_subcommands(data_sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, read as ``alignlab finetune TASK --from X [PRESET] [overrides]`` too:
    argparse takes no positionals after an option once it has matched the ones before it, so the
    words after ``--from X`` are the fine-tuning preset (a first word without "=") and overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "finetune" and not any(e.startswith("-") for e in extra):
        if "=" not in extra[0] and not args.preset:
            args.preset, extra = extra[0], extra[1:]
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    from alignlab.platform.checkpoint import CheckpointError
    from alignlab.models.pretrained import ExportError
    from alignlab.platform.config import ConfigError
    from alignlab.platform.shards import ShardFolderError, ShardSchemaError

    args = parse(argv)
    try:
        args.func(args)
    except (ConfigError, ShardSchemaError, ShardFolderError, CheckpointError, ExportError, FileNotFoundError) as e:
        # Start-up errors are the user's to fix: say what is wrong, not where in our code.
        sys.exit(f"alignlab: error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
