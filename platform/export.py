"""Checkpoints anyone can load (#18): ``alignlab export CHECKPOINT_OR_RUN OUT_DIR`` writes a
training checkpoint as a Hugging Face-style folder, :class:`Processor` turns images and strings
into the batches its model reads, and :func:`log_model` logs the folder as an MLflow model.

The folder::

    config.json        format and version, AlignLab version and commit, the architecture, the
                       downstream task ("" = the pre-trained model), the step, the resolved
                       ``model`` and ``objectives`` config and the vocabulary summary (Vocab): what
                       rebuilds the model (alignlab.models.pretrained.from_pretrained); what the
                       data stage needs to prepare its inputs (``preprocessing``); the whole
                       training config (``training_config``) and the source checkpoint / MLflow
                       run (``source``), for provenance only
    model.safetensors  every weight (tied weights saved as copies, as in a training checkpoint)
    tokenizer.json, tokenizer_config.json
                       the run's tokenizer, as its ``save_pretrained`` writes it: AutoTokenizer and
                       BertTokenizerFast ``from_pretrained`` load it
    tags.txt, concepts.txt, answers.txt
                       the vocabularies, as in the shard format (only those the model has)
    README.md          a generated model card

The export is written into a temporary folder beside ``OUT_DIR``, checked (the tokenizer and
vocabularies read back from it must give the checkpoint's own vocabulary summary) and only then
moved into place, replacing an earlier export there. A non-empty folder that is not an AlignLab
export is never written into.

:class:`Processor` is the data stage's own :class:`~alignlab.platform.ingest.Preprocessor` in
evaluation mode (no augmentation, no masking), reading the folder as it reads a shard set (its
tokenizer and vocabularies), so an exported model sees exactly the batches its evaluation saw.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from alignlab.models.inputs import ConfigError, InputSpec
from alignlab.models.pretrained import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, ExportError, is_export, \
    read_config
from alignlab.platform.config import DataConfig, ObjectivesConfig, build, to_dict

# The data settings an inference batch depends on (the rest of ``data`` shapes training reads).
PREPROCESSING_KEYS = ("max_text_len", "max_phrases", "max_regions", "max_tags", "image_size")
VOCABULARY_FILES = ("tags.txt", "concepts.txt", "answers.txt")
PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")


def inference_inputs(task: str, model_cfg, objectives_cfg) -> InputSpec:
    """What the model of ``task`` reads at inference: its evaluation inputs (no pre-training
    masks), without the labels a task's evaluation scores."""
    from alignlab.models import downstream
    from alignlab.models.registry import get_spec

    spec = downstream.input_spec(task, get_spec(model_cfg.architecture), model_cfg, objectives_cfg).unmasked()
    return dataclasses.replace(spec, qa=False, answer_scores=False, target_box=False)


# --------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------


