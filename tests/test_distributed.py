"""Device and process setup (LOCAL_RANK's GPU, DDP device ids, collectives on the backend's device), every rank's
own random streams (the torchrun check is in test_pretrain_e2e.py), and the GPU-user switches (precision, fp16 scaler, TF32, fused AdamW, pinned
memory, compile, activation checkpointing) — all on a CPU, with CUDA and the process group mocked where needed."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

from litebert import runtime
from litebert.config import ConfigError, preset
from litebert.heads import EncoderForPreTraining
from litebert.training import accel, loop
from litebert.training.loop import TrainConfig, train
from litebert.training.state import latest_checkpoint, load_training_state, rank_state, rng_state


def _where(t: torch.Tensor) -> torch.device:
    """Where a tensor is, or where the mocked CUDA was asked to put it."""
    return getattr(t, "_mock_device", t.device)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x)


@pytest.fixture
def two_gpus(monkeypatch):
    """Rank 1 of a 2-process NCCL job on a host with two (mocked) GPUs: LOCAL_RANK=1."""
    runtime.hardware()  # measured before CUDA is faked
    seen = {"set_device": [], "all_reduce": [], "ddp": [], "init": []}
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "set_device", lambda d: seen["set_device"].append(torch.device(d)))
    monkeypatch.setattr(cuda, "current_device", lambda: seen["set_device"][-1].index if seen["set_device"] else 0)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(cuda, "set_rng_state", lambda *a, **k: None)

    group = {"up": False, "backend": None}

    def init_process_group(backend, **kwargs):
        group.update(up=True, backend=backend)
        seen["init"].append((backend, kwargs))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "is_initialized", lambda: group["up"])
    monkeypatch.setattr(dist, "get_backend", lambda *a: group["backend"])
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: group.update(up=False))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen["all_reduce"].append(_where(t)))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, *a, **k: out.__setitem__(slice(None),
                                                                                             [obj] * len(out)))

    # Tensors sent to a GPU stay on the CPU, labelled with the GPU they were sent to.
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            self._mock_device = torch.device(target)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)

    class DDP(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module
            seen["ddp"].append((module, kwargs))

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def no_sync(self):
            import contextlib

            return contextlib.nullcontext()

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", DDP)
    tf32 = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    with runtime.simulate("native", device="cuda", cuda_bf16=True, cuda_name="mock GPU"):
        yield seen
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32


def test_local_rank_picks_the_gpu_for_model_batches_ddp_and_collectives(two_gpus, tmp_path):
    model = _Tiny()
    batches = [{"x": torch.randn(3, 4)} for _ in range(2)]
    seen_batches = []

    def objective(m, batch):
        seen_batches.append(_where(batch["x"]))
        return {"loss": m(batch["x"]).pow(2).mean()}

    cfg = TrainConfig(max_steps=2, batch_size=3, optimizer="adamw", log_every=1, eval_every=100, save_every=100,
                      progress=False, tensorboard=False, precision="fp32")
    summary = train(model, objective, batches, cfg, tmp_path / "run")
    gpu1 = torch.device("cuda", 1)
    assert two_gpus["set_device"] and set(two_gpus["set_device"]) == {gpu1}
    assert two_gpus["init"][0][0] == "nccl" and two_gpus["init"][0][1].get("device_id") == gpu1
    assert {_where(p) for p in model.parameters()} == {gpu1}
    assert seen_batches and set(seen_batches) == {gpu1}
    [(wrapped, kwargs)] = two_gpus["ddp"]
    assert wrapped is model and kwargs == {"device_ids": [1], "output_device": 1}
    assert two_gpus["all_reduce"] and set(two_gpus["all_reduce"]) == {gpu1}  # NCCL reduces GPU tensors only
    assert summary["device"] == "cuda:1" and summary["world_size"] == 2


def test_more_processes_than_gpus_is_a_clear_error(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2.*2 GPU"):
        runtime.setup_process()


def test_single_process_on_cpu_joins_no_group():
    proc = runtime.setup_process("cpu")
    assert (proc.rank, proc.world_size, proc.device, proc.backend) == (0, 1, torch.device("cpu"), None)
    assert runtime.collective_device() == torch.device("cpu") and runtime.ddp_device_args(proc.device) == {}
    assert runtime.gather_object({"a": 1}) == [{"a": 1}]


# -- the switches -----------------------------------------------------------------------------------------------
def test_auto_switches_on_cpu_and_on_cuda(monkeypatch):
    cfg = TrainConfig(optimizer="adamw")
    on_cpu = accel.resolve_accel(cfg, "cpu", False)
    assert on_cpu == accel.Accel("fp32", tf32=False, fused_optimizer=False, pin_memory=False, compile=False,
                                 activation_checkpointing=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    with runtime.simulate("native", device="cuda", cuda_bf16=True):
        gpu = accel.resolve_accel(cfg, "cuda:0", "auto", preset("albert-base"))
        assert (gpu.precision, gpu.tf32, gpu.fused_optimizer, gpu.pin_memory) == ("bf16", True, True, True)
        assert not gpu.compile and not gpu.activation_checkpointing
        assert accel.resolve_accel(cfg, "cuda:0", True, preset("albert-xxlarge")).activation_checkpointing
        assert not accel.resolve_accel(TrainConfig(optimizer="lamb"), "cuda:0", True).fused_optimizer
        explicit = TrainConfig(optimizer="adamw", tf32=False, fused_optimizer="off", pin_memory=False, compile=True,
                               activation_checkpointing="true")
        gpu = accel.resolve_accel(explicit, "cuda:0", "fp32")
        assert (gpu.precision, gpu.tf32, gpu.fused_optimizer, gpu.pin_memory) == ("fp32", False, False, False)
        assert gpu.compile and gpu.activation_checkpointing
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    with runtime.simulate("native", device="cuda", cuda_bf16=False):  # a pre-Ampere GPU: no bf16, no TF32
        gpu = accel.resolve_accel(cfg, "cuda:0", "auto")
        assert gpu.precision == "fp16" and not gpu.tf32
        assert accel.training_precision(True, "cuda:0") == "fp16"
        assert accel.training_precision("fp32", "cuda:0") == "fp32"


def test_bad_switch_values_name_the_field():
    with pytest.raises(ConfigError, match="train.tf32 must be auto, true or false"):
        TrainConfig(tf32="maybe")
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        accel.training_precision("fp16", "cpu")


def test_fp16_steps_through_the_scaler_and_its_state_resumes(tmp_path, monkeypatch):
    """fp16 with a gradient scaler, exercised on the CPU (where the recipe refuses fp16, so the decision is forced)."""
    fp16 = accel.Accel("fp16", tf32=False, fused_optimizer=False, pin_memory=False, compile=False,
                       activation_checkpointing=False)
    monkeypatch.setattr(loop, "resolve_accel", lambda *a, **k: fp16)
    dtypes = []

    def objective(m, batch):
        y = m(batch["x"])
        dtypes.append(y.dtype)
        return {"loss": y.float().pow(2).mean()}

    batches = [{"x": torch.randn(3, 4)} for _ in range(3)]
    cfg = TrainConfig(max_steps=2, batch_size=3, optimizer="adamw", log_every=1, eval_every=100, save_every=2,
                      progress=False, tensorboard=False)
    summary = train(_Tiny(), objective, batches, cfg, tmp_path, save_final=lambda m, d: None)
    assert summary["precision"] == "fp16" and set(dtypes) == {torch.float16}
    saved = load_training_state(latest_checkpoint(tmp_path))["extra"]["scaler"]
    assert saved["scale"] > 0

    loaded = []
    real = accel.grad_scaler

    def spy(precision, device):
        scaler = real(precision, device)
        plain = scaler.load_state_dict
        scaler.load_state_dict = lambda state: (loaded.append(state), plain(state))
        return scaler

    monkeypatch.setattr(loop, "grad_scaler", spy)
    cfg.max_steps = 3
    assert train(_Tiny(), objective, batches, cfg, tmp_path, save_final=lambda m, d: None)["step"] == 3
    assert loaded == [saved]


@pytest.mark.parametrize("name", ["bert-test", "albert-test", "distilbert-test"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    config = preset(name, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    plain = EncoderForPreTraining(config) if config.model_type != "distilbert" else None
    if plain is None:
        from litebert.heads import EncoderForMaskedLM

        plain = EncoderForMaskedLM(config)
    ckpt = type(plain)(config)
    ckpt.load_state_dict(plain.state_dict())
    names = list(ckpt.state_dict())
    assert accel.enable_activation_checkpointing(ckpt) > 0
    assert list(ckpt.state_dict()) == names  # checkpoints are unchanged
    ids = torch.randint(5, config.vocab_size, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)  # the same dropout masks; the recomputation replays them
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_compile_switch_compiles_the_encoder_in_place(monkeypatch):
    model = EncoderForPreTraining(preset("albert-test"))
    compiled = []
    monkeypatch.setattr(type(model.encoder), "compile", lambda self, *a, **k: compiled.append(self), raising=False)
    decided = accel.Accel("fp32", tf32=False, fused_optimizer=False, pin_memory=False, compile=True,
                          activation_checkpointing=False)
    assert accel.prepare_model(model, decided) is model and compiled == [model.encoder]


# -- every rank's own random streams ----------------------------------------------------------------------------
def test_rank_state_picks_this_ranks_entry_or_none_for_another_job_size():
    ranks = [{"rng": rng_state(), "data_state": {"epoch": 0, "examples_yielded": r}} for r in range(2)]
    state = {"ranks": ranks, "rng": ranks[0]["rng"], "data_state": ranks[0]["data_state"]}
    assert rank_state(state, 1, 2)["data_state"]["examples_yielded"] == 1
    assert rank_state(state, 0, 4) is None
    old = {"ranks": None, "rng": ranks[0]["rng"], "data_state": {"epoch": 1}}  # a single process's, before ranks
    assert rank_state(old, 0, 1)["data_state"] == {"epoch": 1} and rank_state(old, 1, 2) is None
