"""Every backend a model directory can hold, checked against eager PyTorch; `pipeline()` over each; the ``auto`` rule;
the bench's peers skipped cleanly when their packages are absent.

Tolerances (as for the ONNX export, `test_export.py`): OpenVINO and CTranslate2 fp32 within 1e-4 absolute of eager
(observed ~1e-6 and below on these models); pipeline scores within 1e-4 for fp32 backends. int8 pipeline scores within
0.05 (probabilities). CTranslate2 int8 logits within 15% of their scale: its int8 is coarser than ONNX Runtime's on
these tiny random models with their x200 classifier (observed 11%); on the trained model it is judged by accuracy
(`bench/engines_pipeline.py`).
"""

import pytest
import torch

import litebert
from conftest import minilm_dir
from litebert import runtime
from litebert.inference import bench, engines, peers
from litebert.inference.export import ExportModule, check_cases, check_onnx, export_main, export_onnx
from litebert.inference.pipeline import pipeline
from litebert.tokenizer import load_tokenizer

pytest.importorskip("onnxruntime")
FP32_ATOL = 1e-4
INT8_REL = 0.05
TEXTS = ["a gripping, beautifully made film", "dull", {"text": "one", "text_pair": "two"}]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads cost more in barriers than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_backends(tmp_path_factory):
    """A tiny classifier's directory and an export directory holding ONNX fp32, int8 and OpenVINO."""
    pytest.importorskip("openvino")
    pytest.importorskip("ctranslate2")
    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    model = litebert.EncoderForSequenceClassification(litebert.preset("bert-test", vocab_size=30522,
                                                                      id2label={0: "neg", 1: "pos"})).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(200.0)  # spread the logits so that scores differ between inputs
    model_dir = model.save_pretrained(root / "model", tokenizer=load_tokenizer(minilm_dir()))
    out = root / "export"
    formats = "openvino,ctranslate2"
    assert export_main(["--model", str(model_dir), "--out", str(out), "--format", formats, "--quantize", "int8"]) == 0
    return model_dir, out


@pytest.mark.parametrize("family", ["bert-test", "albert-test", "distilbert-test"])
@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_openvino_matches_eager(family, task, tmp_path):
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = litebert.EncoderForSequenceClassification(litebert.preset(family, vocab_size=99)).eval()
    path = engines.export_openvino(export_onnx(model, tmp_path / "model.onnx", task), tmp_path)
    encoder = engines.OpenVinoEncoder(path, precision="fp32")
    assert encoder.task == task
    check = check_onnx(ExportModule(model, task).eval(), encoder, check_cases(model.config))
    assert {c["padded"] for c in check["cases"]} == {True, False}
    for name, diff in check["max_abs_diff"].items():
        assert diff <= FP32_ATOL, (name, diff)


def test_export_report_checks_openvino(all_backends):
    import json

    _, out = all_backends
    report = json.loads((out / "export_report.json").read_text())
    assert report["fp32_within_tolerance"]
    assert max(report["files"][engines.OPENVINO_FILE]["max_abs_diff"].values()) <= FP32_ATOL
    assert max(report["files"][engines.CT2_DIR]["max_abs_diff"].values()) <= FP32_ATOL
    int8 = report["files"][engines.CT2_DIR + "-int8"]
    assert int8["max_abs_diff"]["logits"] <= 0.15 * int8["max_abs_value"]["logits"]
    assert engines.backends_in(out) == ["onnx", "onnx-int8", "openvino", "ctranslate2", "ctranslate2-int8"]


@pytest.mark.parametrize("family", ["bert-test", "distilbert-test"])
def test_ctranslate2_matches_eager(family, tmp_path):
    pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = litebert.EncoderForSequenceClassification(litebert.preset(family, vocab_size=99)).eval()
    model_dir = model.save_pretrained(tmp_path / "model")
    encoder = engines.CTranslate2Encoder(engines.export_ctranslate2(model, model_dir, tmp_path / "out"))
    check = check_onnx(ExportModule(model, "text-classification").eval(), encoder, check_cases(model.config))
    assert check["max_abs_diff"]["logits"] <= FP32_ATOL


def test_ctranslate2_refuses_albert(tmp_path):
    pytest.importorskip("ctranslate2")
    model = litebert.EncoderForSequenceClassification(litebert.preset("albert-test", vocab_size=99)).eval()
    with pytest.raises(ValueError, match="no albert converter"):
        engines.export_ctranslate2(model, model.save_pretrained(tmp_path / "model"), tmp_path / "out")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "openvino", "ctranslate2", "ctranslate2-int8"])
def test_pipeline_loads_every_export_format(all_backends, backend):
    model_dir, out = all_backends
    eager = pipeline("text-classification", model=model_dir)(TEXTS, top_k="all")
    pipe = pipeline(model=out, backend=backend)
    assert pipe.backend.startswith(backend + ":")
    got = pipe(TEXTS, top_k="all")
    tol = INT8_REL if backend.endswith("int8") else FP32_ATOL
    for e, g in zip(eager, got):
        assert [x["label"] for x in e] == [x["label"] for x in g]
        assert all(abs(x["score"] - y["score"]) <= tol for x, y in zip(e, g)), (e, g)