def _claim(out: Path) -> None:
    """Refuses ``out`` unless it is absent, empty, or an earlier AlignLab export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; nothing was written")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ExportError(f"{out} is not empty and holds no AlignLab export (no {CONFIG_FILE} with format {FORMAT!r}); "
                          f"`alignlab export` never writes into another folder's data, and nothing was written. "
                          f"Choose an empty or new folder")


def _pixel_statistics(model) -> dict[str, list[float]] | None:
    """The mean and std (of 0..1 pixels) the model normalises its uint8 pixels with, if any."""
    from alignlab.models.blocks import PixelNormalize

    norm = next((m for m in model.modules() if isinstance(m, PixelNormalize)), None)
    if norm is None:
        return None
    return {"mean": [round(v / 255.0, 6) for v in norm.mean.flatten().tolist()],
            "std": [round(v / 255.0, 6) for v in norm.std.flatten().tolist()]}


def _preprocessing(cfg, inputs: InputSpec, model) -> dict[str, Any]:
    """config.json's ``preprocessing``: the data settings the Processor reads (``data``), what the
    model reads (``inputs``), and how each input is made, for anyone preparing them without
    AlignLab."""
    from alignlab.platform import shards

    out: dict[str, Any] = {"data": {k: getattr(cfg.data, k) for k in PREPROCESSING_KEYS},
                           "inputs": dataclasses.asdict(inputs)}
    out["text"] = {"tokenizer": "this folder (AutoTokenizer.from_pretrained)", "max_length": cfg.data.max_text_len,
                   "padding": "max_length, [CLS] ... [SEP]"}
    if inputs.pixels:
        out["pixels"] = {"size": cfg.data.image_size, "layout": "uint8 (3, size, size), RGB",
                         "resize": "the whole image, bicubic, no crop (PIL)",
                         "normalisation": {**(_pixel_statistics(model) or {}), "applied_by": "the model"}}
    if inputs.regions:
        out["regions"] = {"dim": cfg.model.image.region_dim, "max": cfg.data.max_regions,
                          "whole_image_first": inputs.whole_image, "tags": inputs.tags,
                          "made_by": "a detector and a feature backbone at `alignlab data build` (see shard_build)"}
    if inputs.text_features:
        out["text_features"] = "each caption's frozen sentence embedding, as `alignlab data build --text-features` " \
                               "computes it (see shard_build.text_features)"
    manifest = shards.read_manifest(cfg.data.shards)
    out["shard_build"] = manifest.get("build") or {"source": manifest.get("source", "")}
    return out


def _model_card(config: dict[str, Any], files: list[str]) -> str:
    arch, task, prep = config["architecture"], config["task"], config["preprocessing"]
    inputs = prep["inputs"]
    image = (f"images (bytes, PIL images or paths), resized whole to {prep['data']['image_size']} px a side; the "
             f"model normalises the pixels" if inputs["pixels"] else
             f"per image up to {prep['data']['max_regions']} detector regions: features ({prep['regions']['dim']}-d, "
             f"the last 6 the normalised box and its size), boxes" + (", tags" if inputs["tags"] else "") +
             (", the whole image first" if inputs["whole_image"] else "") +
             ", as `alignlab data build` extracts them (config.json: preprocessing.shard_build)")
    text = f"captions (strings, up to {prep['data']['max_text_len']} tokens)" + (
        ", each with its phrase concepts (word tuples, as the shards' `phrases`)" if inputs["phrases"] else "") + (
        ", each with its frozen sentence feature" if inputs["text_features"] else "")
    source = config["source"]
    lines = [
        f"# {arch}" + (f" fine-tuned on {task}" if task else "") + " (AlignLab export)", "",
        f"Trained {config['step']} steps (epoch {config['epoch']}) with AlignLab {config['alignlab_version']} "
        f"(commit {config['alignlab_commit']}), exported from `{source['checkpoint']}`"
        + (f", MLflow run `{source['mlflow_run_id']}`" if source["mlflow_run_id"] else "") + ".", "",
        "## Files", "",
        f"- `{CONFIG_FILE}`: the architecture, the resolved model and objectives config and the vocabulary "
        "summary (they rebuild the model); `preprocessing`, how its inputs are made; `training_config` and "
        "`source`, provenance only (initialisation sources named there are never read: this folder holds "
        "every weight)",
        f"- `{WEIGHTS_FILE}`: the weights",
        "- the tokenizer (`" + "`, `".join(f for f in files if f.startswith(("tokenizer", "vocab", "special")))
        + "`): `transformers.AutoTokenizer.from_pretrained` loads it",
        *[f"- `{f}`: one entry per line, entry k is id k" for f in files if f in VOCABULARY_FILES],
        "", "## Inputs", "", f"- image side: {image}", f"- text side: {text}", "",
        "## Loading", "", "```python",
        "from alignlab.models.pretrained import from_pretrained",
        "from alignlab.platform.export import Processor",
        "model, processor = from_pretrained(FOLDER), Processor.from_pretrained(FOLDER)",
        "```", "",
        "`model.embed_images(processor(images=...))` and `model.embed_texts(processor(texts=...))` give "
        "unit-norm embeddings; with `pairs = processor(images=..., texts=...)`, `model.match_scores(pairs, pairs)` "
        "gives each aligned pair's ITM score (None without an ITM head). See `Processor` for what a region model "
        "takes instead of images."
        if not task else f"`model.predict(processor(images=..., texts=...))` gives each row's {task} prediction.",
        "",
    ]
    return "\n".join(lines)


def export(source: str, out_dir: str | Path, mlflow_uri: str = "") -> Path:
    """Writes the checkpoint ``source`` (a folder, or an MLflow run id whose ``checkpoint`` tag
    names one) as an export folder at ``out_dir``; returns its path. The run's tokenizer and
    shard set must be reachable (``data.tokenizer``; the shard set's concepts.txt for a model
    with phrase concepts)."""
    from importlib.metadata import version

    from alignlab.platform import shards, tracking
    from alignlab.platform.checkpoint import load_trained, write_weights
    from alignlab.platform.evaluate import check_vocabularies, resolve_checkpoint
    from alignlab.platform.tokenization import load_tokenizer, vocab_info

    out = Path(out_dir).absolute()
    _claim(out)  # before any work: a wrong folder fails at once
    path, run_id = resolve_checkpoint(str(source), mlflow_uri)
    cfg, model, contents = load_trained(path)
    vocab = contents.model_vocab()
    inputs = inference_inputs(cfg.finetune.task, cfg.model, cfg.objectives)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": cfg.model.architecture,
        "task": cfg.finetune.task, "step": contents.step, "epoch": contents.epoch,
        "alignlab_version": version("alignlab"), "alignlab_commit": tracking.git_commit(),
        "source": {"checkpoint": str(path), "mlflow_run_id": run_id},
        "model": to_dict(cfg.model), "objectives": to_dict(cfg.objectives), "vocab": dataclasses.asdict(vocab),
        "preprocessing": _preprocessing(cfg, inputs, model), "training_config": to_dict(cfg),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_weights(tmp / WEIGHTS_FILE, model.state_dict())
        load_tokenizer(cfg.data.tokenizer, cfg.data.shards).save_pretrained(str(tmp))
        lines = {"tags.txt": vocab.tags, "answers.txt": vocab.answers,
                 "concepts.txt": shards.read_vocab_file(cfg.data.shards, "concepts.txt") if vocab.concepts else ()}
        for name, entries in lines.items():
            if entries:
                (tmp / name).write_text("".join(f"{e}\n" for e in entries))
        # The folder as the Processor reads it must give the model's own vocabulary (a tokenizer
        # or shard set changed since training fails here, not as wrong ids later).
        try:
            check_vocabularies(vocab, vocab_info(load_tokenizer(str(tmp), str(tmp)), str(tmp)), cfg.data.shards)
        except ConfigError as e:
            raise ExportError(f"cannot export {path}: its run's tokenizer and shard set no longer give the vocabulary "
                              f"it was trained with: {e}") from None
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(_model_card(config, sorted(os.listdir(tmp))))
        _claim(out)  # still ours: replace an earlier export whole, so no stale file stays
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Inputs for the exported model
# --------------------------------------------------------------------------------------------


class _Refusals:
    """Takes the data stage's skipped-row reports (its ``counter.add.remote``), so the Processor
    refuses an input the stage would skip instead of silently dropping its row."""

    def __init__(self):
        self.skipped: list[str] = []
        self.add = self

    def remote(self, skipped, notes, train) -> None:
        self.skipped.extend(example for _, _, example, _ in skipped)


def _image_bytes(image) -> bytes:
    """Encoded bytes of an image given as bytes, a path, or a PIL image (saved as PNG, lossless)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be bytes, a path or a PIL image, got {type(image).__name__}")


