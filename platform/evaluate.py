"""Image-text retrieval evaluation (MVPTR §4.2): uni-modal retrieval by cosine similarity of the
global embeddings, and re-ranked retrieval where the top ``k_captions`` captions per image and
the top ``k_images`` images per caption are re-scored by the multi-modal ITM head.

Re-ranking runs N_images·k_c + N_captions·k_i multi-modal forward passes, never N², so it scales
to the 5K-image COCO test set.

Compositional evaluation (ARO / Winoground style, :func:`evaluate_compositional`): on a split of
candidate captions (see :mod:`alignlab.platform.shards`), how often an image's true caption scores
above each of its perturbations, per perturbation type, by both scorers.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import numpy as np
import torch

from alignlab.platform.shards import CANDIDATE_TYPES

KS = (1, 5, 10)


def ranks_i2t(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """For each image (row), the 0-based rank of its best-ranked ground-truth caption.
    ``caption_image[j]`` is the image index of caption j."""
    order = scores.argsort(dim=1, descending=True)
    hits = caption_image[order] == torch.arange(scores.shape[0], device=scores.device)[:, None]
    return hits.float().argmax(dim=1)


def ranks_t2i(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """For each caption (column of the image×caption ``scores``), the rank of its image."""
    order = scores.t().argsort(dim=1, descending=True)
    return (order == caption_image[:, None]).float().argmax(dim=1)


def recall_metrics(scores: torch.Tensor, caption_image: torch.Tensor, prefix: str = "",
                   scores_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 in both directions (in %) and RSUM, their sum, as the papers report them.
    ``scores_t2i`` (image×caption) ranks images per caption when it differs from ``scores``
    (re-ranking re-scores each direction's own top-k)."""
    r_i2t = ranks_i2t(scores, caption_image)
    r_t2i = ranks_t2i(scores if scores_t2i is None else scores_t2i, caption_image)
    out = {}
    # From integer counts: a float32 mean put equal rankings' RSUMs 3e-6 apart (a "-0.00" row).
    for k in KS:
        out[f"{prefix}i2t_r{k}"] = 100.0 * int((r_i2t < k).sum()) / len(r_i2t)
        out[f"{prefix}t2i_r{k}"] = 100.0 * int((r_t2i < k).sum()) / len(r_t2i)
    out[f"{prefix}rsum"] = sum(out[f"{prefix}{d}_r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def rerank(scores: torch.Tensor, k_captions: int, k_images: int,
           match: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 256
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Re-score the uni-modal top-k by ``match(image_idx, caption_idx) -> score`` per pair.

    Returns (i2t scores, t2i scores, both image×caption, and the number of pairs scored).
    Re-scored candidates are shifted above every uni-modal score, so candidates outside the top-k
    keep their uni-modal order below them. The shift is the smallest that does it: a large
    constant lift (1e4) leaves float32 about three decimals (its spacing at 1e4 is 2^-10), so
    confident ITM scores such as p = 0.9996 and 0.9999 would tie and lose their order.
    """
    n_img, n_txt = scores.shape
    kc, ki = min(k_captions, n_txt), min(k_images, n_img)
    pairs = 0

    def rescore(top_idx: torch.Tensor, rows: torch.Tensor, image_major: bool) -> torch.Tensor:
        nonlocal pairs
        flat_rows = rows[:, None].expand_as(top_idx).reshape(-1)
        flat_cols = top_idx.reshape(-1)
        out = []
        for s in range(0, len(flat_rows), batch_size):
            r, c = flat_rows[s:s + batch_size], flat_cols[s:s + batch_size]
            out.append(match(r, c) if image_major else match(c, r))
        pairs += len(flat_rows)
        return torch.cat(out).view(top_idx.shape).float()

    def lifted(rescored: torch.Tensor) -> torch.Tensor:
        return rescored - rescored.min() + scores.max().float() + 1.0

    i2t = scores.to(torch.float32, copy=True)
    top_c = scores.topk(kc, dim=1).indices
    i2t.scatter_(1, top_c, lifted(rescore(top_c, torch.arange(n_img), image_major=True)))
    t2i = scores.t().to(torch.float32, copy=True)
    top_i = t2i.topk(ki, dim=1).indices
    t2i.scatter_(1, top_i, lifted(rescore(top_i, torch.arange(n_txt), image_major=False)))
    return i2t, t2i.t(), pairs


def _collate(parts: list[dict[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in keys if k in parts[0]}


def _batched_states(states: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                    inputs: dict[str, torch.Tensor], device: torch.device, autocast, batch_size: int
                    ) -> dict[str, torch.Tensor]:
    """``states`` (a model's ``match_*_states``) of every row of ``inputs``, in batches, kept on
    the CPU: computed once per gallery item, not once per re-scored pair."""
    n = len(next(iter(inputs.values())))
    parts = []
    for s in range(0, n, batch_size):
        with autocast():
            out = states({k: v[s:s + batch_size].to(device) for k, v in inputs.items()})
        parts.append({k: v.cpu() for k, v in out.items()})
    return _collate(parts, parts[0].keys())


IMAGE_KEYS = ("pixels", "region_features", "region_mask", "boxes", "tag_ids", "tag_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "phrase_ids", "phrase_mask")


@torch.no_grad()
def evaluate_retrieval(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                       max_images: int = 1000, k_captions: int = 128, k_images: int = 64, rerank_itm: bool = True,
                       autocast=None, batch_size: int = 128, shortlist=None) -> dict[str, float]:
    """Retrieval metrics on a held-out split. ``batches`` yield CPU tensors from the data stage
    (evaluation rows: no augmentation, no masking); rows sharing ``image_key`` are captions of one
    image. Uni-modal metrics are prefixed ``uni_``; unprefixed ones score the model's final ranking:
    re-ranked by ITM when the model has an ITM head (``itm_pairs`` counts its multi-modal passes),
    else the uni-modal ranking itself, so every architecture's ``rsum`` compares with every other's.
    ``shortlist``: another model (``eval.shortlist``) whose embeddings make the uni-modal ranking
    that ``model``'s ITM re-ranks; the batches carry both models' inputs."""
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    ranker = shortlist if shortlist is not None else model
    image_of: dict[int, int] = {}
    img_parts, txt_parts, img_emb, txt_emb, cap_img = [], [], [], [], []
    for batch in batches:
        keys = batch["image_key"].tolist()
        new_rows = []
        for i, k in enumerate(keys):
            if k not in image_of and len(image_of) < max_images:
                image_of[k] = len(image_of)
                new_rows.append(i)
        rows = [i for i, k in enumerate(keys) if k in image_of]
        if not rows:
            break
        dev = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            if new_rows:
                sel = torch.tensor(new_rows, device=device)
                img_emb.append(ranker.embed_images({k: v[sel] for k, v in dev.items()}).float().cpu())
                img_parts.append({k: batch[k][new_rows] for k in IMAGE_KEYS if k in batch})
            sel = torch.tensor(rows, device=device)
            txt_emb.append(ranker.embed_texts({k: v[sel] for k, v in dev.items()}).float().cpu())
        txt_parts.append({k: batch[k][rows] for k in TEXT_KEYS if k in batch})
        cap_img.extend(image_of[keys[i]] for i in rows)
    if not img_emb:
        raise ValueError("evaluation split yielded no rows")
    images, texts = torch.cat(img_emb), torch.cat(txt_emb)
    caption_image = torch.tensor(cap_img)
    scores = images @ texts.t()
    metrics = recall_metrics(scores, caption_image, prefix="uni_")
    metrics["eval_images"], metrics["eval_captions"] = float(len(images)), float(len(texts))

    image_inputs = _collate(img_parts, IMAGE_KEYS)
    text_inputs = _collate(txt_parts, TEXT_KEYS)
    probe = model.match_scores({k: v[:1].to(device) for k, v in image_inputs.items()},
                               {k: v[:1].to(device) for k, v in text_inputs.items()}) if rerank_itm else None
    if probe is not None:
        image_states = _batched_states(model.match_image_states, image_inputs, device, autocast, batch_size)
        text_states = _batched_states(model.match_text_states, text_inputs, device, autocast, batch_size)

        def match(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model.match_from_states({k: v[img_idx].to(device) for k, v in image_states.items()},
                                               {k: v[txt_idx].to(device) for k, v in text_states.items()}).float().cpu()

        i2t, t2i, pairs = rerank(scores, k_captions, k_images, match, batch_size)
        metrics.update(recall_metrics(i2t, caption_image, scores_t2i=t2i))
        metrics["itm_pairs"] = float(pairs)
    else:
        metrics.update({k.removeprefix("uni_"): v for k, v in metrics.items() if k.startswith("uni_")})
    model.train(was_training)
    return metrics


def chance_recall(n_images: int, captions_per_image: float) -> dict[str, float]:
    """R@k both ways and RSUM of a random ranking (in %), named as :func:`recall_metrics` names
    them, to state how far above chance a model is: image-to-text hits when any of an image's
    captions is among k drawn without replacement, text-to-image when its one image is."""
    n_txt = n_images * captions_per_image
    out = {}
    for k in KS:
        out[f"i2t_r{k}"] = 100.0 * min(1.0, 1 - float(np.prod([(n_txt - captions_per_image - j) / (n_txt - j)
                                                               for j in range(k)])))
        out[f"t2i_r{k}"] = 100.0 * min(1.0, k / n_images)
    out["rsum"] = sum(out.values())
    return out


def chance_rsum(n_images: int, captions_per_image: float) -> float:
    return chance_recall(n_images, captions_per_image)["rsum"]


def pairwise_accuracy(scores: torch.Tensor, candidate_type: torch.Tensor, group_id: torch.Tensor
                      ) -> dict[int, tuple[float, int]]:
    """Per candidate type t > 0: (fraction of its candidates that score below their group's true
    caption, type 0, a tie counting one half, and the number of such pairs). A scorer blind to
    what a perturbation changed ties on it and lands exactly on chance, 0.5."""
    true = candidate_type == 0
    groups = group_id[true].tolist()
    if len(set(groups)) != len(groups):
        raise ValueError(f"a group has two true captions (candidate_type 0): groups {sorted(groups)}")
    true_score = dict(zip(groups, scores[true].tolist()))
    values, types, group_of = scores.tolist(), candidate_type.tolist(), group_id.tolist()
    wins: dict[int, list[float]] = {}
    for s, t, g in zip(values, types, group_of):
        if t == 0:
            continue
        if g not in true_score:
            raise ValueError(f"group {g} has a candidate of type {t} but no true caption (candidate_type 0)")
        wins.setdefault(t, []).append(1.0 if true_score[g] > s else 0.5 if true_score[g] == s else 0.0)
    return {t: (sum(w) / len(w), len(w)) for t, w in sorted(wins.items())}


@torch.no_grad()
def evaluate_compositional(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, autocast=None,
                           type_names: tuple[str, ...] = CANDIDATE_TYPES) -> dict[str, float]:
    """Pairwise (ARO-style) accuracy of the true caption over each of its perturbations on a
    compositional split whose rows carry ``candidate_type`` and ``group_id`` (build its dataset
    with ``id_columns=shards.COMPOSITIONAL_COLUMNS``). Scored by the uni-modal cosine of
    ``embed_images`` / ``embed_texts`` (``compo/uni_acc_<type>``) and, where the model has an ITM
    head, by ``match_scores`` (``compo/itm_acc_<type>``); ``compo/<scorer>_acc_mean`` averages the
    types, ``compo/pairs_<type>`` counts the pairs and ``compo/chance`` is 0.5."""
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    uni, itm, types, groups = [], [], [], []
    for batch in batches:
        dev = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            uni.append((model.embed_images(dev).float() * model.embed_texts(dev).float()).sum(-1).cpu())
            scores = model.match_scores({k: v for k, v in dev.items() if k in IMAGE_KEYS},
                                        {k: v for k, v in dev.items() if k in TEXT_KEYS})
        if scores is not None:
            itm.append(scores.float().cpu())
        types.append(batch["candidate_type"].cpu())
        groups.append(batch["group_id"].cpu())
    model.train(was_training)
    if not types:
        raise ValueError("compositional split yielded no rows")
    candidate_type, group_id = torch.cat(types), torch.cat(groups)
    metrics = {"compo/chance": 0.5}
    for scorer, parts in (("uni", uni), ("itm", itm)):
        if not parts:
            continue
        acc = pairwise_accuracy(torch.cat(parts), candidate_type, group_id)
        for t, (a, n) in acc.items():
            metrics[f"compo/{scorer}_acc_{type_names[t]}"] = a
            metrics[f"compo/pairs_{type_names[t]}"] = float(n)
        metrics[f"compo/{scorer}_acc_mean"] = sum(a for a, _ in acc.values()) / len(acc)
    return metrics


# --------------------------------------------------------------------------------------------
# Scoring a saved checkpoint (`alignlab eval`)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_task(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, autocast=None
                  ) -> dict[str, float]:
    """A fine-tuned :class:`~alignlab.models.downstream.TaskModel` on its task's evaluation split:
    the task's metric in percent (``vqa_accuracy`` for VQA v2, ``accuracy`` otherwise: exact
    match, or the top region at IoU >= 0.5 for RefCOCO+), beside the baselines every table
    shows (``majority``, the most frequent train answer; ``chance``, a uniform guess; for
    grounding ``oracle``, the best region's hit rate), and the ``examples`` scored."""
    from alignlab.models.downstream import CLASSIFICATION, baseline_scores, task_scores

    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            predicted = model.predict(batch)
        scores = {"vqa_accuracy" if model.task == "vqa" else "accuracy": task_scores(model.task, predicted, batch),
                  **baseline_scores(model.task, batch)}
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + float(v.float().sum())
        n += len(predicted)
    model.train(was_training)
    if not n:
        raise ValueError(f"the {model.task} evaluation split yielded no rows to score")
    out = {k: 100.0 * v / n for k, v in sums.items()}
    if model.task in CLASSIFICATION:
        out["chance"] = 100.0 / model.classes
    out["examples"] = float(n)
    return out


def resolve_checkpoint(source: str, mlflow_uri: str = "") -> tuple[str, str | None]:
    """(checkpoint directory, MLflow run id or None) for a checkpoint path or an MLflow run id,
    whose ``checkpoint`` tag names the run's final checkpoint."""
    from pathlib import Path

    from alignlab.platform import tracking

    if "://" in source or Path(source).exists():
        return source, None
    uri = tracking.resolve_tracking_uri(mlflow_uri)
    try:
        run = tracking.client(uri).get_run(source)
    except Exception:
        raise FileNotFoundError(f"{source!r} is neither a checkpoint directory nor an MLflow run id in {uri}") from None
    path = run.data.tags.get("checkpoint")
    if not path:
        raise FileNotFoundError(f"MLflow run {source} has no 'checkpoint' tag (it did not finish?)")
    return path, run.info.run_id


def load_shortlist(source: str, mlflow_uri: str = "", map_location: str | torch.device = "cpu"):
    """(model, input spec) of the ``eval.shortlist`` retrieval model, from its checkpoint (a
    folder or an MLflow run id)."""
    from alignlab.platform.checkpoint import load_trained

    path, _ = resolve_checkpoint(source, mlflow_uri)
    cfg, model, _ = load_trained(path, map_location=map_location)
    return model, model.input_spec(cfg.model, cfg.objectives)


def check_vocabularies(trained, eval_vocab, shards_root: str, fields: tuple[str, ...] = ("tags", "concepts", "answers")
                       ) -> None:
    """The eval shard set must share the training set's vocabularies (``fields``: a downstream
    task set keeps its own answers): the data stage maps tags, phrase concepts and answers to ids
    by their lines, which the trained model's rows follow."""
    from alignlab.models.base import ConfigError

    for field_ in fields:
        name = f"{field_}.txt"
        ours, theirs = getattr(trained, field_), getattr(eval_vocab, field_)
        if ours and ours != theirs:
            raise ConfigError(f"{shards_root}/{name} differs from the vocabulary the checkpoint was trained with "
                              f"({len(theirs)} vs {len(ours)} entries); build the evaluation set with "
                              f"`alignlab data build ... --vocab-from <training shards>`")
    if trained.size != eval_vocab.size:
        raise ConfigError(f"the tokenizer (data.tokenizer) has {eval_vocab.size} tokens but the checkpoint was "
                          f"trained with {trained.size}")


def evaluate_checkpoint(source: str, shards_root: str = "", split: str = "", max_images: int = 0,
                        overrides: list[str] | tuple[str, ...] = (), log: bool = True, mlflow_uri: str = ""
                        ) -> dict[str, float]:
    """Retrieval (uni-modal and ITM re-ranked) of a checkpoint on any split, on this process's
    device, with the training run's evaluation settings (a checkpoint fine-tuned on a downstream
    task: its task's metric, logged as ``downstream/<task>/<split>/...``); metrics logged as ``eval/<split>/...``
    in the run the checkpoint came from (found by its ``checkpoint`` tag), or in a new run. The
    shard set and split default to the checkpoint's own evaluation data. ``mlflow_uri`` is the
    store a run id is looked up in (default: ``$MLFLOW_TRACKING_URI``, else the local one)."""
    import torch

    from alignlab.models import downstream
    from alignlab.models.registry import get_spec
    from alignlab.platform import ingest, shards, tracking
    from alignlab.platform.checkpoint import load_trained
    from alignlab.platform.tokenization import load_tokenizer, vocab_info
    from alignlab.platform.train import autocast_factory, resolve_precision

    path, run_id = resolve_checkpoint(source, mlflow_uri)
    extra = [f"data.shards={shards_root}"] if shards_root else []
    extra += [f"data.eval_split={split}"] if split else []
    extra += [f"data.eval_max_images={max_images}"] if max_images else []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, contents = load_trained(path, [*overrides, *extra], map_location=device)
    shards_root, split = cfg.data.shards, cfg.data.eval_split
    check_vocabularies(contents.model_vocab(), vocab_info(load_tokenizer(cfg.data.tokenizer, shards_root), shards_root),
                       shards_root)
    spec = downstream.input_spec(cfg.finetune.task, get_spec(cfg.model.architecture), cfg.model, cfg.objectives)
    shortlist = None
    if cfg.eval.shortlist:
        shortlist, shortlist_spec = load_shortlist(cfg.eval.shortlist, mlflow_uri or cfg.tracking.mlflow_uri, device)
        spec = spec.union(shortlist_spec)
    batches = ingest.local_eval_batches(cfg.data, cfg.objectives, spec, split, cfg.data.eval_batch_size)
    # The training run's precision where this device has it (fp16 needs CUDA).
    precision = cfg.precision.precision if device.type == "cuda" or cfg.precision.precision != "fp16" else "fp32"
    precision = resolve_precision(precision, device)
    autocast = autocast_factory(precision, device)
    task = cfg.finetune.task
    if task and task != "retrieval":  # a fine-tuned task model: its task's metric, as its run logged it
        metrics = evaluate_task(model, batches, device, autocast)
    else:
        metrics = evaluate_retrieval(model, batches, device, max_images=cfg.data.eval_max_images,
                                     k_captions=cfg.eval.k_captions, k_images=cfg.eval.k_images,
                                     rerank_itm=cfg.eval.rerank, autocast=autocast, shortlist=shortlist)
    if cfg.data.compositional_split:
        metrics.update(evaluate_compositional(model, ingest.local_eval_batches(
            cfg.data, cfg.objectives, spec, cfg.data.compositional_split, cfg.data.eval_batch_size,
            id_columns=shards.COMPOSITIONAL_COLUMNS), device, autocast))
    if log:
        uri = tracking.resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
        if run_id is None:
            found = tracking.find_run(uri, cfg.tracking.experiment, {"checkpoint": path})
            run_id = found.info.run_id if found else tracking.create_run(
                uri, cfg.tracking.experiment, f"eval {split}", tags={"checkpoint": path, "alignlab.eval_of": path})
        tracking.log_datasets(uri, run_id, shards_root, [(split, tracking.EVALUATION),
                                                         (cfg.data.compositional_split, tracking.EVALUATION)])
        prefix = f"downstream/{task}/{split}" if task and task != "retrieval" else f"eval/{split}"
        tracking.RunLogger(uri, run_id).log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, contents.step)
        metrics["mlflow_run_id"] = run_id  # type: ignore[assignment]
    return metrics
