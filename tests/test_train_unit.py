import pytest
import torch

from alignlab.platform.config import OptimConfig, load_config
from alignlab.platform.train import (adamw, local_cluster_cpus, lr_multiplier, param_groups, resolve_precision,
                                     schedule_position, weighted_total)


def test_linear_warmup_then_linear_decay_to_zero():
    o = OptimConfig(lr=1e-4, warmup_steps=10, max_steps=110, schedule="linear")
    assert lr_multiplier(0, o) == 0.0
    assert lr_multiplier(5, o) == 0.5
    assert lr_multiplier(10, o) == 1.0
    assert lr_multiplier(60, o) == pytest.approx(0.5)
    assert lr_multiplier(110, o) == 0.0


def test_cosine_decays_to_min_lr():
    o = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_ratio=0.1, max_steps=100, schedule="cosine")
    assert lr_multiplier(10, o) == pytest.approx(1.0)
    assert lr_multiplier(55, o) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, o) == pytest.approx(0.1)


def test_a_time_budget_moves_the_schedule_by_whichever_of_steps_and_minutes_is_further():
    o = OptimConfig(lr=1e-4, warmup_steps=10, max_steps=110, schedule="linear", max_minutes=1.0)
    assert schedule_position(50, o, 30.0) == 55.0  # half the minutes: half of max_steps
    assert schedule_position(80, o, 30.0) == 80.0  # the steps further on
    assert lr_multiplier(5, o, 0.0) == 0.5
    assert lr_multiplier(5, o, 3.0) == pytest.approx(0.55)  # 5.5 steps' worth: still warming up
    assert lr_multiplier(5, o, 6.0) == pytest.approx(0.99)  # 11 steps' worth: 1 of 100 decay steps
    assert lr_multiplier(20, o, 60.0) == 0.0  # the minutes spent: decayed at step 20
    assert schedule_position(50, OptimConfig(max_steps=110), 1e6) == 50.0  # no budget: steps alone


def test_precision_is_validated_against_the_device(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"  # bf16 would be emulated, slower than fp32
    assert caplog.text == ""  # sized in steps: fp32 costs time, not steps
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly: kept, with a warning
    assert "without native bf16" in caplog.text and "'auto' picks fp32" in caplog.text
    caplog.clear()
    assert resolve_precision("auto", cpu, max_minutes=44) == "fp32"  # sized in minutes: fewer steps, said
    assert "optim.max_minutes = 44" in caplog.text and "optim.max_minutes=0 optim.max_steps=N" in caplog.text
    caplog.clear()
    # A DDP run's other ranks resolve alike, in silence: one warning a run.
    assert resolve_precision("auto", cpu, max_minutes=44, warn=False) == "fp32"
    assert resolve_precision("bf16", cpu, warn=False) == "bf16" and caplog.text == ""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16" and caplog.text == ""
    assert resolve_precision("auto", cpu, max_minutes=44) == "bf16" and caplog.text == ""
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_weighted_total_and_param_groups():
    losses = {"itc": torch.tensor(2.0), "mlm": torch.tensor(3.0)}
    assert weighted_total(losses, {"mlm": 0.5}).item() == 3.5
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(m, 0.01)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_adamw_is_fused_on_the_cpu_and_takes_adams_first_step():
    """Adam's first step moves each weight by lr * g / (|g| + eps), and AdamW first decays it by
    lr * weight_decay (decoupled): 1 -> 1 - 0.1 * 0.01 - 0.1 = 0.899; biases are not decayed."""
    m = torch.nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(1.0), m.bias.fill_(1.0)
    m.weight.grad, m.bias.grad = torch.full((1, 1), 0.5), torch.full((1,), -2.0)
    opt = adamw(m, OptimConfig(lr=0.1, weight_decay=0.01, eps=1e-8), torch.device("cpu"))
    assert all(g["fused"] for g in opt.param_groups)
    opt.step()
    assert m.weight.item() == pytest.approx(0.899, abs=1e-6)
    assert m.bias.item() == pytest.approx(1.1, abs=1e-6)


def test_window_mean_of_a_loss_counts_only_the_steps_that_produced_it():
    """SemVLP's per-mode losses appear in some steps only: their window mean is over those steps,
    while the mode indicator averages over every step."""
    from alignlab.platform.train import Window

    w = Window()
    for step_means in ({"loss/mlm_single": 2.0, "model/mode_single": 1.0}, {"loss/mlm_two": 5.0, "model/mode_single": 0.0},
                       {"loss/mlm_single": 4.0, "model/mode_single": 1.0}, {"loss/mlm_two": 7.0, "model/mode_single": 0.0}):
        w.add(step_means)
    means = {k: total / count for k, (total, count) in w.sums.items()}
    assert means == {"loss/mlm_single": 3.0, "loss/mlm_two": 6.0, "model/mode_single": 0.5}


def test_local_cluster_has_slots_for_the_workers_and_the_data_stages(monkeypatch):
    """A 2-core machine still declares 6 slots (train worker, Tune trial, read and preprocess for
    train and for eval), and a worker holding more CPUs raises the count so the data stages never
    wait on its slots."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert local_cluster_cpus(None) == 5
    assert local_cluster_cpus(load_config(None, [])) == 6
    assert local_cluster_cpus(load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1.5"])) == 8
    # Trials run at once each hold their own slots, so no trial's evaluation waits on another's.
    assert local_cluster_cpus(load_config(None, ["scaling.max_concurrent_trials=2"])) == 12
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_cluster_cpus(load_config(None, ["scaling.num_workers=2"])) == 16


def test_a_run_restarted_to_show_more_resumes_the_same_run_but_a_changed_config_does_not():
    from alignlab.platform.train import run_key

    base = run_key(load_config(None, []))
    assert run_key(load_config(None, ["tracking.verbose=true", "tracking.system_metrics_every=0"])) == base
    assert run_key(load_config(None, ["optim.lr=1e-3"])) != base
    assert run_key(load_config(None, ["tracking.run_name=mine"])) == "mine"