def _object_column(values: Sequence) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


class Processor:
    """Images and strings -> the batch the exported model's evaluation path reads (a dict of
    tensors for ``embed_images``, ``embed_texts``, ``match_scores``, a task model's ``predict``).

    ``processor(images=...)`` prepares the image side, ``processor(texts=...)`` the text side,
    and both (equal lengths) aligned (image, text) pairs. What each side takes depends on what the
    model reads (config.json's ``preprocessing.inputs``):

    * pixels: ``images``, each encoded bytes, a path or a PIL image;
    * regions (a region model: they come from a detector and a feature backbone at
      ``alignlab data build``, which this class does not run): ``regions``, per image a mapping
      ``{"features": (K, D) array, "boxes": (K, 4) array of x1, y1, x2, y2 in [0, 1],
      "tags": K class names}`` (tags where the model reads them), made as the training shards'
      were; a model reading the whole image's feature expects it as region 0, box (0, 0, 1, 1);
    * captions: ``texts``, strings; with ``phrases`` (per caption, its phrase-concept word tuples,
      as the shards' ``phrases`` column) for a model reading phrase concepts, and
      ``text_features`` ((N, D), the frozen sentence embedding the shards' ``text_feature``
      holds) for a model reading cached sentence features.

    An input the data stage would skip (an undecodable image, an empty caption, non-finite
    regions) raises ``ValueError`` naming its index.
    """

    def __init__(self, directory: str | Path, data: DataConfig, objectives: ObjectivesConfig, inputs: InputSpec,
                 region_dim: int):
        self.directory, self.data, self.objectives, self.inputs = str(directory), data, objectives, inputs
        self.region_dim = region_dim
        self._stages: dict[InputSpec, Any] = {}

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Processor:
        """The processor of the export at ``directory``: its tokenizer and vocabularies are the
        folder's own, the data settings its config.json's ``preprocessing.data``."""
        exported = read_config(directory)
        prep = exported.raw.get("preprocessing")
        if not isinstance(prep, dict) or not isinstance(prep.get("data"), dict):
            raise ExportError(f"{Path(directory) / CONFIG_FILE}: key 'preprocessing.data' is missing or not a mapping")
        try:
            data = build(DataConfig, {**prep["data"], "shards": str(directory), "tokenizer": str(directory)},
                         "preprocessing.data")
        except ConfigError as e:
            raise ExportError(f"{Path(directory) / CONFIG_FILE}: {e}") from None
        return cls(directory, data, exported.objectives,
                   inference_inputs(exported.task, exported.model, exported.objectives), exported.model.image.region_dim)

    def _stage(self, spec: InputSpec):
        from alignlab.platform.ingest import Preprocessor

        if spec not in self._stages:
            self._stages[spec] = Preprocessor(self.data, self.objectives, spec, train=False)
        return self._stages[spec]

    def __call__(self, images: Sequence | None = None, texts: Sequence[str] | None = None, *,
                 regions: Sequence[dict] | None = None, phrases: Sequence | None = None,
                 text_features=None) -> dict[str, torch.Tensor]:
        spec = self.inputs
        if spec.image_pair:
            raise ValueError("this model reads image pairs (NLVR2); the Processor prepares one image per row")
        has_image, has_text = images is not None or regions is not None, texts is not None
        if not (has_image or has_text):
            raise ValueError("pass images (or regions, for a region model), texts, or both")
        sizes = {len(x) for x in (images, regions, texts) if x is not None}
        if len(sizes) > 1:
            raise ValueError(f"images, regions and texts must be equally many (aligned pairs), got {sorted(sizes)}")
        n = sizes.pop()
        if not has_image:
            spec = dataclasses.replace(spec, pixels=False, regions=False, whole_image=False, tags=False)
        if not has_text:
            spec = dataclasses.replace(spec, phrases=False, text_features=False)
        batch: dict[str, np.ndarray] = {
            "caption": _object_column(list(texts) if has_text else ["."] * n),  # "." holds an image-only row
            "caption_id": np.array([str(i) for i in range(n)], dtype=object),
            "image_id": np.array([str(i) for i in range(n)], dtype=object),
        }
        if spec.pixels:
            if images is None:
                raise ValueError("this model reads pixels: pass images (bytes, paths or PIL images)")
            batch["image"] = _object_column([_image_bytes(x) for x in images])
        if spec.regions:
            batch.update(self._region_columns(regions, spec.tags))
        if spec.phrases:
            if phrases is None or len(phrases) != n:
                raise ValueError("this model reads phrase concepts: pass phrases, per caption a list of word tuples "
                                 "(e.g. [['red', 'circle'], ['circle', 'left of', 'square']]), as `alignlab data build` "
                                 "parses them (alignlab.platform.databuild.phrases.PhraseParser)")
            batch["phrases"] = _object_column([[list(p) for p in row] for row in phrases])
        if spec.text_features:
            if text_features is None or len(text_features) != n:
                raise ValueError("this model reads cached sentence features: pass text_features, per caption the "
                                 "frozen encoder's embedding (config.json: preprocessing.shard_build.text_features; "
                                 "alignlab.platform.databuild.sentences.SentenceFeaturizer computes it)")
            batch["text_feature"] = _object_column([np.asarray(v, dtype=np.float32) for v in text_features])
        stage = self._stage(spec)
        refusals = stage.counter = _Refusals()
        out = stage(batch)
        if refusals.skipped:
            raise ValueError("inputs refused by the data stage (caption_id is the input's index): "
                             + "; ".join(refusals.skipped))
        drop = {"image_key", "caption_key"} | (set() if has_text else {"input_ids", "attention_mask"})
        return {k: torch.from_numpy(v) for k, v in out.items() if k not in drop}

    def _region_columns(self, regions: Sequence[dict] | None, tags: bool) -> dict[str, np.ndarray]:
        needed = ("features", "boxes", "tags") if tags else ("features", "boxes")
        if regions is None:
            raise ValueError(f"this model reads detector regions, not pixels: pass regions, per image a mapping of "
                             f"{', '.join(needed)} (see Processor)")
        feats, boxes, names = [], [], []
        for i, r in enumerate(regions):
            absent = [k for k in needed if k not in r]
            if absent:
                raise ValueError(f"regions[{i}] has no {absent[0]!r}; each needs {', '.join(needed)}")
            f = np.asarray(r["features"], dtype=np.float32)
            if f.ndim != 2 or f.shape[1] != self.region_dim:
                raise ValueError(f"regions[{i}]['features'] has shape {f.shape}; the model reads (K, {self.region_dim})")
            feats.append(f)
            boxes.append(np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4))
            names.append([str(t) for t in r.get("tags", ())])
        columns = {"region_features": _object_column(feats), "boxes": _object_column(boxes)}
        if tags:
            columns["tags"] = _object_column(names)
        return columns


