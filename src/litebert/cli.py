"""``litebert <command> ...``: one table from sub-command to the function that runs it.

Each function takes the remaining arguments and returns an exit code. ``litebert --help`` lists the commands,
``litebert <command> --help`` its options.
"""

from __future__ import annotations

import importlib
import logging
import sys

from .checkpoint import CheckpointError
from .config import ConfigError

# command -> (module, function, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-tokenizer": ("litebert.tokenizer", "train_tokenizer_main",
                        "train a WordPiece (BERT) or Unigram (ALBERT) tokenizer on text files"),
    "pretrain": ("litebert.training.pretrain", "pretrain_main",
                 "pre-train an encoder with MLM + sentence-order prediction from raw text"),
    "distill": ("litebert.training.distill", "distill_main",
                "distil a teacher into a smaller student (general or task-specific) with a compression report"),
    "finetune": ("litebert.training.finetune", "finetune_main",
                 "fine-tune for classification, regression, NER, extractive QA or multiple choice"),
    "evaluate": ("litebert.training.finetune", "evaluate_main", "score a fine-tuned model on a labelled file (JSON)"),
    "predict": ("litebert.inference.pipeline", "predict_main",
                "run a model over a JSONL/.txt file, one JSON prediction per line"),
    "export": ("litebert.inference.export", "export_main",
               "export to ONNX (optionally int8), checked against eager PyTorch"),
    "serve": ("litebert.inference.server", "serve_main", "serve a model's pipeline over a JSON HTTP API (loopback)"),
    "bench": ("litebert.inference.bench", "bench_main",
              "inference latency vs transformers (fp32, bf16, ONNX int8), side by side in one run"),
    "info": ("litebert.cli", "info_main", "print a model directory's or preset's configuration and size"),
    "env": ("litebert.cli", "env_main", "print the hardware litebert sees and what it will do with it (bug reports)"),
}


def env_main(argv: list[str]) -> int:
    """``litebert env [--json]``: versions, the hardware probe, and the precision / fast paths litebert picks."""
    import argparse
    import json
    import platform

    import torch

    from . import __version__
    from .runtime import hardware

    parser = argparse.ArgumentParser(prog="litebert env", description=env_main.__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    hw = hardware()
    info = {"litebert": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), **hw.report()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0

    def yes(flag: object) -> str:
        return "yes" if flag else "no"

    rows = {
        "versions": f"litebert {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "platform": platform.platform(),
        "device": f"{hw.device} (CUDA: {hw.cuda_name or 'no'}{', bf16' if hw.cuda_bf16 else ''}; MPS: {yes(hw.mps)})",
        "CPU": f"{hw.cpu_model}, {hw.threads} threads",
        "capability": f"{hw.cpu_capability} (AVX-512: {yes(hw.avx512)}, native bf16: {yes(hw.cpu_bf16)}, AMX: "
                      f"{yes(hw.amx)}, int8 VNNI: {yes(hw.vnni)}; oneDNN: {yes(hw.onednn)})",
        "simulated": hw.simulated or "no (LITEBERT_CPU=avx2 answers for the AVX2 class)",
    }
    decisions = info["decisions"]
    width = max(map(len, [*rows, *decisions]))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows.items()))
    print("\nwhat litebert will do:")
    print("\n".join(f"{k:<{width}}  {v}" for k, v in decisions.items()))
    return 0
    decisions = info.pop("decisions")
    width = max(map(len, [*info, *decisions]))
    for key, value in info.items():
        print(f"{key:<{width}}  {'yes' if value is True else 'no' if value is False else value}")
    print("\nwhat litebert will do:")
    for key, value in decisions.items():
        print(f"{key:<{width}}  {value}")
    return 0


def info_main(argv: list[str]) -> int:
    """``litebert info MODEL_DIR_OR_PRESET``."""
    import argparse
    import json
    from pathlib import Path

    import torch

    from . import build_encoder, from_pretrained, preset

    parser = argparse.ArgumentParser(prog="litebert info", description=info_main.__doc__)
    parser.add_argument("model", help="a model directory or a preset name (e.g. albert-base)")
    args = parser.parse_args(argv)
    if Path(args.model).is_dir():
        model = from_pretrained(args.model)
        config = model.config
    else:
        config = preset(args.model)
        with torch.device("meta"):
            model = build_encoder(config)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model_type": config.model_type, "class": type(model).__name__, "parameters": params,
                      "config": config.to_hf_dict()}, indent=2))
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: litebert <command> [options]   (litebert <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"litebert: unknown command '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""),
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"litebert {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The training loop has saved a checkpoint by now; a traceback would read as a crash.
        print(f"litebert {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
