"""Which int8 weight format to export: accuracy and speed of each of `INT8_FORMATS` on a trained classifier.

    .venv/bin/python bench/int8_formats.py --model runs/rt/final --validation runs/rt/data/test.jsonl

One fp32 ONNX export of ``--model``, quantised once per format (``s8``: int8 weights; ``s8-7bit``: int8 weights kept
in 7 bits; ``u8``: uint8 weights; all per output channel, activations uint8 per call), then, in one run through the
text-classification pipeline (tokenising and length buckets included, `litebert.inference.export.validate`):
accuracy on the labelled file and sentences/s, every backend timed interleaved in a fresh order each round. Also
the largest logit difference to eager PyTorch on random tiny models of every family (where a saturating kernel shows
most). The CPU, its capability and whether it has VNNI are printed with the result: ONNX Runtime picks its int8
kernels by the CPU it runs on, so the verdict is per CPU class.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import litebert
from litebert.checkpoint import TOKENIZER_FILES
from litebert.inference.export import (
    INT8_FORMATS,
    ONNX_FILE,
    ExportModule,
    OnnxEncoder,
    check_cases,
    check_onnx,
    export_onnx,
    quantize_int8,
    validate,
)
from litebert.runtime import hardware


def tiny_model_errors(workdir: Path) -> dict[str, dict[str, float]]:
    """Largest |int8 - eager| logit difference over the logits' range, per family and format, on random tiny
    classifiers with spread-out logits (as the export tests use)."""
    out: dict[str, dict[str, float]] = {}
    for family in ("bert-test", "albert-test", "distilbert-test"):
        torch.manual_seed(0)
        model = litebert.EncoderForSequenceClassification(litebert.preset(family, vocab_size=99)).eval()
        with torch.no_grad():
            model.classifier.weight.mul_(200.0)
        path = export_onnx(model, workdir / family / ONNX_FILE)
        cases = check_cases(model.config)
        reference = ExportModule(model, "text-classification").eval()
        out[family] = {}
        for fmt in INT8_FORMATS:
            check = check_onnx(reference, OnnxEncoder(quantize_int8(path, workdir / family / f"{fmt}.onnx",
                                                                    int8_format=fmt)), cases)
            out[family][fmt] = check["max_abs_diff"]["logits"] / check["max_abs_value"]["logits"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained text-classification model directory")
    p.add_argument("--validation", required=True, help="labelled CSV/TSV/JSONL (text, label)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per backend, interleaved (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)

    hw = hardware()
    with tempfile.TemporaryDirectory(prefix="litebert-int8-") as tmp:
        work = Path(tmp)
        model_dir = Path(args.model)
        out = work / "export"
        model = litebert.from_pretrained(str(model_dir)).eval()
        export_onnx(model, out / ONNX_FILE, "text-classification")
        for name in ("config.json", *TOKENIZER_FILES):  # the export directory is a model directory of its own
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out / name)
        files = [ONNX_FILE]
        for fmt in INT8_FORMATS:
            files.append(quantize_int8(out / ONNX_FILE, out / f"model.int8-{fmt}.onnx", int8_format=fmt).name)
        result = validate(model_dir, out, files, args.validation, "text", None, "label", {}, args.batch_size, None,
                          args.rounds, False)
        errors = tiny_model_errors(work / "tiny")
    backends = result["backends"]
    fp32 = backends[ONNX_FILE]
    print(f"CPU: {hw.cpu_model} ({hw.cpu_capability}, VNNI: {'yes' if hw.vnni else 'no'}, AMX: "
          f"{'yes' if hw.amx else 'no'}{', simulated ' + hw.simulated if hw.simulated else ''}), "
          f"{torch.get_num_threads()} threads; {result['examples']} sentences of {args.validation}")
    print(f"{'backend':<24} {'accuracy':>9} {'points':>7} {'sent/s':>8} {'x onnx fp32':>11}  "
          "max logit error / range on tiny bert, albert, distilbert")
    for name, b in backends.items():
        fmt = name.removeprefix("model.int8-").removesuffix(".onnx")
        tiny = ", ".join(f"{100 * errors[f][fmt]:.1f}%" for f in errors) if fmt in INT8_FORMATS else ""
        print(f"{name:<24} {100 * b['accuracy']:8.2f}% {100 * (b['accuracy'] - fp32['accuracy']):+7.2f} "
              f"{b.get('examples_per_s', 0):8.1f} {b.get('examples_per_s', 0) / fp32['examples_per_s']:11.2f}  {tiny}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability,
                                               "vnni": hw.vnni, "amx": hw.amx, "validation": result,
                                               "tiny_model_relative_error": errors}, indent=1))


if __name__ == "__main__":
    main()
