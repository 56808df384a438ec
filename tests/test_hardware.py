"""The hardware probe (`litebert.runtime`): one answer per process, overridable for a lesser CPU class; precision
``auto`` follows it; old recipes' ``bf16`` flag still reads; nothing crashes or refuses on a CPU without bf16."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import litebert
from litebert import runtime
from litebert.config import ConfigError
from litebert.recipe import resolve
from litebert.training.loop import TrainConfig

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120,
                          check=False)


def test_probe_is_consistent_with_torch():
    hw = runtime.hardware()
    assert hw is runtime.hardware()  # measured once
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability() or hw.simulated
    assert hw.device == ("cuda" if torch.cuda.is_available() else hw.device)
    assert hw.threads >= 1 and hw.cpu_model
    assert not hw.amx or hw.avx512  # every AMX CPU has AVX-512
    assert hw.fused_linear(torch.float32) == hw.onednn
    assert hw.fused_linear(torch.bfloat16) == (hw.onednn and hw.cpu_bf16)


def test_simulate_answers_for_the_lesser_class_and_restores():
    before = runtime.hardware()
    with runtime.simulate("avx2") as hw:
        assert runtime.hardware() is hw
        assert (hw.cpu_capability, hw.avx512, hw.cpu_bf16, hw.amx, hw.vnni) == ("AVX2", False, False, False, False)
        assert hw.simulated == "avx2" and hw.cpu_model == before.cpu_model
        with runtime.simulate("native", cpu_bf16=True) as inner:  # nested overrides, e.g. a bf16 machine
            assert runtime.hardware() is inner and inner.cpu_bf16
        assert runtime.hardware() is hw
    assert runtime.hardware() is before
    with pytest.raises(ValueError, match="unknown CPU class"), runtime.simulate("pentium"):
        pass


def test_precision_auto_follows_the_probe(caplog):
    with runtime.simulate("avx2"):
        assert runtime.resolve_precision("auto", "cpu") == "fp32"
        assert runtime.resolve_precision(None) == "fp32" and runtime.resolve_precision(False) == "fp32"
        with caplog.at_level(logging.WARNING, logger="litebert.runtime"):
            assert runtime.resolve_precision("bf16", "cpu") == "bf16"  # explicit: runs, with a warning
        assert "emulated" in caplog.text and "slower than fp32" in caplog.text
    with runtime.simulate("native", cpu_bf16=True):
        assert runtime.resolve_precision("auto", "cpu") == "bf16" and runtime.resolve_precision(True) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        runtime.resolve_precision("fp16")


@pytest.mark.slow
def test_environment_variable_simulates_the_class_and_caps_the_kernels():
    """``LITEBERT_CPU=avx2`` is read once by the probe, and caps oneDNN / ATen at AVX2 before any kernel runs."""
    code = ("import os, json, litebert; from litebert.runtime import hardware; h = hardware(); "
            "print(json.dumps([h.simulated, h.cpu_bf16, h.vnni, os.environ.get('ONEDNN_MAX_CPU_ISA'), "
            "os.environ.get('ATEN_CPU_CAPABILITY')]))")
    proc = _run_python(code, LITEBERT_CPU="avx2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["avx2", False, False, "AVX2", "avx2"]
    bad = _run_python("from litebert.runtime import hardware; hardware()", LITEBERT_CPU="486")
    assert bad.returncode != 0 and "LITEBERT_CPU='486': unknown CPU class; choose from native, avx2" in bad.stderr


def test_env_command_prints_the_probe_and_the_decisions(capsys):
    from litebert.cli import main

    with runtime.simulate("avx2"):
        assert main(["env"]) == 0
        table = capsys.readouterr().out
        assert main(["env", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
    assert "capability                    AVX2 (AVX-512: no, native bf16: no" in table and "simulated                     avx2" in table
    assert "what litebert will do" in table
    assert info["simulated"] == "avx2" and info["cpu_bf16"] is False and info["torch"] == torch.__version__
    assert info["decisions"]["precision auto (cpu)"].startswith("fp32")
    assert info["decisions"]["fused linear (cpu inference)"] == ("fp32 on, bf16 off" if info["onednn"]
                                                                 else "fp32 off, bf16 off")


# -- recipes ---------------------------------------------------------------------------------------------------
def test_old_recipes_bf16_flag_reads_as_precision(tmp_path):
    defaults = {"train": {"precision": "auto", "lr": 1e-3}, "report": {"precision": ["fp32", "auto"]}}
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  bf16: true\nreport:\n  bf16: [false, true]\n")
    assert resolve(defaults, old) == {"train": {"precision": "auto", "lr": 1e-3},
                                      "report": {"precision": ["fp32", "auto"]}}
    assert resolve(defaults, None, ["--train.bf16", "false"])["train"]["precision"] == "fp32"
    assert resolve({"train": {"precision": "auto"}}, None, ["--bf16", "false"])["train"]["precision"] == "fp32"
    old.write_text("train:\n  bf16: 3\n")
    with pytest.raises(ConfigError, match="'train.bf16' must be true or false.*precision: auto \\| fp32 \\| bf16"):
        resolve(defaults, old)
    with pytest.raises(ConfigError, match="train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        TrainConfig(precision="fp8")


def test_shipped_recipes_say_auto():
    from pathlib import Path

    import yaml

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        train = yaml.safe_load(path.read_text())["train"]
        assert train.get("precision") == "auto" and "bf16" not in train, path.name


# -- serving on a CPU without bf16 -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from conftest import minilm_dir
    from litebert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = litebert.EncoderForSequenceClassification(litebert.preset("bert-test", vocab_size=30522,
                                                                      id2label={0: "neg", 1: "pos"}))
    return model.save_pretrained(tmp_path_factory.mktemp("clf"), tokenizer=load_tokenizer(minilm_dir()))


def test_server_with_bf16_on_a_cpu_without_it_answers_correctly(classifier_dir, cpu_class):
    import http.client

    from litebert.inference.pipeline import pipeline
    from litebert.inference.server import ModelServer

    texts = ["a gripping, beautifully made film", "dull"]
    expected = [r["label"] for r in pipeline("text-classification", model=str(classifier_dir), precision="fp32")(texts)]
    pipe = pipeline("text-classification", model=str(classifier_dir), precision="bf16")
    pipe.warm_up()
    server = ModelServer(pipe, "127.0.0.1", 0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/predict", json.dumps({"inputs": texts}), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        body = json.loads(reply.read())
        assert reply.status == 200, body
        assert [r["label"] for r in body["outputs"]] == expected
    finally:
        server.stop()


def test_server_that_cannot_run_its_model_refuses_to_start(classifier_dir, monkeypatch, capsys):
    """The failure the old code showed on AVX2 CPUs (a oneDNN bf16 primitive it could not create) now stops
    `litebert serve` before it reports healthy, with a message that says why."""
    from litebert.inference import pipeline as pipeline_mod
    from litebert.inference.server import serve_main

    def broken(self, items, opts):
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")

    monkeypatch.setattr(pipeline_mod.TextClassificationPipeline, "_predict", broken)
    assert serve_main(["--model", str(classifier_dir), "--port", "0", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "cannot run on this machine" in err and "could not create a primitive" in err
