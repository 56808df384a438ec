"""Optimizers, schedules, parameter groups, atomic checkpoints and exact resume."""

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from litebert.training.optim import Lamb, build_optimizer, build_scheduler, default_layer_id, param_groups
from litebert.training.state import (
    IncompleteCheckpointError,
    atomic_save_dir,
    checkpoint_dir,
    is_complete,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    restore_rng,
    save_training_state,
)

# --------------------------------------------------------------------------- LAMB


def test_lamb_one_step_matches_hand_computation():
    w0, g = [1.0, -2.0, 0.5], [0.5, -0.25, 1.0]
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-6, 0.01
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd).step()

    # step 1: m = (1-b1) g, v = (1-b2) g^2; bias correction gives m_hat = g, v_hat = g^2
    m_hat = [(1 - b1) * gi / (1 - b1) for gi in g]
    v_hat = [(1 - b2) * gi * gi / (1 - b2) for gi in g]
    u = [m / (math.sqrt(v) + eps) + wd * w for m, v, w in zip(m_hat, v_hat, w0)]
    ratio = math.sqrt(sum(w * w for w in w0)) / math.sqrt(sum(x * x for x in u))
    expected = [w - lr * ratio * x for w, x in zip(w0, u)]
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_lamb_trust_ratio():
    torch.manual_seed(0)
    # without weight decay every step moves a parameter by exactly lr * ||w||, whatever the gradient scale
    for scale in (1e-3, 1.0, 1e3):
        p = nn.Parameter(torch.randn(16) * 5)
        w = p.detach().clone()
        p.grad = torch.randn(16) * scale
        Lamb([p], lr=0.01).step()
        assert torch.linalg.vector_norm(p.detach() - w).item() == pytest.approx(0.01 * w.norm().item(), rel=1e-5)

    # zero weights: ratio 1, so the step is lr * adam_direction (~ lr * sign(g) on step 1)
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([2.0, -3.0, 0.5])
    Lamb([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1]), rtol=1e-5, atol=1e-6)

    # trust_ratio=False and no decay (the bias/LayerNorm group): plain Adam
    p = nn.Parameter(torch.tensor([10.0, -10.0]))
    q = nn.Parameter(p.detach().clone())
    opt = Lamb([{"params": [p], "trust_ratio": False}], lr=0.1)
    ref = torch.optim.Adam([q], lr=0.1, eps=1e-6)
    for i in range(3):
        p.grad = q.grad = torch.tensor([1.0, 0.5]) * (i + 1)
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach())


def test_lamb_reduces_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.5
    model = nn.Linear(8, 1)
    opt = build_optimizer(model, "lamb", lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


# --------------------------------------------------------------------------- parameter groups


class Tiny(nn.Module):
    def __init__(self, num_layers=2):
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(num_layers))
        self.classifier = nn.Linear(4, 2)
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.embeddings.weight  # tied: must appear once


def _group_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def test_param_groups_no_decay_for_bias_and_norm():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.01, lr=1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] == 0.0) == (p.ndim == 1)
            assert g["trust_ratio"] == (p.ndim > 1)
            assert g["lr"] == 1e-3 and g["lr_scale"] == 1.0


def test_layerwise_lr_decay():
    model, lr, d = Tiny(num_layers=2), 1e-3, 0.5
    opt = build_optimizer(model, "adamw", lr=lr, weight_decay=0.01, layer_decay=d, num_layers=2)
    assert isinstance(opt, torch.optim.AdamW)
    # heads 1.0, top layer d, next d^2, embeddings d^3
    assert _group_of(opt, model.classifier.weight)["lr"] == pytest.approx(lr)
    assert _group_of(opt, model.classifier.bias)["lr"] == pytest.approx(lr)
    assert _group_of(opt, model.layers[1][0].weight)["lr"] == pytest.approx(lr * d)
    assert _group_of(opt, model.layers[1][1].weight)["lr"] == pytest.approx(lr * d)  # LayerNorm: no decay, same lr
    assert _group_of(opt, model.layers[1][1].weight)["weight_decay"] == 0.0
    assert _group_of(opt, model.layers[0][0].weight)["lr"] == pytest.approx(lr * d**2)
    assert _group_of(opt, model.embeddings.weight)["lr"] == pytest.approx(lr * d**3)
    assert _group_of(opt, model.embeddings.weight)["lr_scale"] == pytest.approx(d**3)

    assert default_layer_id("albert.embeddings.word_embeddings.weight", 12) == 0
    assert default_layer_id("encoder.project.weight", 12) == 0
    assert default_layer_id("encoder.layers.0.attn.q.weight", 12) == 1
    assert default_layer_id("encoder.layers.11.ffn.fc1.bias", 12) == 12
    assert default_layer_id("encoder.attn.0.qkv.weight", 12) == 1
    assert default_layer_id("encoder.ffn.3.fc2.weight", 12) == 4
    assert default_layer_id("pooler.dense.weight", 12) == 13
    assert default_layer_id("mlm_head.decoder.bias", 12) == 13
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, 0.01, lr, layer_decay=0.9)
    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(model, "sgd", lr=lr, weight_decay=0.0)


