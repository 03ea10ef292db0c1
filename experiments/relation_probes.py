"""Probes of why relation swaps stay at chance on the synthetic set (issue #13; README, "Relation
swaps: what was tried"). Research instruments, not part of the platform: each answers one
question about `mvptr_demo` and prints its figures.

    # a copy of a synthetic set whose region features carry their relational bag (the oracle)
    python experiments/relation_probes.py oracle-set data/synth data/synth_relbag
    # pre-training on it: the main job's `full` row, regions 54 -> 78 features
    alignlab train mvptr_demo data.shards=data/synth_relbag model.image.region_dim=78

    # ITM asked for the relation alone, scored on the compositional split every 400 steps
    python experiments/relation_probes.py itm data/synth --steps 2000 --seed 0
    python experiments/relation_probes.py itm data/synth_relbag --steps 2000 model.image.region_dim=78
    # the same without the oracle, the model given a pairwise term that can learn the bag itself
    python experiments/relation_probes.py itm data/synth --steps 2000 --relational-messages
    # or MVPTR's relative-geometry term in the visual encoder's attention (heads that look one
    # way, slope 10, the default), over the regions and the tags placed at their regions' boxes
    python experiments/relation_probes.py itm data/synth --steps 2000 model.mvptr.geometry_bias=true \
        model.mvptr.placed_tags=true
    # both inside pre-training: mvptr_demo's own losses on other rows each step (weight 0: alone)
    python experiments/relation_probes.py itm data/synth --steps 1600 --pretraining model.mvptr.geometry_bias=true \
        model.mvptr.placed_tags=true
    # each region's shape handed over (a one-hot before its box), for the term to compare
    python experiments/relation_probes.py shape-set data/synth data/synth_shape
    python experiments/relation_probes.py itm data/synth_shape model.mvptr.geometry_bias=true \
        model.image.region_dim=60

**The relational bag** hands each region the comparison the caption's relation needs: 4 flags
per shape of the set (24 on the synthetic set), one set for each other object of the scene at
(its shape, where it stands relative to this region) by the generator's own rule
(:func:`alignlab.platform.synth.relation` on the box centres). "a circle to the left of a star"
is then true where the star's region has the flag (circle, left of): no layer has to compare two
boxes, only to bind the clause's subject and relation word to the object's region. The flags are
appended to the 54 features in every split (train, test, compositional), so retrieval and the
compositional split are scored on the same oracle features.

**Relation-only ITM**: no other objective; each step takes 32 (``--anchors``) training rows whose caption states
a relation, each beside its hard negative caption (the shards' ``negative_caption``: one
clause's relation word reversed, and its phrase tuple with it) and another row's caption: 96 pairs, binary
cross-entropy on ``match_scores`` (the model's p(match)), AdamW at the preset's rate with a 10%
linear warm-up. A model at chance on the reversed clause that tells every other caption apart
has a loss of (2/3)·ln 2 = 0.462; the prior alone (a third of the pairs match), 0.637.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def copy_with_region_extras(src: Path, dst: Path, extras, width: int, before_box: bool = False) -> None:
    """Copies the synthetic set ``src`` to ``dst`` with ``extras(objects, i)`` (a list of
    ``width`` - REGION_DIM floats) added to region i's features, after them or, with
    ``before_box``, before the 6-d box (which then stays last, as the shard format has it),
    and the manifest's ``region_dim`` raised to ``width``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignlab.platform.synth import SceneObject

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for path in sorted(dst.glob("*/*.parquet")):
        table = pq.read_table(path)
        rows = table.select(["region_features", "boxes", "tags"]).to_pydict()
        features = []
        for feats, boxes, shapes in zip(rows["region_features"], rows["boxes"], rows["tags"]):
            objects = [SceneObject(s, "", "", tuple(b[:4])) for b, s in zip(boxes, shapes)]
            features.append([f[:-6] + extras(objects, i) + f[-6:] if before_box else f + extras(objects, i)
                             for i, f in enumerate(feats)])
        column = pa.array(features, type=pa.list_(pa.list_(pa.float32(), width)))
        pq.write_table(table.set_column(table.schema.get_field_index("region_features"), "region_features", column),
                       path)

    def widen(node):
        if isinstance(node, dict):
            return {k: width if k == "region_dim" else widen(v) for k, v in node.items()}
        return [widen(v) for v in node] if isinstance(node, list) else node

    manifest = dst / "manifest.json"
    manifest.write_text(json.dumps(widen(json.loads(manifest.read_text())), indent=1))


def oracle_set(src: Path, dst: Path) -> int:
    """Copies the synthetic set ``src`` to ``dst`` with each region's relational bag appended to
    its features; returns the new width."""
    from alignlab.platform.synth import OPPOSITE, REGION_DIM, relation

    relations = list(OPPOSITE)
    tags = [t for t in (src / "tags.txt").read_text().split("\n") if t]

    def bag(objects, i):
        flags = np.zeros((len(tags), len(relations)), np.float32)
        for j, other in enumerate(objects):
            if j != i:
                flags[tags.index(other.shape), relations.index(relation(other, objects[i]))] = 1.0
        return flags.reshape(-1).tolist()

    width = REGION_DIM + len(relations) * len(tags)
    copy_with_region_extras(src, dst, bag, width)
    return width


