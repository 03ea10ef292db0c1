"""The training runner without Ray, on a toy fourth architecture registered from this module:
adding an architecture touches only models/ (here: this file) and a config, and the real runner
trains it, checkpoints it, resumes it and evaluates it."""
from __future__ import annotations

import logging
import math
import pickle
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import ConfigError, InputSpec, ModelOutput, ModelSpec, PretrainingModel, Vocab
from alignlab.models.objectives import clamp_logit_scale, contrastive_loss
from alignlab.models.registry import get_spec, register
from alignlab.platform.checkpoint import CheckpointError, read_checkpoint
from alignlab.platform.config import from_dict, load_config, to_dict
from alignlab.platform.train import LocalContext, NonFiniteLossError, Runner, param_groups


@dataclass
class ToyConfig:
    width: int = 16
    # Steps (by the model's own step counter) whose loss is made NaN: the non-finite guard's probe.
    nan_steps: tuple[int, int] = (-1, -1)
    # Asks the trainer for the eval.shortlist retriever's scores of every batch (shortlist_scores).
    shortlist_scores: bool = False


class Toy(PretrainingModel):
    """Bag-of-words text and mean-pooled regions, aligned by InfoNCE."""

    objectives = ("toy",)

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        w = model_cfg.toy.width
        self.text = nn.EmbeddingBag(vocab.size, w)
        self.image = nn.Linear(model_cfg.image.region_dim, w)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / model_cfg.temperature)))
        self.nan_steps = set(model_cfg.toy.nan_steps)
        self.current = 0
        self.seen_shortlist_scores: list[torch.Tensor] = []

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg):
        return InputSpec(regions=True, shortlist_scores=model_cfg.toy.shortlist_scores)

    def begin_step(self, step, steps_per_epoch):
        self.current = step

    def embed_texts(self, batch):
        return F.normalize(self.text(batch["input_ids"]), dim=-1)

    def embed_images(self, batch):
        m = batch["region_mask"].float()[..., None]
        return F.normalize(self.image((batch["region_features"] * m).sum(1) / m.sum(1)), dim=-1)

    def forward(self, batch):
        loss = contrastive_loss(self.embed_images(batch), self.embed_texts(batch), clamp_logit_scale(self.log_scale))
        if self.current in self.nan_steps:
            loss = loss * float("nan")
        if "shortlist_scores" in batch:
            self.seen_shortlist_scores.append(batch["shortlist_scores"])
        return ModelOutput(losses={"toy": loss})


TOY = register(ModelSpec(name="toy", model=Toy, config=ToyConfig, image_kinds=("regions",)))
VOCAB = Vocab(size=50)


def toy_config(*overrides: str):
    return load_config(None, ["model.architecture=toy", "model.image.kind=regions", "model.image.region_dim=6",
                              "model.dropout=0.0", "optim.lr=0.05", "optim.max_steps=8", "optim.warmup_steps=2",
                              "tracking.log_every=2", "tracking.checkpoint_every=4", "data.batch_size=8",
                              "eval.k_captions=4", "eval.k_images=4", *overrides])


def batches(n: int = 4, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches in which image i's region features encode its caption's token: learnable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        tokens = torch.randint(5, 50, (size,), generator=g)
        feats = F.one_hot(tokens % 6, 6).float()[:, None, :].expand(size, 2, 6).clone()
        out.append({"input_ids": torch.stack([tokens, tokens], 1), "attention_mask": torch.ones(size, 2, dtype=torch.long),
                    "region_features": feats, "region_mask": torch.ones(size, 2, dtype=torch.bool),
                    "image_key": torch.arange(size) + 100 * b})
    return out


class Sink:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.tags: dict[str, str] = {}

    def set_tag(self, key, value):
        self.tags[key] = value

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))

    def last_logged_step(self, key):
        return max((s for s, m in self.logged if key in m), default=None)

    def steps(self, key):
        return [s for s, m in self.logged if key in m]


