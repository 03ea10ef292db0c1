"""Checkpoints anyone can load (#18): a tiny model of every architecture exported, rebuilt with
``from_pretrained`` and fed by the ``Processor`` from raw rows embeds exactly as the trained model
does on the batch its evaluation reads; the folder's tokenizer loads with transformers; crafted,
foreign or inconsistent folders are refused naming the file and key; the MLflow pyfunc embeds as
``from_pretrained`` does."""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignlab.models import downstream
from alignlab.models.pretrained import ExportError, from_pretrained
from alignlab.models.registry import get_spec
from alignlab.platform import shards
from alignlab.platform.checkpoint import CheckpointContents, CheckpointError, write_checkpoint
from alignlab.platform.config import load_config, to_dict
from alignlab.platform.export import Processor, export
from alignlab.platform.ingest import local_eval_batches
from alignlab.platform.synth import REGION_DIM, SynthConfig, generate
from alignlab.platform.tokenization import load_tokenizer, vocab_info

SIZE = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32", "model.dropout=0.0",
        "model.embed_dim=8", "data.max_regions=4", "data.max_tags=4", "data.max_text_len=16"]
VIT = ["model.image.kind=vit", "model.image.timm_name=vit_tiny_patch16_224", "model.image.img_size=32",
       "model.image.patch_size=8", "model.image.embed_dim=16", "model.image.depth=1", "model.image.num_heads=2",
       "data.image_size=32"]
REGIONS = ["model.image.kind=regions", f"model.image.region_dim={REGION_DIM}"]
ARCHITECTURES = {
    "dual_encoder": [*VIT, "model.num_layers=1"],
    "mvptr": [*REGIONS, "model.mvptr.text_layers=1", "model.mvptr.visual_layers=1", "model.mvptr.fusion_layers=1"],
    "semvlp": [*REGIONS, "model.num_layers=2", "model.semvlp.cross_layer=1"],
    "simla": [*VIT, "model.num_layers=1", "model.simla.queue_size=8", "model.simla.codebook_size=16",
              "data.batch_size=8"],
}
ROWS = 8  # the test split: 4 images, 2 captions each


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), SynthConfig(n_train_images=4, n_test_images=4, image_size=32, family_size=1,
                                    min_concept_count=1))
    return root


def _checkpoint(arch: str, synth, directory, *extra: str):
    """A randomly initialised tiny model of ``arch`` saved as a training checkpoint: (config, model)."""
    cfg = load_config(None, [f"model.architecture={arch}", f"data.shards={synth}", *SIZE, *ARCHITECTURES[arch], *extra])
    vocab = vocab_info(load_tokenizer(cfg.data.tokenizer, cfg.data.shards), cfg.data.shards)
    torch.manual_seed(0)
    model = downstream.build("", get_spec(arch), cfg.model, cfg.objectives, vocab).eval()
    write_checkpoint(directory, CheckpointContents(model=model.state_dict(), step=7, epoch=1, config=to_dict(cfg),
                                                   vocab=asdict(vocab)))
    return cfg, model


def _raw_rows(synth, split: str = "test") -> list[dict]:
    """The split's shard rows as the files hold them, in the order the evaluation reads them."""
    files = shards.validate_shards(shards.child_uri(str(synth), split))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _raw_inputs(rows: list[dict], processor: Processor) -> dict:
    """What a user holding the rows' images, captions and detector output passes the processor."""
    inputs = processor.inputs
    image = {"images": [r["image"] for r in rows]} if inputs.pixels else {
        "regions": [{"features": r["region_features"], "boxes": r["boxes"], "tags": r["tags"]} for r in rows]}
    text = {"texts": [r["caption"] for r in rows]}
    if inputs.phrases:
        text["phrases"] = [r["phrases"] for r in rows]
    return {"image": image, "text": text}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_an_export_embeds_raw_inputs_exactly_as_the_trained_model_evaluates(arch, synth, tmp_path):
    cfg, model = _checkpoint(arch, synth, tmp_path / "ckpt")
    out = export(str(tmp_path / "ckpt"), tmp_path / "export")
    loaded, processor = from_pretrained(out), Processor.from_pretrained(out)
    assert not loaded.training
    spec = downstream.input_spec("", get_spec(arch), cfg.model, cfg.objectives)
    evaluated = next(local_eval_batches(cfg.data, cfg.objectives, spec, cfg.data.eval_split, ROWS))
    raw = _raw_inputs(_raw_rows(synth), processor)
    assert len(evaluated["input_ids"]) == ROWS == len(raw["text"]["texts"])
    pairs = processor(**raw["image"], **raw["text"])
    with torch.no_grad():
        for embed in ("embed_images", "embed_texts"):
            want = getattr(model, embed)(evaluated)
            assert torch.equal(getattr(loaded, embed)(pairs), want), embed
            assert not torch.equal(want[0], want[2]), embed  # two images, two captions: not a constant
        # Each side alone is prepared as in the pairs.
        assert torch.equal(loaded.embed_images(processor(**raw["image"])), model.embed_images(evaluated))
        assert torch.equal(loaded.embed_texts(processor(**raw["text"])), model.embed_texts(evaluated))
        if processor.inputs.pixels:  # an image given as a path or a PIL image is the same image
            from PIL import Image

            (tmp_path / "first.png").write_bytes(raw["image"]["images"][0])
            as_given = processor(images=[tmp_path / "first.png", Image.open(tmp_path / "first.png")])
            assert torch.equal(as_given["pixels"], evaluated["pixels"][[0, 0]])
        scores = model.match_scores(evaluated, evaluated)
        assert (scores is None) == (arch == "dual_encoder")
        if scores is not None:
            assert torch.equal(loaded.match_scores(pairs, pairs), scores)