# --------------------------------------------------------------------------- schedules


def _lrs_after(opt, sched, steps):
    for _ in range(steps):
        opt.step()
        sched.step()
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize(
    "schedule, kwargs, mid, end",
    [
        ("linear", {}, 0.5, 0.0),
        ("poly", {"power": 2.0}, 0.25, 0.0),
        ("cosine", {}, 0.5, 0.0),
        ("constant", {}, 1.0, 1.0),
        ("linear", {"min_lr_ratio": 0.1}, 0.55, 0.1),
        ("cosine", {"min_lr_ratio": 0.2}, 0.6, 0.2),
    ],
)
def test_schedules(schedule, kwargs, mid, end):
    model = Tiny()
    opt = build_optimizer(model, "lamb", lr=1.0, weight_decay=0.0, layer_decay=0.5, num_layers=2)
    scales = [g["lr_scale"] for g in opt.param_groups]
    sched = build_scheduler(opt, schedule, warmup_steps=10, total_steps=110, **kwargs)
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(scales)  # warmup starts at 0
    assert _lrs_after(opt, sched, 5) == pytest.approx([0.5 * s for s in scales])
    assert _lrs_after(opt, sched, 5) == pytest.approx(scales)  # warmup end
    assert _lrs_after(opt, sched, 50) == pytest.approx([mid * s for s in scales])  # decay midpoint
    assert _lrs_after(opt, sched, 50) == pytest.approx([end * s for s in scales])  # total_steps
    assert _lrs_after(opt, sched, 7) == pytest.approx([end * s for s in scales])  # stays there


def test_scheduler_validation():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    for kwargs, field in [
        ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
        ({"warmup_steps": 0, "total_steps": 10, "power": 0.0}, "power"),
        ({"warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio"),
    ]:
        with pytest.raises(ValueError, match=field):
            build_scheduler(opt, "linear", **kwargs)
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, "step", 0, 10)
    assert _lrs_after(opt, build_scheduler(opt, "linear", 0, 10), 0) == [1.0]  # no warmup: full lr at once


# --------------------------------------------------------------------------- checkpoints