def test_a_registered_toy_architecture_trains_through_the_runner(tmp_path):
    cfg = toy_config("model.toy.width=8")
    assert cfg.model.toy == ToyConfig(width=8) and to_dict(cfg)["model"]["toy"]["width"] == 8
    assert from_dict(to_dict(cfg)) == cfg
    data = batches()
    ctx = LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path))
    sink = Sink()
    runner = Runner(cfg, get_spec("toy"), VOCAB, ctx, steps_per_epoch=4, sink=sink).setup()
    final = runner.run()
    assert runner.step == 8 and runner.epoch == 1
    # Windows at steps 2 and 6 and the final one at 8, and the evaluation at 8: each once, and only
    # after a checkpoint covering its step was reported (steps 4 and 8).
    steps = [s for s, m in sink.logged if "loss/toy" in m]
    assert steps == [2, 4, 6, 8]
    assert [s for s, m in sink.logged if "eval/uni_rsum" in m] == [8]
    assert [has_ckpt for _, has_ckpt in ctx.reports] == [False, True, False, True]
    first, last = sink.logged[0][1]["loss/toy"], final["loss/toy"]
    assert last < first, (first, last)
    assert final["eval/uni_rsum"] > 0 and final["eval/eval_images"] == 8
    # Two kept, as Ray Train's CheckpointConfig(num_to_keep=2): the newest first.
    assert [read_checkpoint(d).step for d in ctx.checkpoints()] == [8, 4]


def test_training_time_leaves_set_up_and_evaluations_out_and_a_resumed_run_counts_on_from_it(tmp_path,
                                                                                               monkeypatch, caplog):
    data = batches()
    resume = Runner.resume

    def slow_resume(self):
        time.sleep(0.5)
        resume(self)

    monkeypatch.setattr(Runner, "resume", slow_resume)  # set-up that takes as long as an evaluation

    def slow_evaluation():
        time.sleep(0.5)
        return data[:1]

    sink = Sink()
    ctx = LocalContext(lambda: data, slow_evaluation, checkpoint_root=str(tmp_path))
    runner = Runner(toy_config("tracking.eval_every=2"), TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup()
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="alignlab.platform.train"):
        runner.run()
    wall = time.perf_counter() - t0
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    # A run sized in steps prints them: "step 2/8 ... trained 0.0 min".
    assert [m.split()[1] for m in steps] == ["2/8", "4/8", "6/8", "8/8"] and all(" of " not in m for m in steps), steps
    windows = [m for _, m in sink.logged if "time/train_seconds" in m]
    trained = [m["time/train_seconds"] for m in windows]
    assert len(trained) == 4 and trained == sorted(trained) and trained[0] > 0
    # Evaluations at steps 2, 4, 6 and 8 slept 2 s of the run, set-up 0.5 s before it; none is in a
    # window: each window of 2 toy steps x 8 samples, the first included, took far less than 0.5 s.
    assert trained[-1] < wall - 2.0, (trained, wall)
    assert all(16 / m["throughput/samples_per_s"] < 0.5 for m in windows)
    saved = read_checkpoint(ctx.checkpoints()[0]).trainer["train_seconds"]
    assert saved == pytest.approx(trained[-1], abs=0.05)

    resumed = Runner(toy_config("tracking.eval_every=2", "optim.max_steps=12"), TOY, VOCAB,
                     LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path)),
                     steps_per_epoch=4).setup()
    assert resumed.step == 8 and resumed.train_seconds == saved
    assert 0 < resumed.run()["time/train_seconds"] - saved < 0.5  # its slow set-up not counted either


