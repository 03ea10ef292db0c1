"""``alignlab data stats``: what a shard set holds — rows and images per split, caption lengths,
the most frequent phrase concepts (MVPTR §3.1) and tags, regions per image — as Markdown + PNG.

Reads only the text and annotation columns (never the image bytes), one file at a time.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from alignlab.platform.shards import PAIR_SUFFIX, WHOLE_IMAGE_TAG, concept_key, filesystem, list_parquet

LENGTH_BINS = (0, 5, 10, 15, 20, 25, 30, 40, 60, 100, 10**9)


@dataclass
class ShardStats:
    rows: Counter = field(default_factory=Counter)  # per split
    images: dict[str, set] = field(default_factory=dict)  # per split
    caption_words: list[int] = field(default_factory=list)
    concepts: Counter = field(default_factory=Counter)  # sentences containing each tuple
    tags: Counter = field(default_factory=Counter)  # images showing each tag
    regions_per_image: dict[str, int] = field(default_factory=dict)

    def length_histogram(self) -> list[tuple[str, int]]:
        counts, _ = np.histogram(self.caption_words, bins=LENGTH_BINS)
        labels = [f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:])]
        return list(zip(labels, counts.tolist()))


def collect(uri: str) -> ShardStats:
    fs, _ = filesystem(uri)
    st = ShardStats()
    seen_tags: set[str] = set()
    for f in list_parquet(uri):
        names = set(pq.read_schema(f, filesystem=fs).names)
        # An NLVR2 row's second image counts as an image of its own.
        suffixes = [s for s in ("", PAIR_SUFFIX) if f"image_id{s}" in names]
        cols = ["caption", "split"] + (["phrases"] if "phrases" in names else []) \
            + [f"{c}{s}" for s in suffixes for c in ("image_id", "tags") if f"{c}{s}" in names]
        t = pq.read_table(f, columns=cols, filesystem=fs).to_pydict()
        for i, (caption, split) in enumerate(zip(t["caption"], t["split"])):
            st.rows[split] += 1
            st.caption_words.append(len(caption.split()))
            if "phrases" in t:
                st.concepts.update({concept_key(p) for p in t["phrases"][i]})
            for s in suffixes:
                image_id = t[f"image_id{s}"][i]
                st.images.setdefault(split, set()).add(image_id)
                if f"tags{s}" in t and image_id not in seen_tags:
                    seen_tags.add(image_id)
                    # The whole-image box is no detection: it would hide the images a detector missed.
                    detected = [tag for tag in t[f"tags{s}"][i] if tag != WHOLE_IMAGE_TAG]
                    st.tags.update(set(detected))
                    st.regions_per_image[image_id] = len(detected)
    return st


def render(st: ShardStats, uri: str, out_dir: str, top: int = 20) -> tuple[str, str]:
    """Write ``stats.md`` and ``stats.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Shard statistics: `{uri}`", "", "| split | rows | images |", "| --- | ---: | ---: |"]
    for split in sorted(st.rows):
        lines.append(f"| {split} | {st.rows[split]} | {len(st.images[split])} |")
    lines.append(f"| **all** | {sum(st.rows.values())} | {sum(len(s) for s in st.images.values())} |")
    words = np.array(st.caption_words or [0])
    lines += ["", f"## Caption length (words): mean {words.mean():.1f}, median {np.median(words):.0f}, "
              f"max {words.max()}", "", "| words | captions |", "| --- | ---: |"]
    lines += [f"| {label} | {n} |" for label, n in st.length_histogram()]
    if st.concepts:
        lines += ["", f"## Top {top} phrase concepts (sentences)", "", "| concept | sentences |", "| --- | ---: |"]
        lines += [f"| {c} | {n} |" for c, n in st.concepts.most_common(top)]
    if st.tags:
        per = np.array(list(st.regions_per_image.values()))
        lines += ["", f"## Detected regions per image: mean {per.mean():.1f}, min {per.min()}, max {per.max()}, "
                  f"images without a detection {(per == 0).sum()}", "",
                  f"## Top {top} tags (images)", "", "| tag | images |", "| --- | ---: |"]
        lines += [f"| {t} | {n} |" for t, n in st.tags.most_common(top)]
    md = os.path.join(out_dir, "stats.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    panels = [("caption length (words)", st.length_histogram())]
    if st.concepts:
        panels.append((f"top {top} concepts", st.concepts.most_common(top)))
    if st.tags:
        panels.append((f"top {top} tags", st.tags.most_common(top)))
        hist = Counter(st.regions_per_image.values())
        panels.append(("regions per image", sorted(hist.items())))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, items) in zip(axes[0], panels):
        labels = [str(k) for k, _ in items]
        ax.bar(range(len(items)), [v for _, v in items])
        ax.set_xticks(range(len(items)), labels, rotation=70, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    png = os.path.join(out_dir, "stats.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return md, png