def _save(run_dir, step, tag="v1"):
    model = nn.Linear(3, 2)
    return save_training_state(checkpoint_dir(run_dir, step), model_state=model.state_dict(), step=step,
                               data_state={"tag": tag}, rng=False)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_incomplete_and_stray_dirs_are_ignored(tmp_path):
    _save(tmp_path, 10)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    # a newer dir without a manifest, one whose file was truncated, a dead writer's tmp dir
    (checkpoint_dir(tmp_path, 20)).mkdir()
    (checkpoint_dir(tmp_path, 20) / "model.safetensors").write_bytes(b"junk")
    _save(tmp_path, 30)
    with open(checkpoint_dir(tmp_path, 30) / "model.safetensors", "r+b") as f:
        f.truncate(10)
    stray = checkpoint_dir(tmp_path, 40).with_name(f"step-00000040.tmp-{_dead_pid()}")
    stray.mkdir()
    (stray / "trainer_state.pt").write_bytes(b"partial")
    live = checkpoint_dir(tmp_path, 50).with_name(f"step-00000050.tmp-{os.getpid()}")  # a writer still running
    live.mkdir()

    assert not is_complete(checkpoint_dir(tmp_path, 20)) and not is_complete(checkpoint_dir(tmp_path, 30))
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert not stray.exists() and live.exists()
    with pytest.raises(IncompleteCheckpointError):
        load_training_state(checkpoint_dir(tmp_path, 30))
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_hash_mismatch_is_refused_on_load(tmp_path):
    path = _save(tmp_path, 1)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (path / "model.safetensors").write_bytes(bytes(data))
    assert is_complete(path) and not is_complete(path, verify_hashes=True)
    with pytest.raises(IncompleteCheckpointError):
        load_training_state(path)


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from litebert.training import state

    run_dir, step, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_replace = os.replace
    if mode == "mid_write":  # killed while writing trainer_state.pt
        def torch_save(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"half a pickle")
            die()
        torch.save = torch_save
    else:
        def replace(src, dst):
            if mode == "before_swap" and ".old-" in Path(dst).name:  # sealed, old one still in place
                die()
            if mode == "between_renames" and ".tmp-" in Path(src).name:  # old moved aside, new not in yet
                die()
            real_replace(src, dst)
        os.replace = replace
    state.save_training_state(state.checkpoint_dir(run_dir, step), model_state={"w": torch.ones(2)},
                              step=step, data_state={"tag": "v2"}, rng=False)
    """
)


@pytest.mark.slow
def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path):
    # (mode, step the crashing save writes, step and tag latest_checkpoint must then find)
    cases = [("mid_write", 20, 10, "v1"), ("before_swap", 10, 10, "v1"), ("between_renames", 10, 10, "v2")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = []
    for mode, step, _, _ in cases:
        _save(tmp_path / mode, 10)
        procs.append(subprocess.Popen([sys.executable, "-c", _CRASHER, str(tmp_path / mode), str(step), mode],
                                      env=env))
    for (mode, _, want_step, want_tag), proc in zip(cases, procs):
        assert proc.wait(timeout=60) == -signal.SIGKILL, mode
        found = latest_checkpoint(tmp_path / mode)
        assert found == checkpoint_dir(tmp_path / mode, want_step), mode
        assert load_training_state(found)["data_state"] == {"tag": want_tag}, mode
        assert sorted(p.name for p in (tmp_path / mode / "checkpoints").iterdir()) == [found.name], mode


def test_overwrite_and_prune(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    _save(tmp_path, 4, tag="again")
    assert load_training_state(latest_checkpoint(tmp_path))["data_state"] == {"tag": "again"}
    removed = prune_checkpoints(tmp_path, keep=2)
    assert removed == [checkpoint_dir(tmp_path, 1), checkpoint_dir(tmp_path, 2)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_exception_inside_atomic_save_leaves_target_untouched(tmp_path):
    target = _save(tmp_path, 5)
    with pytest.raises(RuntimeError, match="boom"), atomic_save_dir(target) as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert is_complete(target, verify_hashes=True)
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.random(), np.random.randn(), torch.randn(3)  # advance, incl. numpy's cached gaussian
    path = save_training_state(tmp_path / "ckpt", model_state={}, step=0)
    expected = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(load_training_state(path))
    got = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]
    with pytest.raises(ValueError, match="rng=False"):
        restore_rng(load_training_state(_save(tmp_path, 1))["rng"])


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 4)  # draws from the global RNG, so resume must restore it
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    opt = build_optimizer(model, "lamb", lr=0.01, weight_decay=0.01)
    return model, opt, build_scheduler(opt, "linear", warmup_steps=2, total_steps=10)


def test_resume_equals_uninterrupted_run(tmp_path):
    model, opt, sched = _fresh()
    _train(model, opt, sched, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _fresh()
    _train(model, opt, sched, 3)
    path = save_training_state(checkpoint_dir(tmp_path, 3), model_state=model.state_dict(), optimizer=opt,
                               scheduler=sched, step=3, data_state={"epoch": 0, "offset": 24}, extra={"note": "x"})
    torch.manual_seed(1234)  # clobber the RNG before resuming

    model, opt, sched = _fresh(seed=7)
    state = load_training_state(path)
    model.load_state_dict(state["model_state"])
    opt.load_state_dict(state["optimizer_state"])
    sched.load_state_dict(state["scheduler_state"])
    restore_rng(state)
    assert (state["step"], state["data_state"], state["extra"]) == (3, {"epoch": 0, "offset": 24}, {"note": "x"})
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 3
    _train(model, opt, sched, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_tied_tensors_are_saved(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    model_state = {"embed.weight": shared, "decoder.weight": shared, "view": shared.t()}
    state = load_training_state(save_training_state(tmp_path / "c", model_state=model_state, step=0))
    for k, v in model_state.items():
        assert torch.equal(state["model_state"][k], v), k


class _NotATensor:
    pass


def test_load_refuses_pickled_objects(tmp_path):
    target = tmp_path / "evil"
    with atomic_save_dir(target) as tmp:
        _save(tmp_path, 0)
        for name in ("model.safetensors", "trainer_state.json"):
            (tmp / name).write_bytes((checkpoint_dir(tmp_path, 0) / name).read_bytes())
        torch.save({"optimizer": _NotATensor(), "scheduler": None, "rng": None, "step": 0},
                   tmp / "trainer_state.pt")
    assert is_complete(target, verify_hashes=True)
    with pytest.raises(pickle.UnpicklingError):
        load_training_state(target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip_and_lamb_on_gpu(tmp_path):
    torch.cuda.manual_seed(3)
    path = save_training_state(tmp_path / "ckpt", model_state={"w": torch.ones(2, device="cuda")}, step=0)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(99)
    state = load_training_state(path, map_location="cuda")
    restore_rng(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert state["model_state"]["w"].is_cuda

    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], device="cuda"))
    q = nn.Parameter(p.detach().cpu())
    for param in (p, q):
        param.grad = torch.tensor([0.5, -0.25, 1.0], device=param.device)
        Lamb([param], lr=0.1, weight_decay=0.01).step()
    torch.testing.assert_close(p.detach().cpu(), q.detach())