def test_a_time_budget_ends_the_run_and_its_decay_at_its_minutes_and_a_resume_spends_only_the_rest(
        tmp_path, monkeypatch, caplog):
    forward = Toy.forward

    def slow_forward(self, batch):  # 50 ms a step: a budget of 0.4 s holds about 8 steps
        time.sleep(0.05)
        return forward(self, batch)

    monkeypatch.setattr(Toy, "forward", slow_forward)
    data, sink = batches(), Sink()
    budget = "optim.max_minutes=" + str(0.4 / 60)
    cfg = toy_config("optim.max_steps=1000", budget, "optim.warmup_steps=0", "tracking.checkpoint_every=1000")
    ctx = LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path))
    runner = Runner(cfg, TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup()
    with caplog.at_level(logging.INFO, logger="alignlab.platform.train"):
        final = runner.run()
    assert 2 <= runner.step <= 8, runner.step  # the minutes, not max_steps, ended it
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps and all("/1000" not in m and m.endswith(f" of {0.4 / 60:g} min") for m in steps), steps
    assert 0.4 <= final["time/train_seconds"] < 1.0
    # The LR decays with the minutes: down at every window, 0 at the last step, not at step 1000.
    lrs = [m["lr"] for _, m in sink.logged if "lr" in m]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.05 and lrs[-1] == 0.0, lrs
    assert [read_checkpoint(d).step for d in ctx.checkpoints()] == [runner.step]
    progress = [r["train/progress"] for r, _ in ctx.reports]  # what a sweep's console reads for its ETA
    assert progress == sorted(progress) and 0 < progress[0] < 1 and progress[-1] == 1.0

    again = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path)),
                   steps_per_epoch=4).setup()
    assert again.finished()  # its minutes spent: nothing to train
    again.run()
    assert again.step == runner.step
    longer = toy_config("optim.max_steps=1000", "optim.max_minutes=" + str(0.8 / 60), "optim.warmup_steps=0",
                        "tracking.checkpoint_every=1000")
    resumed = Runner(longer, TOY, VOCAB, LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path)),
                     steps_per_epoch=4).setup()
    assert not resumed.finished()
    resumed.run()
    assert runner.step + 2 <= resumed.step <= runner.step + 8  # the other 0.4 s, counted on from the checkpoint
    assert 0.8 <= resumed.train_seconds < 1.4


def test_unknown_architecture_lists_the_registered_ones_and_sections_are_typed():
    with pytest.raises(ConfigError, match="'mvptr', 'semvlp', 'simla', 'toy'"):
        load_config(None, ["model.architecture=toyy"])
    with pytest.raises(ConfigError, match="'model.toy.width' = 'wide' must be an int"):
        toy_config("model.toy.width=wide")
    with pytest.raises(ConfigError, match="unknown config key 'model.toy.widht' \\(did you mean 'width'"):
        toy_config("model.toy.widht=3")
    with pytest.raises(ConfigError, match="'model.image.kind' = 'vit' is not read by"):
        toy_config("model.image.kind=vit")


def _train(runner: Runner, steps: int) -> None:
    runner.model.train()
    for _ in range(steps):
        while runner.train_step() is None:
            pass


def _toy_runner(cfg, data, checkpoint_root=None) -> Runner:
    root = str(checkpoint_root) if checkpoint_root else None
    return Runner(cfg, TOY, VOCAB, LocalContext(lambda: data, checkpoint_root=root), steps_per_epoch=4).setup()


def _assert_same_weights(a: Runner, b: Runner) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)


def test_resume_restores_step_schedule_scaler_and_rng_and_continues_exactly(tmp_path):
    cfg = toy_config("model.dropout=0.0")
    data = batches()
    straight = _toy_runner(cfg, data)
    _train(straight, 6)

    first = _toy_runner(cfg, data, tmp_path)
    _train(first, 4)  # the epoch read whole: the resumed stream skips it and starts the next
    torch.manual_seed(123)  # the RNG state at the checkpoint, distinct from the seed's
    expected_rng = torch.get_rng_state()
    first.checkpoint()
    torch.manual_seed(999)
    resumed = _toy_runner(cfg, data, tmp_path)
    assert (resumed.step, resumed.epoch) == (4, 0)
    assert resumed.scheduler.last_epoch == 4 and resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    assert resumed.optimizer.state_dict()["state"][0]["step"] == first.optimizer.state_dict()["state"][0]["step"]
    _train(resumed, 2)
    _assert_same_weights(straight, resumed)


def test_a_checkpoint_of_the_per_tensor_adamw_resumes_on_the_fused_kernel_exactly(tmp_path):
    """Checkpoints written before the trainer's AdamW was fused hold ``fused: None`` in their
    groups; the resumed run keeps this device's fused kernel and continues as a straight run."""
    cfg = toy_config("model.dropout=0.0")
    data = batches()
    straight = _toy_runner(cfg, data)
    _train(straight, 6)
    first = _toy_runner(cfg, data, tmp_path)
    for g in first.optimizer.param_groups:
        g["fused"] = None  # the loop, as the trainer ran it before
    _train(first, 4)
    first.checkpoint()
    saved = read_checkpoint(str(first.ctx.checkpoints()[0])).trainer["optimizer"]["param_groups"]
    assert all(g["fused"] is None for g in saved)
    resumed = _toy_runner(cfg, data, tmp_path)
    assert resumed.step == 4 and all(g["fused"] for g in resumed.optimizer.param_groups)
    _train(resumed, 2)
    _assert_same_weights(straight, resumed)