def shape_set(src: Path, dst: Path) -> int:
    """Copies the synthetic set ``src`` to ``dst`` with each region's shape, a one-hot over
    tags.txt, inserted before its box: which region is which, handed over, and no comparison;
    returns the new width."""
    from alignlab.platform.synth import REGION_DIM

    tags = [t for t in (src / "tags.txt").read_text().split("\n") if t]
    width = REGION_DIM + len(tags)
    copy_with_region_extras(src, dst, lambda objects, i: [float(objects[i].shape == t) for t in tags], width,
                       before_box=True)
    return width


def with_relational_messages(embeddings, hidden: int):
    """``embeddings`` (a :class:`RegionEmbeddings`) plus a learned relational bag: each region
    adds the sum, over the image's other regions, of an MLP of that region's crop cells and its
    box centre's offset from this one's (a Relation Network's pairwise term, Santoro et al. 2017),
    before the LayerNorm. What the oracle set hands over, learnt from the 54 features instead."""
    import torch
    from torch import nn

    class RelationalMessages(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = embeddings
            # the crop cells (every feature before the 6-d box) and the 2-d centre offset
            self.message = nn.Sequential(nn.Linear(embeddings.proj.in_features - 6 + 2, hidden), nn.GELU(),
                                         nn.Linear(hidden, hidden))

        def forward(self, features):
            crop, box = features[..., :-6], features[..., -6:]
            centre = (box[..., :2] + box[..., 2:4]) / 2
            present = (box[..., 4] > 0).float()  # padded regions are all zeros
            offset = centre[:, None, :, :] - centre[:, :, None, :]  # [b, i, j]: j's centre minus i's
            pairs = torch.cat([crop[:, None].expand(-1, crop.shape[1], -1, -1), offset], -1)
            weight = present[:, None, :] * (1 - torch.eye(crop.shape[1], device=features.device))
            messages = (self.message(pairs) * weight[..., None]).sum(2)
            inner = self.inner
            return inner.dropout(inner.layer_norm(inner.proj(features) + messages))

    return RelationalMessages()


def relation_itm(shards_dir: str, steps: int, seed: int, overrides: list[str], threads: int,
                 relational_messages: bool = False, pretraining: bool = False, relation_weight: float = 1.0,
                 anchors_per_step: int = 32) -> None:
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from alignlab.models.registry import build_model
    from alignlab.platform import ingest, shards
    from alignlab.platform.config import load_config
    from alignlab.platform.evaluate import evaluate_compositional, evaluate_retrieval
    from alignlab.platform.train import prepare, weighted_total

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cfg = load_config("mvptr_demo", [f"data.shards={shards_dir}"] + overrides)
    prepared = prepare(cfg)
    model = build_model(cfg.model, cfg.objectives, prepared.vocab)
    if relational_messages:
        model.region_embeddings = with_relational_messages(model.region_embeddings, cfg.model.hidden_size)
    spec = prepared.spec.input_spec(cfg.model, cfg.objectives)
    uri = shards.child_uri(cfg.data.shards, cfg.data.train_split)
    clean_spec, files = ingest.split_inputs(spec, uri, train=False)
    preprocess = ingest.Preprocessor(cfg.data, cfg.objectives, clean_spec, train=False)
    wanted = set(ingest.columns_for(clean_spec)) | set(shards.NEGATIVE_COLUMNS)
    if pretraining:
        train_spec, _ = ingest.split_inputs(spec, uri, train=True)
        # pre-training's own rows: masked for MLM and MCR, drawn anew each time
        pretraining_rows = ingest.Preprocessor(cfg.data, cfg.objectives, train_spec, train=True, seed=seed)
        wanted |= set(ingest.columns_for(train_spec))
    columns = ingest.read_schema(files, sorted(wanted), uri).names
    rows: dict[str, list] = {c: [] for c in columns}
    for f in files:
        part = pq.read_table(f, columns=columns).to_pydict()
        for c in columns:
            rows[c] += part[c]
    # the shards' hard negative captions: each relation caption with one clause reversed
    with_relation = [i for i, c in enumerate(rows["negative_caption"]) if c]
    print(f"{len(with_relation)} of {len(rows['caption'])} training captions state a relation", flush=True)
    rng = np.random.default_rng(seed)

    def objects(values) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        for j, v in enumerate(values):
            out[j] = v
        return out

    def batch(images: list[int], captions: list[str], phrases: list) -> dict:
        raw = {c: objects([rows[c][i] for i in images]) for c in columns}
        raw.update(caption=objects(captions), phrases=objects(phrases),
                   caption_id=objects([f"pair{j}" for j in range(len(images))]))
        return {k: torch.from_numpy(v) for k, v in preprocess(raw).items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    a = anchors_per_step
    matches = torch.tensor([1.0] * a + [0.0] * 2 * a)
    losses, pre_losses, start = [], [], time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * min(1.0, step / (0.1 * steps))
        anchors = list(rng.choice(with_relation, a, replace=False))
        others = list(rng.choice(len(rows["caption"]), a))
        captions = ([rows["caption"][i] for i in anchors] + [rows["negative_caption"][i] for i in anchors]
                    + [rows["caption"][j] for j in others])
        phrases = ([rows["phrases"][i] for i in anchors] + [rows["negative_phrases"][i] for i in anchors]
                   + [rows["phrases"][j] for j in others])
        model.train()
        loss = torch.zeros(())
        if relation_weight:
            pairs = batch(anchors * 3, captions, phrases)
            p_match = model.match_scores(pairs, pairs).clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(p_match, matches)
            losses.append(loss.item())
            loss = relation_weight * loss
        if pretraining:
            model.begin_step(step - 1, steps)
            chosen = rng.choice(len(rows["caption"]), 32, replace=False)
            raw = {c: objects([rows[c][i] for i in chosen]) for c in columns}
            out = model({k: torch.from_numpy(v) for k, v in pretraining_rows(raw).items()})
            pre_loss = weighted_total(out.losses, cfg.objectives.weights)
            pre_losses.append(pre_loss.item())
            loss = loss + pre_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 400 == 0 or step == steps:
            model.eval()
            scores = evaluate_compositional(model, ingest.local_eval_batches(
                cfg.data, cfg.objectives, spec, cfg.data.compositional_split, 64,
                id_columns=shards.COMPOSITIONAL_COLUMNS), torch.device("cpu"))
            if pretraining:
                ranked = evaluate_retrieval(model, ingest.local_eval_batches(
                    cfg.data, cfg.objectives, spec, cfg.data.eval_split, 64), torch.device("cpu"),
                    max_images=cfg.data.eval_max_images, k_captions=cfg.eval.k_captions, k_images=cfg.eval.k_images)
                print(f"step {step}  pre-training loss (last 100) {np.mean(pre_losses[-100:]):.3f}  "
                      f"Uni-RSUM {ranked['uni_rsum']:.1f}  RSUM {ranked['rsum']:.1f}  "
                      f"ITM wrong count {scores['compo/itm_acc_wrong_count']:.3f}", flush=True)
            print(f"step {step}  loss (last 100) {np.mean(losses[-100:]) if losses else float('nan'):.3f}  "
                  f"relation swaps: ITM {scores['compo/itm_acc_swap_relation']:.3f} "
                  f"uni-modal {scores['compo/uni_acc_swap_relation']:.3f}  "
                  f"attribute swaps: ITM {scores['compo/itm_acc_swap_attribute']:.3f}  {time.time() - start:.0f} s",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    for name, what in (("oracle-set", "each region's relational bag"), ("shape-set", "each region's shape")):
        copy = sub.add_parser(name, help=f"copy a synthetic set with {what}")
        copy.add_argument("src", type=Path)
        copy.add_argument("dst", type=Path)
    itm = sub.add_parser("itm", help="ITM asked for the relation alone")
    itm.add_argument("shards")
    itm.add_argument("--steps", type=int, default=2000)
    itm.add_argument("--seed", type=int, default=0)
    itm.add_argument("--threads", type=int, default=2)
    itm.add_argument("--relational-messages", action="store_true",
                     help="add a learned relational bag to each region's embedding (with_relational_messages)")
    itm.add_argument("--pretraining", action="store_true",
                     help="each step also takes mvptr_demo's pre-training losses on 32 other training rows")
    itm.add_argument("--anchors", type=int, default=32,
                     help="relation captions a step of the relation-only ITM takes (each with its twin and another "
                          "row's caption)")
    itm.add_argument("--relation-weight", type=float, default=1.0,
                     help="the relation-only ITM loss's weight (0: pre-training alone)")
    # mvptr_demo's overrides (KEY=VALUE, e.g. model.image.region_dim=78) anywhere after the probe
    args, overrides = parser.parse_known_args()
    if overrides and (args.probe != "itm" or any("=" not in o or o.startswith("-") for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.probe != "itm":
        width = (oracle_set if args.probe == "oracle-set" else shape_set)(args.src, args.dst)
        print(f"{args.dst}: regions of {width} features; train with model.image.region_dim={width}")
    else:
        if not args.relation_weight and not args.pretraining:
            parser.error("--relation-weight 0 leaves nothing to train: add --pretraining")
        relation_itm(args.shards, args.steps, args.seed, overrides, args.threads, args.relational_messages,
                     args.pretraining, args.relation_weight, args.anchors)


if __name__ == "__main__":
    main()