def test_a_fine_tuned_task_model_exports_with_its_head_and_answers(synth, tmp_path):
    """A checkpoint fine-tuned on a classification task exports its head and its classes; the
    pyfunc, which embeds, refuses it."""
    from dataclasses import replace

    from alignlab.platform.export import log_model

    answers = ("entailment", "neutral", "contradiction")
    cfg = load_config(None, ["model.architecture=semvlp", f"data.shards={synth}", *SIZE, *ARCHITECTURES["semvlp"],
                             "finetune.task=snli_ve"])
    vocab = replace(vocab_info(load_tokenizer("auto", str(synth)), str(synth)), answers=answers)
    torch.manual_seed(0)
    model = downstream.build("snli_ve", get_spec("semvlp"), cfg.model, cfg.objectives, vocab).eval()
    write_checkpoint(tmp_path / "ckpt", CheckpointContents(model=model.state_dict(), step=3, epoch=0,
                                                           config=to_dict(cfg), vocab=asdict(vocab)))
    out = export(str(tmp_path / "ckpt"), tmp_path / "export")
    assert (out / "answers.txt").read_text().splitlines() == list(answers)
    loaded, processor = from_pretrained(out), Processor.from_pretrained(out)
    assert loaded.task == "snli_ve" and "snli_ve" in (out / "README.md").read_text()
    spec = downstream.input_spec("snli_ve", get_spec("semvlp"), cfg.model, cfg.objectives)
    evaluated = next(local_eval_batches(cfg.data, cfg.objectives, spec, cfg.data.eval_split, ROWS))
    raw = _raw_inputs(_raw_rows(synth), processor)
    with torch.no_grad():
        assert torch.equal(loaded.logits(processor(**raw["image"], **raw["text"])), model.logits(evaluated))
    with pytest.raises(ExportError, match="fine-tuned on snli_ve: its head predicts, it does not embed"):
        log_model("sqlite:///unused.db", "no-run", str(tmp_path / "ckpt"))


def test_export_command_writes_a_folder_transformers_and_alignlab_load(synth, tmp_path, capsys):
    from transformers import AutoTokenizer, BertTokenizerFast

    from alignlab.platform.cli import main

    cfg, model = _checkpoint("mvptr", synth, tmp_path / "ckpt")
    out = tmp_path / "export"
    main(["export", str(tmp_path / "ckpt"), str(out)])
    assert f"exported to {out}" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json", "tags.txt",
            "concepts.txt"} <= files and "answers.txt" not in files  # the synthetic set has no answers
    assert (out / "tags.txt").read_text().splitlines() == shards.read_vocab_file(str(synth), "tags.txt")
    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["task"], config["step"], config["epoch"]) == ("mvptr", "", 7, 1)
    assert config["model"] == to_dict(cfg.model) and config["training_config"] == to_dict(cfg)
    assert config["preprocessing"]["data"]["max_text_len"] == 16 and config["preprocessing"]["inputs"]["regions"]
    assert "from_pretrained" in (out / "README.md").read_text()
    trained = load_tokenizer("auto", str(synth))
    caption = _raw_rows(synth)[0]["caption"]
    for cls in (AutoTokenizer, BertTokenizerFast):
        tokenizer = cls.from_pretrained(str(out))
        assert tokenizer(caption)["input_ids"] == trained(caption)["input_ids"] and len(tokenizer) == len(trained)

    # Exporting again replaces the earlier export whole.
    (out / "tags.txt").write_text("stale\n")
    main(["export", str(tmp_path / "ckpt"), str(out)])
    assert "stale" not in (out / "tags.txt").read_text()