def test_accumulation_steps_the_optimiser_once_per_grad_accum():
    cfg = toy_config("optim.grad_accum=2")
    data = batches(n=4)
    runner = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data), steps_per_epoch=2).setup()
    runner.model.train()
    assert runner.train_step() is not None and runner.train_step() is not None
    assert runner.step == 2 and runner.window.samples == 4 * 8
    assert int(runner.optimizer.state_dict()["state"][0]["step"]) == 2
    # The epoch's 4 batches are used up: the next call ends the epoch without stepping.
    assert runner.train_step() is None and runner.step == 2 and runner.epoch == 1


def test_an_odd_batch_left_at_the_epoch_end_is_dropped_not_stepped():
    cfg = toy_config("optim.grad_accum=2", "optim.warmup_steps=0", "optim.warmup_ratio=0.0")
    data = batches(n=3)
    runner = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data), steps_per_epoch=1).setup()
    runner.model.train()
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    assert runner.train_step() is not None
    after_one = {k: v.clone() for k, v in runner.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_one[k]) for k in before)
    assert runner.train_step() is None  # batch 3 alone: gradients dropped
    assert all(torch.equal(after_one[k], v) for k, v in runner.model.state_dict().items())
    assert all(p.grad is None for p in runner.model.parameters())


def test_an_epoch_without_a_batch_fails_instead_of_looping(tmp_path):
    """A training split that yields no batch (every row skipped, or fewer rows than a batch) would
    advance epochs forever; the runner stops at the first such epoch, and a split smaller than one
    step fails at start-up naming it."""
    from alignlab.platform.synth import SynthConfig, generate
    from alignlab.platform.train import prepare

    runner = Runner(toy_config(), TOY, VOCAB, LocalContext(lambda: []), steps_per_epoch=1).setup()
    with pytest.raises(RuntimeError, match="epoch 0 of the training split yielded no batch"):
        runner.run()
    generate(str(tmp_path), SynthConfig(n_train_images=4, n_test_images=2, captions_per_image=1, family_size=1))
    with pytest.raises(ConfigError, match=r"train: the training split has 4 rows, fewer than one optimiser step takes "
                                          r"\(data.batch_size = 8 x optim.grad_accum = 1\)"):
        prepare(toy_config(f"data.shards={tmp_path}", "data.batch_size=8"))


def test_a_model_asking_for_shortlist_scores_sees_the_retrievers_cosine_of_each_batch(tmp_path):
    """A re-ranker that trains on its shortlist's near misses gets, with every batch, the frozen
    eval.shortlist retriever's image-by-caption cosine (not its own), and cannot start without one."""
    from alignlab.platform.checkpoint import load_trained
    from alignlab.platform.synth import SynthConfig, generate
    from alignlab.platform.train import prepare

    data = batches()
    trained = LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path / "retriever"))
    Runner(toy_config(), TOY, VOCAB, trained, steps_per_epoch=4).setup().run()
    retriever = str(trained.checkpoints()[0])
    cfg = toy_config("model.toy.shortlist_scores=true", f"eval.shortlist={retriever}", "optim.max_steps=2",
                     "precision.precision=fp32")
    runner = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data), steps_per_epoch=4).setup()
    assert not any(p.requires_grad for p in runner.shortlist.parameters())
    _train(runner, 2)
    _, shortlist, _ = load_trained(retriever)
    for seen, batch in zip(runner.model.seen_shortlist_scores, data[:2], strict=True):
        expected = shortlist.embed_images(batch) @ shortlist.embed_texts(batch).t()
        assert seen.shape == (8, 8) and not seen.requires_grad
        torch.testing.assert_close(seen, expected)

    generate(str(tmp_path / "synth"), SynthConfig(n_train_images=16, n_test_images=2, captions_per_image=1,
                                                  family_size=1))
    with pytest.raises(ConfigError, match="shortlist_scores.*eval.shortlist is empty: set eval.shortlist="):
        prepare(toy_config(f"data.shards={tmp_path / 'synth'}", "model.toy.shortlist_scores=true"))