def test_pipeline_on_a_torch_dir_reports_torch_and_rejects_unknown_backends(all_backends):
    model_dir, out = all_backends
    assert pipeline(model=model_dir).backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'onnx-int9'"):
        pipeline(model=out, backend="onnx-int9")
    with pytest.raises(FileNotFoundError, match="--format openvino"):
        pipeline(model=model_dir, backend="openvino")


def test_pipeline_on_an_empty_dir_names_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights and no export found"):
        pipeline(model=tmp_path)


@pytest.mark.parametrize("cpu", [{"cpu_class": "avx2"}, {"cpu_class": "native", "cpu_bf16": True}])
@pytest.mark.parametrize("present", [["torch"], ["onnx"], ["onnx", "openvino"], ["onnx", "onnx-int8", "openvino"],
                                     ["torch", "onnx", "onnx-int8", "openvino"], ["ctranslate2", "ctranslate2-int8"],
                                     ["torch", "onnx", "onnx-int8", "openvino", "ctranslate2", "ctranslate2-int8"]])
def test_auto_picks_a_backend_that_exists(cpu, present):
    with runtime.simulate(**cpu):
        for precision in ("auto", "fp32"):
            chosen = engines.choose_backend(present, precision)
            assert chosen in present
            if precision == "fp32":
                assert not chosen.endswith("int8")  # an explicit precision asks for its numbers
    with runtime.simulate("avx2"):
        assert engines.choose_backend(["torch", "onnx", "onnx-int8", "openvino"]) == "onnx-int8"
        assert engines.choose_backend(["torch", "onnx", "openvino"], "fp32") == "torch"
        assert engines.choose_backend(["onnx", "openvino"], "fp32") == "onnx"


def test_auto_skips_an_engine_that_is_not_installed(monkeypatch):
    monkeypatch.setattr(engines, "_runnable", lambda backend: backend != "openvino")
    with runtime.simulate("avx2"):
        assert engines.choose_backend(["onnx", "openvino"], "fp32") == "onnx"
        with pytest.raises(ValueError, match="no usable backend"):
            engines.choose_backend(["openvino"])


def test_auto_pipeline_logs_its_choice(all_backends, caplog):
    _, out = all_backends
    with runtime.simulate("avx2"), caplog.at_level("INFO", logger="litebert.inference.pipeline"):
        pipe = pipeline(model=out)
        exact = pipeline(model=out, precision="fp32")
    assert pipe.backend == "ctranslate2-int8:ctranslate2/model.bin" and exact.backend.startswith("ctranslate2:")
    assert "backend ctranslate2-int8" in caplog.text


def test_bench_reports_absent_peers_as_na(monkeypatch):
    real = peers._importable
    monkeypatch.setattr(peers, "_importable", lambda m: m not in ("openvino", "ctranslate2") and real(m))
    monkeypatch.setattr(bench, "_importable", lambda m: m != "openvino" and real(m))
    reasons = bench.unavailable(list(bench.BACKENDS))
    for name in ("ov-fp32", "ct2-fp32", "ct2-int8", "openvino"):
        assert "not installed" in reasons[name]
    assert "ort-fp32" not in reasons and "fp32" not in reasons


@pytest.mark.slow
def test_bench_times_a_peer_and_skips_the_rest(tmp_path):
    pytest.importorskip("transformers")
    skipped = {"ct2-fp32": "ctranslate2 is not installed (pip install 'litebert[peers]')"}
    results = bench.run_bench(["distilbert-test"], [(1, 8)], ["transformers", "fp32", "int8", "ort-fp32", "ct2-fp32"],
                              rounds=1, threads=1, workdir=tmp_path, skipped=skipped)
    row = results["rows"][0]
    assert set(row["ms"]) == {"transformers", "fp32", "int8", "ort-fp32"}
    assert row["vs_peers"]["fp32"]["peer"] == "ort-fp32"
    assert row["max_logit_diff"]["ort-fp32"] <= bench.TOLERANCE["fp32"]
    text = bench.render(results)
    assert "ct2-fp32: n/a (ctranslate2 is not installed" in text and "litebert against the engines" in text


def test_a_peer_without_a_converter_is_na_for_that_model(tmp_path):
    with pytest.raises(peers.PeerUnavailable, match="no albert converter"):
        peers._ct2_dir(tmp_path, tmp_path / "out", "albert", 99)


def test_compare_with_peers_picks_the_fastest_of_each_class():
    row = {"ms": {"transformers": 10.0, "fp32": 8.0, "int8": 4.0, "openvino": 6.0, "ort-fp32": 7.0, "ov-fp32": 5.0,
                  "ort-int8": 5.0}}
    with runtime.simulate("avx2"):
        vs = bench.compare_with_peers(row)
    assert vs["fp32"] == {"ours": "openvino", "peer": "ov-fp32", "x": 5.0 / 6.0}
    assert vs["int8"] == {"ours": "int8", "peer": "ort-int8", "x": 5.0 / 4.0}
    assert vs["auto"]["ours"] == "int8"