def test_export_refuses_a_foreign_folder_and_a_source_that_is_no_checkpoint(synth, tmp_path, capsys):
    from alignlab.platform.cli import main

    _checkpoint("dual_encoder", synth, tmp_path / "ckpt")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"someone's data")
    with pytest.raises(SystemExit, match=f"{foreign} is not empty and holds no AlignLab export.*nothing was written"):
        main(["export", str(tmp_path / "ckpt"), str(foreign)])
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        export(str(tmp_path / "empty"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_fails_whole_when_the_shard_set_changed_since_training(synth, tmp_path):
    """Phrase concepts are read from the run's shard set (the checkpoint holds their token ids,
    not their words): a set rebuilt since training is caught before the folder appears."""
    import shutil

    shutil.copytree(synth, tmp_path / "synth")
    _checkpoint("mvptr", tmp_path / "synth", tmp_path / "ckpt")
    concepts = tmp_path / "synth" / "concepts.txt"
    concepts.write_text("square\n" + concepts.read_text())
    with pytest.raises(ExportError, match=f"no longer give the vocabulary it was trained with: {tmp_path / 'synth'}/"
                                          f"concepts.txt differs"):
        export(str(tmp_path / "ckpt"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "synth"]  # no folder, no temporary one


def test_from_pretrained_refuses_crafted_and_inconsistent_folders(synth, tmp_path):
    _checkpoint("dual_encoder", synth, tmp_path / "ckpt")
    out = export(str(tmp_path / "ckpt"), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())

    def refused(change, match):
        data = json.loads(json.dumps(config))
        change(data)
        (out / "config.json").write_text(json.dumps(data))
        with pytest.raises(ExportError, match=match):
            from_pretrained(out)

    refused(lambda d: d["model"].update(hiden_size=16),
            r"config.json: unknown config key 'model.hiden_size' \(did you mean 'hidden_size'\?\)")
    refused(lambda d: d["model"]["image"].pop("depth"), r"config.json: config key 'model.image.depth' is missing")
    refused(lambda d: d["vocab"].pop("size"), r"config.json: config key 'vocab.size' is missing")
    refused(lambda d: d.update(architecture="clip", model={**d["model"], "architecture": "clip"}),
            r"config.json: config key 'model.architecture' = 'clip' is not a registered architecture")
    refused(lambda d: d.update(extra=1), r"config.json: unknown key 'extra'")
    refused(lambda d: d["model"].update(hidden_size=32), r"model.safetensors does not fit the model config.json")
    (out / "config.json").write_text(json.dumps(config))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (out / "model.safetensors").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(ExportError, match=r"model.safetensors is not a readable safetensors file.*nothing in it was "
                                          r"executed"):
        from_pretrained(out)
    assert not marker.exists()
    with pytest.raises(ExportError, match="config.json is missing"):
        from_pretrained(tmp_path / "ckpt")


def test_the_processor_refuses_what_the_data_stage_would_skip(synth, tmp_path):
    _checkpoint("mvptr", synth, tmp_path / "ckpt")
    processor = Processor.from_pretrained(export(str(tmp_path / "ckpt"), tmp_path / "export"))
    rows = _raw_rows(synth)[:2]
    raw = _raw_inputs(rows, processor)
    with pytest.raises(ValueError, match="caption_id is the input's index.*empty_caption: caption_id=1"):
        processor(texts=[rows[0]["caption"], "  "], phrases=raw["text"]["phrases"])
    with pytest.raises(ValueError, match="reads phrase concepts: pass phrases"):
        processor(texts=raw["text"]["texts"])
    with pytest.raises(ValueError, match="reads detector regions, not pixels"):
        processor(images=[r["image"] for r in rows])
    with pytest.raises(ValueError, match="equally many"):
        processor(**raw["image"], texts=raw["text"]["texts"][:1])


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite MLflow store for the pyfunc tests (creating its tables takes seconds), whose
    experiment keeps its artifacts beside it, not in the working directory."""
    from alignlab.platform import tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.client(uri).create_experiment("export-test", artifact_location=(root / "artifacts").as_uri())
    return uri


@pytest.mark.parametrize("arch", ["simla", "mvptr"])  # pixels and ITM; regions, tags and phrases
def test_the_mlflow_pyfunc_embeds_as_from_pretrained_and_registers(arch, synth, mlflow_store, tmp_path):
    import mlflow
    import pandas as pd

    from alignlab.platform import tracking
    from alignlab.platform.export import log_model

    _checkpoint(arch, synth, tmp_path / "ckpt")
    uri, name = mlflow_store, f"tiny-{arch}"
    run_id = tracking.create_run(uri, "export-test", "pretraining")
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    info = log_model(uri, run_id, str(tmp_path / "ckpt"), registered_name=name)
    assert tracking.client(uri).get_run(run_id).info.status == "RUNNING"  # as it was: still training
    assert (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None) == before
    assert [v.version for v in tracking.client(uri).search_model_versions(f"name = '{name}'")] == [1]

    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    out = export(str(tmp_path / "ckpt"), tmp_path / "export")
    model, processor = from_pretrained(out), Processor.from_pretrained(out)
    rows = _raw_rows(synth)[:3]
    raw = _raw_inputs(rows, processor)
    image_columns = {"image": raw["image"]["images"]} if "images" in raw["image"] else {
        "region_features": [r["region_features"] for r in rows], "boxes": [r["boxes"] for r in rows],
        "tags": [r["tags"] for r in rows]}
    text_columns = {"text": raw["text"]["texts"], **({"phrases": raw["text"]["phrases"]} if "phrases" in raw["text"]
                                                      else {})}
    got = pyfunc.predict(pd.DataFrame({**image_columns, **text_columns}))
    pairs = processor(**raw["image"], **raw["text"])
    with torch.no_grad():
        assert torch.equal(torch.tensor(list(got["image_embedding"])), model.embed_images(pairs))
        assert torch.equal(torch.tensor(list(got["text_embedding"])), model.embed_texts(pairs))
        assert torch.equal(torch.tensor(list(got["match_score"]), dtype=torch.float64),
                           model.match_scores(pairs, pairs).double())
    texts_only = pyfunc.predict(pd.DataFrame(text_columns).head(1))
    assert list(texts_only.columns) == ["text_embedding"]

    # A run id exports the checkpoint its tag names, and the folder says which run it came from.
    tracking.client(uri).set_tag(run_id, "checkpoint", str(tmp_path / "ckpt"))
    by_run = export(run_id, tmp_path / "by_run", mlflow_uri=uri)
    assert json.loads((by_run / "config.json").read_text())["source"] == {"checkpoint": str(tmp_path / "ckpt"),
                                                                          "mlflow_run_id": run_id}


def test_a_finished_run_logs_its_final_model_registered_by_config_and_a_failure_only_warns(synth, mlflow_store,
                                                                                           tmp_path):
    import contextlib
    from types import SimpleNamespace

    from alignlab.platform import tracking
    from alignlab.platform.config import load_config

    _checkpoint("dual_encoder", synth, tmp_path / "ckpt")

    def finished(path):
        return SimpleNamespace(path=str(path), as_directory=lambda: contextlib.nullcontext(str(path)))

    uri = mlflow_store
    runs = {k: tracking.create_run(uri, "final-model", k) for k in ("pretraining", "vqa", "broken")}
    tracking.log_final_model(tracking.RunLogger(uri, runs["pretraining"]), finished(tmp_path / "ckpt"),
                             load_config(None, ["tracking.registered_model=final-dual"]))
    versions = tracking.client(uri).search_model_versions("name = 'final-dual'")
    assert [(v.version, v.run_id) for v in versions] == [(1, runs["pretraining"])]
    # A task model predicts: its run keeps the checkpoint and logs no model.
    tracking.log_final_model(tracking.RunLogger(uri, runs["vqa"]), finished(tmp_path / "ckpt"),
                             load_config("mvptr_demo", ["finetune.task=vqa"]))
    # A checkpoint that cannot be exported leaves the finished run as it is, with the reason.
    tracking.log_final_model(tracking.RunLogger(uri, runs["broken"]), finished(tmp_path / "missing"),
                             load_config(None, []))
    client = tracking.client(uri)
    logged = {m.source_run_id for m in client.search_logged_models([tracking.experiment_id(uri, "final-model")])}
    assert logged == {runs["pretraining"]}
    assert "missing" in client.get_run(runs["broken"]).data.tags["alignlab.model_error"]
    assert client.get_run(runs["broken"]).info.status == "RUNNING"