def test_non_finite_steps_are_skipped_and_a_run_of_them_fails_naming_the_step():
    cfg = toy_config("model.toy.nan_steps=[2, 3]", "optim.nonfinite_patience=3")
    data = batches()
    runner = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data), steps_per_epoch=4).setup()
    runner.model.train()
    _train(runner, 2)
    weights = {k: v.clone() for k, v in runner.model.state_dict().items()}
    _train(runner, 2)  # steps 2 and 3 are NaN: skipped, the weights untouched
    assert runner.nonfinite_skipped == 2 and runner.step == 4
    assert all(torch.equal(weights[k], v) for k, v in runner.model.state_dict().items())
    _train(runner, 1)  # a finite step resets the run of non-finite ones
    assert runner.nonfinite_run == 0 and all(torch.isfinite(p).all() for p in runner.model.parameters())

    cfg = toy_config("model.toy.nan_steps=[1, 2]", "optim.nonfinite_patience=2")
    runner = Runner(cfg, TOY, VOCAB, LocalContext(lambda: data), steps_per_epoch=4).setup()
    with pytest.raises(NonFiniteLossError, match="2 steps in a row, the last at step 2"):
        _train(runner, 3)


def test_evaluation_refuses_non_finite_weights():
    runner = Runner(toy_config(), TOY, VOCAB, LocalContext(batches), steps_per_epoch=4).setup()
    with torch.no_grad():
        runner.model.image.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="image.weight"):
        runner.evaluate()


def test_checkpoint_round_trips_and_a_crafted_pickle_runs_nothing(tmp_path):
    runner = Runner(toy_config(), TOY, VOCAB, LocalContext(batches), steps_per_epoch=4).setup()
    _train(runner, 3)
    runner.save_checkpoint(str(tmp_path / "ckpt"))
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.step == 3 and from_dict(ckpt.config) == runner.cfg
    assert all(torch.equal(ckpt.model[k], v) for k, v in runner.model.state_dict().items())

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "ckpt" / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    with pytest.raises(CheckpointError, match="trainer_state.pt was refused.*nothing in it was executed"):
        read_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "ckpt")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "state.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="before the safetensors format"):
        read_checkpoint(legacy)
    assert not marker.exists()