# --------------------------------------------------------------------------------------------
# The MLflow model
# --------------------------------------------------------------------------------------------


def pyfunc_signature(directory: str | Path):
    """The pyfunc's input and output schema for the export at ``directory``: the columns its
    model reads (``image`` bytes or region columns; ``text`` and what the text side needs), each
    optional, since a frame may hold one side only."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Processor.from_pretrained(directory).inputs
    # double: JSON and Python floats are 64-bit, and MLflow refuses to narrow them to float32.
    floats, matrix = Array(DataType.double), Array(Array(DataType.double))
    columns = [ColSpec(DataType.binary, "image", required=False)] if inputs.pixels else []
    if inputs.regions:
        columns += [ColSpec(matrix, "region_features", required=False), ColSpec(matrix, "boxes", required=False)]
        columns += [ColSpec(Array(DataType.string), "tags", required=False)] if inputs.tags else []
    columns.append(ColSpec(DataType.string, "text", required=False))
    columns += [ColSpec(Array(Array(DataType.string)), "phrases", required=False)] if inputs.phrases else []
    columns += [ColSpec(floats, "text_features", required=False)] if inputs.text_features else []
    outputs = Schema([ColSpec(floats, "image_embedding", required=False), ColSpec(floats, "text_embedding", required=False),
                      ColSpec(DataType.double, "match_score", required=False)])
    return ModelSignature(inputs=Schema(columns), outputs=outputs)


def log_model(mlflow_uri: str, run_id: str, checkpoint_dir: str, registered_name: str | None = None,
              name: str = "model"):
    """Exports ``checkpoint_dir`` into a temporary folder and logs it into the existing MLflow run
    ``run_id`` as a pyfunc model (``mlflow.pyfunc.load_model(info.model_uri)``; its ``predict``
    embeds images and texts, see ``mlflow_pyfunc.py``), registered as ``registered_name`` in the
    model registry when given. Returns MLflow's ``ModelInfo``.

    Nothing is pickled: the model is logged from code (``python_model`` is the path of
    ``mlflow_pyfunc.py``, which MLflow copies beside the export and runs when loading), its
    weights are the export's safetensors file. Loading it needs AlignLab installed. The run's
    status and the process's tracking URI are left as they were. A model fine-tuned on a
    classification or grounding task is refused (:class:`ExportError`): its head predicts, it
    does not embed."""
    from importlib.metadata import version

    import mlflow

    from alignlab.platform import tracking
    from alignlab.platform.checkpoint import read_meta
    from alignlab.platform.evaluate import resolve_checkpoint

    task = read_meta(resolve_checkpoint(checkpoint_dir, mlflow_uri)[0])[0].get("finetune", {}).get("task", "")
    if task not in ("", "retrieval"):
        raise ExportError(f"{checkpoint_dir} is a model fine-tuned on {task}: its head predicts, it does not embed, "
                          f"and the pyfunc embeds images and texts; export it with `alignlab export` and load it "
                          f"with alignlab.models.pretrained.from_pretrained")
    client = tracking.client(mlflow_uri)
    status = client.get_run(run_id).info.status
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(checkpoint_dir, Path(tmp) / "export")
        mlflow.set_tracking_uri(mlflow_uri)
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=str(PYFUNC_FILE), artifacts={"export": str(folder)},
                    signature=pyfunc_signature(folder), registered_model_name=registered_name,
                    pip_requirements=[f"alignlab=={version('alignlab')}"])
        finally:
            # start_run(run_id) ends the run FINISHED; a run still training stays RUNNING.
            if client.get_run(run_id).info.status != status:
                client.update_run(run_id, status=status)
            mlflow.set_tracking_uri(previous_uri)
    return info
