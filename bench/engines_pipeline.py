"""A trained sentence classifier end to end: litebert's ``pipeline(backend="auto")`` against the engines users pick.

    python bench/engines_pipeline.py --model runs/rt/final --data runs/rt/data/test.jsonl [--rounds 3]

The model is exported once into one directory holding every litebert backend (PyTorch weights, ONNX fp32, ONNX int8,
OpenVINO: ``litebert export --format openvino --quantize int8``, which checks each against eager), and
``litebert.pipeline(model=DIR)`` picks among them by its ``auto`` rule; each backend is also run by name. The peers
start from the same checkpoint (`litebert.inference.peers`) and are run the way their users run them: the sentences
in input order, 32 at a time, tokenized and padded to the longest of each batch, logits, argmax. litebert's pipelines
tokenize once and run length-bucketed batches of 32, the last layer for [CLS] alone.

Every contender classifies every sentence of ``--data`` (tokenizing included) in ``--rounds`` interleaved passes;
reported: sentences/s (median pass), accuracy, and agreement with ``transformers`` fp32. Prints a table and writes
``--json`` (default ``bench/results/engines_pipeline.json``), naming the CPU and the other processes' load.
"""

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import torch

from litebert.config import load_config
from litebert.data.tasks import read_text_classification
from litebert.inference.bench import _importable
from litebert.inference.engines import backends_in
from litebert.inference.export import _hf_model, export_main
from litebert.inference.peers import PEERS, PeerUnavailable, peer_forward, peers_unavailable
from litebert.inference.pipeline import pipeline
from litebert.perf import OtherLoad, format_table, interleaved_step_times
from litebert.runtime import hardware
from litebert.tokenizer import load_tokenizer

log = logging.getLogger("engines_pipeline")


def _gold(examples, config) -> list[int]:
    id2label = config.id2label or {}
    label2id = {str(v): int(k) for k, v in id2label.items()}
    return [label2id[str(ex.label)] if str(ex.label) in label2id else int(ex.label) for ex in examples]


def _export_dir(model_dir: Path, workdir: Path) -> Path:
    """Every litebert backend side by side: the exports plus a link to the PyTorch weights."""
    out = workdir / "all-backends"
    formats = "openvino,ctranslate2"
    assert export_main(["--model", str(model_dir), "--out", str(out), "--format", formats, "--quantize", "int8"]) == 0
    (out / "model.safetensors").symlink_to((model_dir / "model.safetensors").resolve())
    return out


def _padded_runner(forward, tokenizer, texts: list[str], names: list[str], batch_size: int):
    """As users run an engine: input order, ``batch_size`` sentences a call, padded to the batch's longest."""

    def run() -> list[int]:
        preds = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=512,
                            return_tensors="pt")
            with torch.inference_mode():
                logits = forward({n: enc[n] for n in names})
            preds += logits.argmax(-1).tolist()
        return preds

    return run


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/work/main/runs/rt/final", help="trained text-classification model dir")
    parser.add_argument("--data", default="/work/main/runs/rt/data/test.jsonl", help="labelled JSONL/CSV/TSV")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per contender, interleaved; median taken")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine")
    parser.add_argument("--json", default=str(here / "results" / "engines_pipeline.json"))
    args = parser.parse_args(argv)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model_dir = Path(args.model)
    config = load_config(model_dir)
    examples = read_text_classification(args.data, "text", None, "label")
    texts = [ex.text for ex in examples]
    gold = np.array(_gold(examples, config))
    label_ids = {v: int(k) for k, v in (config.id2label or {}).items()}
    tokenizer = load_tokenizer(model_dir)

    runs, skipped, backends = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="engines-pipeline-") as tmp:
        workdir = Path(tmp)
        all_dir = _export_dir(model_dir, workdir)
        for backend in ("auto", *backends_in(all_dir)):
            pipe = pipeline("text-classification", model=all_dir, backend=backend, batch_size=args.batch_size)
            name = f"litebert auto ({pipe.backend.split(':')[0]})" if backend == "auto" else f"litebert {backend}"
            backends[name] = pipe.backend
            runs[name] = lambda pipe=pipe: [label_ids[r["label"]] for r in pipe(texts)]
        hf = _hf_model(model_dir)
        names = ["input_ids", "attention_mask", *(["token_type_ids"] if config.type_vocab_size else [])]
        runs["transformers fp32"] = _padded_runner(lambda x: hf(**x).logits, tokenizer, texts, names, args.batch_size)
        skipped.update(peers_unavailable(PEERS))
        for peer in PEERS:
            if peer in skipped:
                continue
            try:
                forward = peer_forward(peer, model_dir, hf, workdir, threads)
            except PeerUnavailable as err:
                skipped[peer] = str(err)
                continue
            runs[peer] = _padded_runner(forward, tokenizer, texts, names, args.batch_size)
        if not _importable("openvino"):
            skipped["litebert openvino"] = "openvino is not installed"

        preds = {name: np.array(run()) for name, run in runs.items()}  # scores, and warms every contender up
        with OtherLoad() as load:
            times = interleaved_step_times(runs, rounds=args.rounds, steps_per_round=1, warmup=0)

    hw = hardware()
    ref = preds["transformers fp32"]
    result = {"cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability, "threads": threads, "model": str(model_dir),
              "data": args.data, "sentences": len(texts), "rounds": args.rounds, "other_load": load.fraction,
              "backends": backends, "skipped": skipped, "contenders": {}}
    rows = []
    for name, t in times.items():
        seconds = statistics.median(t["wall"])
        entry = {"sentences_per_s": len(texts) / seconds, "accuracy": float((preds[name] == gold).mean()),
                 "agreement_with_transformers": float((preds[name] == ref).mean()),
                 "seconds_per_pass": [round(x, 3) for x in t["wall"]]}
        result["contenders"][name] = entry
        rows.append([name, f"{entry['sentences_per_s']:.0f}", f"{100 * entry['accuracy']:.2f}",
                     f"{100 * entry['agreement_with_transformers']:.1f}"])
    rows.sort(key=lambda r: -float(r[1]))
    print(f"CPU: {hw.cpu_model} ({hw.cpu_capability}), {threads} threads; {len(texts)} sentences from {args.data}; "
          f"median of {args.rounds} interleaved passes")
    print(format_table(["contender", "sentences/s", "accuracy %", "agrees with transformers %"], rows))
    print("auto picked: " + next(v for k, v in backends.items() if k.startswith("litebert auto")))
    for name, reason in skipped.items():
        print(f"{name}: n/a ({reason})")
    if load.fraction is not None:
        print(f"Other processes used {100 * load.fraction:.0f}% of the CPUs during the run.")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