def test_temperatures_are_kept_out_of_weight_decay():
    model = TOY.build(toy_config().model, toy_config().objectives, VOCAB)
    decay, no_decay = param_groups(model, 0.01)
    assert any(p is model.log_scale for p in no_decay["params"])
    assert all(p is not model.log_scale for p in decay["params"]) and len(decay["params"]) == 2


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before_and_logs_each_step_once(tmp_path, caplog):
    data, sink = batches(), Sink()
    ctx = LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path))
    Runner(toy_config(), TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup().run()
    newest, previous = ctx.checkpoints()
    (newest / "model.safetensors").write_bytes(b"\x00" * 7)  # a torn write

    longer = toy_config("optim.max_steps=12")
    resumed = Runner(longer, TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup()
    assert resumed.step == 4 and resumed.logged_through == 8
    assert f"{newest / 'model.safetensors'} is not a readable safetensors file" in caplog.text
    assert "trying the checkpoint before it" in caplog.text
    resumed.run()
    # Steps 5-8 were trained again but MLflow already holds them: each step appears once.
    assert sink.steps("loss/toy") == [2, 4, 6, 8, 10, 12]
    assert sink.steps("train/resumed_from_step") == [4]
    refused = [m["train/checkpoints_refused"] for _, m in sink.logged if "train/checkpoints_refused" in m]
    assert refused == [1.0] and resumed.step == 12

    for d in ctx.checkpoints():
        (d / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="no checkpoint of this run could be resumed from") as e:
        Runner(longer, TOY, VOCAB, ctx, steps_per_epoch=4).setup()
    assert all(str(d / "trainer_state.json") in str(e.value) for d in ctx.checkpoints())


class Killed(Exception):
    """The process dying: nothing after it runs."""


def test_a_kill_between_committing_a_checkpoint_and_logging_its_metrics_loses_no_step(tmp_path):
    """Metrics reach the sink only once a committed checkpoint covers them; a kill after the commit
    but part-way through logging them (here after the first of the flush's entries) left those
    steps out of MLflow for good before checkpoints carried them."""
    data, sink = batches(), Sink()
    ctx = LocalContext(lambda: data, lambda: data[:1], checkpoint_root=str(tmp_path))

    def dies_after_one(metrics, step):
        if sink.logged:
            raise Killed
        Sink.log_metrics(sink, metrics, step)

    sink.log_metrics = dies_after_one
    with pytest.raises(Killed):
        Runner(toy_config(), TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup().run()
    assert [read_checkpoint(d).step for d in ctx.checkpoints()] == [4] and sink.steps("loss/toy") == [2]
    del sink.log_metrics

    resumed = Runner(toy_config(), TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup()
    assert resumed.step == 4 and sink.steps("loss/toy") == [2, 4] and sink.steps("train/checkpoint_step") == [4]
    resumed.run()
    assert sink.steps("loss/toy") == [2, 4, 6, 8] and sink.steps("train/checkpoint_step") == [4, 8]
    assert sink.steps("train/resumed_from_step") == [4]
    # A checkpoint whose metrics did reach the sink replays nothing.
    before = len(sink.logged)
    Runner(toy_config(), TOY, VOCAB, ctx, steps_per_epoch=4, sink=sink).setup().checkpoint()
    assert [set(m) for _, m in sink.logged[before:]] == [
        {"train/resumed_from_step", "train/resumed_epoch_rows", "train/checkpoints_refused"}, {"train/checkpoint_step"}]


def test_skipped_rows_are_logged_per_epoch_with_the_epoch_as_the_step():
    from alignlab.platform.ingest import DataQuality

    quality, data = DataQuality(), batches()

    def epoch():  # the read skips two rows each epoch, and one of them again mid-epoch
        p = quality.stream_start()[0]  # a one-pass stream: its pass is the epoch it starts at
        quality.add([("undecodable_image", "c1", "x", p), ("empty_caption", "c2", "y", p)], [], train=True)
        yield from data[:2]
        quality.add([("undecodable_image", "c1", "x", p)], [], train=True)
        yield from data[2:]

    sink = Sink()
    runner = Runner(toy_config(), TOY, VOCAB, LocalContext(epoch, lambda: data[:1], quality=quality),
                    steps_per_epoch=4, sink=sink).setup()
    runner.run()
    assert sink.steps("data/epoch_skipped_total") == [0, 1]
    per_epoch = [{k: v for k, v in m.items() if k.startswith("data/epoch_")} for _, m in sink.logged
                 if "data/epoch_skipped_total" in m]
    assert per_epoch == [{"data/epoch_skipped_undecodable_image": 1.0, "data/epoch_skipped_empty_caption": 1.0,
                          "data/epoch_skipped_total": 2.0}] * 2


def stream(quality, passes: int = 2, per_pass: int = 4, mixed: bool = True):
    """A training stream as ``ingest.build_dataset`` yields it: ``passes`` passes of ``per_pass``
    fresh batches from the pass the trainer said it starts at, each row tagged with its pass,
    the first batch of a later pass mixing in rows of the pass before (the shuffle buffer).
    Each pass skips rows c1 and c2, c1 again mid-pass."""
    from alignlab.platform.ingest import PASS_COLUMN

    first = quality.stream_start()[0]
    for p in range(first, first + passes):
        quality.add([("undecodable_image", "c1", "x", p), ("empty_caption", "c2", "y", p)], [], train=True)
        for i, b in enumerate(batches(n=per_pass, seed=p)):
            if i == per_pass // 2:
                quality.add([("undecodable_image", "c1", "x", p)], [], train=True)
            tag = torch.full((len(b["input_ids"]),), p)
            if mixed and p > first and i == 0:
                tag[: len(tag) // 2] = p - 1
            yield {**b, PASS_COLUMN: tag}


def test_a_stream_of_passes_ends_each_epoch_at_the_next_pass_without_dropping_a_step():
    from alignlab.platform.ingest import DataQuality, PASS_COLUMN

    quality, sink = DataQuality(), Sink()
    runner = Runner(toy_config(), TOY, VOCAB, LocalContext(lambda: stream(quality), lambda: batches()[:1],
                                                           quality=quality), steps_per_epoch=4, sink=sink).setup()
    seen = []
    forward = runner.trained.forward
    runner.trained.forward = lambda batch: (seen.append(set(batch)), forward(batch))[1]
    runner.model.train()
    epochs = []
    while runner.step < 8:
        assert runner.train_step() is not None  # the boundary inside the stream steps on
        epochs.append(runner.epoch)
    assert epochs == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(PASS_COLUMN not in keys for keys in seen)
    runner.run()  # at max_steps: records the last epoch's skips, evaluates, checkpoints
    assert sink.steps("data/epoch_skipped_total") == [0, 1]
    per_epoch = [m["data/epoch_skipped_total"] for _, m in sink.logged if "data/epoch_skipped_total" in m]
    assert per_epoch == [2.0, 2.0]


def test_a_resumed_run_starts_its_stream_where_the_checkpoints_steps_stopped(tmp_path):
    """The checkpoint holds how far into its epoch the steps read; the resumed stream starts at
    that epoch's pass, past those rows, instead of at the first rows of the first pass (which a
    run stopped more often than once a pass would read again and again)."""
    from alignlab.platform.ingest import DataQuality, PASS_COLUMN

    quality = DataQuality()
    ctx = LocalContext(lambda: stream(quality, passes=2), checkpoint_root=str(tmp_path), quality=quality)
    first = Runner(toy_config(), TOY, VOCAB, ctx, steps_per_epoch=4).setup()
    _train(first, 6)  # mid-stream: the second pass's second batch
    assert (first.step, first.epoch, first.epoch_rows_read()) == (6, 1, 16)
    first.checkpoint()
    resumed = Runner(toy_config("optim.max_steps=12"), TOY, VOCAB, ctx, steps_per_epoch=4).setup()
    assert (resumed.step, resumed.epoch, resumed.epoch_rows_read()) == (6, 1, 16)
    assert resumed.last_metrics["train/resumed_epoch_rows"] == 16.0
    straight = [b for b in stream(DataQuality(), passes=3)]  # passes 0-2 of an unbroken run
    seen = []
    forward = resumed.trained.forward
    resumed.trained.forward = lambda batch: (seen.append(batch["input_ids"]), forward(batch))[1]
    _train(resumed, 6)
    assert quality.stream_start() == (1, 16)
    assert (resumed.step, resumed.epoch) == (12, 2)
    # pass 1's last two batches, then pass 2's four: what the unbroken run trains on at steps 7-12
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(seen, straight[6:], strict=True))
    assert all(int(b[PASS_COLUMN].max()) == p for b, p in zip(straight[6:], [1, 1, 2, 2, 2, 2]))
    assert quality.epoch_counts(2) == {"undecodable_image": 1, "empty_caption": 1}


def test_a_finished_run_closes_its_training_stream():
    """The stream is longer than the run (Ray Data's holds every pass max_steps needs); left open,
    its prefetch threads outlive the run, and past ray.shutdown() they exit the process with 1."""
    closed = []

    def stream():
        try:
            yield from batches(n=4) * 3
        finally:
            closed.append(True)

    runner = Runner(toy_config("optim.max_steps=2"), TOY, VOCAB, LocalContext(stream, lambda: batches(n=1)),
                    steps_per_epoch=12).setup()
    runner.run()
    assert runner.step == 2 and closed == [True] and runner._batches is None


def test_the_run_is_tagged_with_the_precision_auto_resolved_to_not_the_configured_one(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    data = batches()
    sink = Sink()
    Runner(toy_config("precision.precision=auto"), TOY, VOCAB, LocalContext(lambda: data, checkpoint_root=str(tmp_path)),
           steps_per_epoch=4, sink=sink).setup()
    assert sink.tags == {"alignlab.precision": "fp32"}  # a CPU without native bf16
