"""Model directories that ``transformers`` reads and writes: ``config.json`` + ``model.safetensors``.

Our state-dict names are snake_case with a fused QKV projection; the reference names are produced and consumed
by one explicit name map per family (:func:`hf_name_map`). Loading reports every key it did not use; missing
encoder tensors and shape mismatches are errors that name the tensors. Weights are read with safetensors, or with
``torch.load(weights_only=True)`` for legacy ``pytorch_model.bin`` files; arbitrary pickles are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import AlbertConfig, EncoderConfig, load_config, read_json_file

log = logging.getLogger(__name__)

FAMILY_PREFIX = {"bert": "Bert", "albert": "Albert", "distilbert": "DistilBert"}
BASE_PREFIX = {"bert": "bert.", "albert": "albert.", "distilbert": "distilbert."}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "special_tokens_map.json")

# HF keys that carry no independent weights: tied decoders (same tensor as the word embeddings / the bias)
# and the position_ids buffer of older checkpoints. They are reported as ignored, never silently dropped.
_TIED_OR_BUFFER = re.compile(
    r"(.*\.position_ids$|^cls\.predictions\.decoder\.(weight|bias)$|^predictions\.decoder\.(weight|bias)$"
    r"|^vocab_projector\.weight$)"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model. The message names the tensors."""


@dataclass
class LoadReport:
    """What loading did with the checkpoint's tensors (names are the checkpoint's own)."""

    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacked (newly initialised)
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    ignored: list[str] = field(default_factory=list)  # tied copies and buffers, not weights of their own

    def summary(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "ignored"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        return "; ".join(parts) or "all tensors used"


# -- name maps --------------------------------------------------------------------------------------------------
Rule = tuple[str, Callable[[re.Match], str | list[str]]]


def _qkv(fmt: str, names: tuple[str, str, str]) -> Callable[[re.Match], list[str]]:
    return lambda m: [fmt.format(*m.groups()[:-1], n, m.groups()[-1]) for n in names]


def _sub(fmt: str) -> Callable[[re.Match], str]:
    return lambda m: fmt.format(*m.groups())


def _embedding_rules(p: str) -> list[Rule]:
    return [
        (r"encoder\.embeddings\.word\.(\w+)", _sub(p + "embeddings.word_embeddings.{}")),
        (r"encoder\.embeddings\.position\.(\w+)", _sub(p + "embeddings.position_embeddings.{}")),
        (r"encoder\.embeddings\.token_type\.(\w+)", _sub(p + "embeddings.token_type_embeddings.{}")),
        (r"encoder\.embeddings\.norm\.(\w+)", _sub(p + "embeddings.LayerNorm.{}")),
    ]


_HEAD_RULES: list[Rule] = [
    (r"(classifier|pre_classifier|qa_outputs)\.(\w+)", _sub("{}.{}")),
]


def _bert_rules() -> list[Rule]:
    L = "bert.encoder.layer.{}."
    return _embedding_rules("bert.") + [
        (r"encoder\.layers\.(\d+)\.attn\.qkv\.(\w+)", _qkv(L + "attention.self.{}.{}", ("query", "key", "value"))),
        (r"encoder\.layers\.(\d+)\.attn\.out\.(\w+)", _sub(L + "attention.output.dense.{}")),
        (r"encoder\.layers\.(\d+)\.attn\.norm\.(\w+)", _sub(L + "attention.output.LayerNorm.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.up\.(\w+)", _sub(L + "intermediate.dense.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.down\.(\w+)", _sub(L + "output.dense.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.norm\.(\w+)", _sub(L + "output.LayerNorm.{}")),
        (r"encoder\.pooler\.dense\.(\w+)", _sub("bert.pooler.dense.{}")),
        (r"mlm_head\.transform\.(\w+)", _sub("cls.predictions.transform.dense.{}")),
        (r"mlm_head\.norm\.(\w+)", _sub("cls.predictions.transform.LayerNorm.{}")),
        (r"mlm_head\.bias", lambda m: "cls.predictions.bias"),
        (r"sentence_head\.(\w+)", _sub("cls.seq_relationship.{}")),
    ] + _HEAD_RULES


def _albert_rules(config: AlbertConfig) -> list[Rule]:
    inner = config.inner_group_num

    def layer(kind: str) -> Callable[[re.Match], str | list[str]]:
        def f(m: re.Match) -> str | list[str]:
            k, rest = int(m.group(1)), m.group(2)
            base = f"albert.encoder.albert_layer_groups.{k // inner}.albert_layers.{k % inner}."
            if kind == "qkv":
                return [base + f"attention.{n}.{rest}" for n in ("query", "key", "value")]
            return base + kind.format(rest)
        return f

    return _embedding_rules("albert.") + [
        (r"encoder\.project\.(\w+)", _sub("albert.encoder.embedding_hidden_mapping_in.{}")),
        (r"encoder\.attn\.(\d+)\.qkv\.(\w+)", layer("qkv")),
        (r"encoder\.attn\.(\d+)\.out\.(\w+)", layer("attention.dense.{}")),
        (r"encoder\.attn\.(\d+)\.norm\.(\w+)", layer("attention.LayerNorm.{}")),
        (r"encoder\.ffn\.(\d+)\.up\.(\w+)", layer("ffn.{}")),
        (r"encoder\.ffn\.(\d+)\.down\.(\w+)", layer("ffn_output.{}")),
        (r"encoder\.ffn\.(\d+)\.norm\.(\w+)", layer("full_layer_layer_norm.{}")),
        (r"encoder\.pooler\.dense\.(\w+)", _sub("albert.pooler.{}")),
        (r"mlm_head\.transform\.(\w+)", _sub("predictions.dense.{}")),
        (r"mlm_head\.norm\.(\w+)", _sub("predictions.LayerNorm.{}")),
        (r"mlm_head\.bias", lambda m: "predictions.bias"),
        (r"sentence_head\.(\w+)", _sub("sop_classifier.classifier.{}")),
    ] + _HEAD_RULES


def _distilbert_rules() -> list[Rule]:
    L = "distilbert.transformer.layer.{}."
    return _embedding_rules("distilbert.") + [
        (r"encoder\.layers\.(\d+)\.attn\.qkv\.(\w+)", _qkv(L + "attention.{}.{}", ("q_lin", "k_lin", "v_lin"))),
        (r"encoder\.layers\.(\d+)\.attn\.out\.(\w+)", _sub(L + "attention.out_lin.{}")),
        (r"encoder\.layers\.(\d+)\.attn\.norm\.(\w+)", _sub(L + "sa_layer_norm.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.up\.(\w+)", _sub(L + "ffn.lin1.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.down\.(\w+)", _sub(L + "ffn.lin2.{}")),
        (r"encoder\.layers\.(\d+)\.ffn\.norm\.(\w+)", _sub(L + "output_layer_norm.{}")),
        (r"mlm_head\.transform\.(\w+)", _sub("vocab_transform.{}")),
        (r"mlm_head\.norm\.(\w+)", _sub("vocab_layer_norm.{}")),
        (r"mlm_head\.bias", lambda m: "vocab_projector.bias"),
    ] + _HEAD_RULES


def hf_name_map(model: nn.Module) -> dict[str, list[str]]:
    """Our state-dict key -> the reference key(s) it is made of (three for a fused QKV, concatenated on dim 0).

    Every key of the model must be covered: an unmapped key is a bug in this table, so it raises."""
    config = model.config
    rules = {"bert": _bert_rules, "distilbert": _distilbert_rules}.get(config.model_type)
    rules = rules() if rules else _albert_rules(config)
    compiled = [(re.compile(pattern + "$"), fn) for pattern, fn in rules]
    mapping = {}
    for key in _full_keys(model):
        for pattern, fn in compiled:
            m = pattern.match(key)
            if m:
                target = fn(m)
                mapping[key] = target if isinstance(target, list) else [target]
                break
        else:
            raise CheckpointError(f"internal: no reference name for tensor '{key}'")
    return mapping


def _is_bare_encoder(model: nn.Module) -> bool:
    return not hasattr(model, "encoder") or not isinstance(model.encoder, nn.Module)


def _full_keys(model: nn.Module) -> list[str]:
    """State-dict keys as seen from a task model: a bare encoder's keys get the ``encoder.`` prefix."""
    keys = list(model.state_dict().keys())
    return ["encoder." + k for k in keys] if _is_bare_encoder(model) else keys


def _hf_compatible(config: EncoderConfig) -> bool:
    return not isinstance(config, AlbertConfig) or config.share in ("all", "none")


# -- conversion -------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our weights under the reference names (fused QKV split back into query/key/value)."""
    sd = model.state_dict()
    prefix = "encoder." if _is_bare_encoder(model) else ""
    out = {}
    for key, targets in hf_name_map(model).items():
        tensor = sd[key[len(prefix):]]
        for name, part in zip(targets, tensor.chunk(len(targets), dim=0)):
            out[name] = part.detach().contiguous().clone()
    return out


def _add_base_prefix(sd: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Checkpoints of a bare ``BertModel`` have no ``bert.`` prefix; give them one."""
    prefix = BASE_PREFIX[model_type]
    if any(k.startswith(prefix) for k in sd):
        return sd
    base = ("embeddings.", "encoder.", "pooler.", "transformer.")
    return {(prefix + k if k.startswith(base) else k): v for k, v in sd.items()}


def load_hf_state_dict(model: nn.Module, sd: dict[str, Tensor], strict_encoder: bool = True) -> LoadReport:
    """Copy reference-named tensors into ``model``. Encoder tensors that are missing, and any tensor whose shape
    differs, raise :class:`CheckpointError` naming them; missing head tensors stay freshly initialised."""
    sd = _add_base_prefix(sd, model.config.model_type)
    own = model.state_dict()
    prefix = "encoder." if _is_bare_encoder(model) else ""
    report, used, new_state, mismatched = LoadReport(), set(), {}, []
    for key, sources in hf_name_map(model).items():
        if not all(s in sd for s in sources):
            report.missing.extend(s for s in sources if s not in sd)
            continue
        tensor = torch.cat([sd[s] for s in sources], dim=0) if len(sources) > 1 else sd[sources[0]]
        target = own[key[len(prefix):]]
        if tensor.shape != target.shape:
            mismatched.append(f"{'+'.join(sources)}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        new_state[key[len(prefix):]] = tensor
        used.update(sources)
    if mismatched:
        raise CheckpointError("tensor shapes do not match the config: " + "; ".join(mismatched))
    for k in sd:
        if k not in used:
            (report.ignored if _TIED_OR_BUFFER.match(k) else report.unexpected).append(k)
    _check_missing(report.missing, strict_encoder, sd_is_hf=True, model_type=model.config.model_type)
    model.load_state_dict(new_state, strict=False)
    return report


def _check_missing(missing: list[str], strict_encoder: bool, sd_is_hf: bool, model_type: str) -> None:
    if not strict_encoder:
        return
    enc = BASE_PREFIX[model_type] if sd_is_hf else "encoder."
    fatal = [k for k in missing if k.startswith(enc) and "pooler" not in k]  # a missing pooler is re-initialised
    if fatal:
        shown = ", ".join(fatal[:10]) + (" ..." if len(fatal) > 10 else "")
        raise CheckpointError(f"checkpoint lacks {len(fatal)} encoder tensor(s): {shown}")


def load_native_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> LoadReport:
    """Load a checkpoint saved under our own names (configurations the reference cannot express)."""
    own = model.state_dict()
    prefix = "encoder." if _is_bare_encoder(model) else ""
    sd = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in sd.items()}
    report = LoadReport(missing=[k for k in own if k not in sd], unexpected=[k for k in sd if k not in own])
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError("tensor shapes do not match the config: " + "; ".join(mismatched))
    _check_missing([prefix + k for k in report.missing], True, sd_is_hf=False, model_type=model.config.model_type)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return report


# -- files ------------------------------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_weights(model_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of a model directory, via safetensors (single or sharded) or a weights-only torch.load."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").exists():
        return _load_safetensors(model_dir / "model.safetensors")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in _shard_files(index):
            sd.update(_load_safetensors(shard))
        return sd
    legacy = model_dir / "pytorch_model.bin"
    if legacy.exists():
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain tensor file"
            raise CheckpointError(
                f"{legacy}: refused: this file needs arbitrary pickle code to load, which can run code on your "
                f"machine. Only safetensors or tensors-only torch files are loaded ({type(e).__name__}: {e})"
            ) from None
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)] if isinstance(sd, dict) else ["<top level>"]
        if bad:
            raise CheckpointError(f"{legacy}: not a tensor state dict (non-tensor entries: {', '.join(bad[:5])})")
        return sd
    raise CheckpointError(f"{model_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _shard_files(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names; each must be a file inside the model directory."""
    try:
        weight_map = read_json_file(index).get("weight_map")
    except AttributeError:
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' (a mapping of tensor names to shard files)")
    root = index.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        path = index.parent / name if isinstance(name, str) else None
        if path is None or Path(name).is_absolute() or not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{index}: shard {name!r} is not a file inside {index.parent}")
        shards.append(path)
    return shards


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub repository id, fetched with ``huggingface_hub`` when it is
    installed and the network allows (it never is in tests)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory (config.json + model.safetensors), got a file")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name_or_path}: not a local directory, and huggingface_hub is not installed to fetch it from the hub"
        ) from None
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network and auth errors come in many types
        raise CheckpointError(f"{name_or_path}: not a local directory and could not be fetched ({e})") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, fsync it, then rename it over ``path``: a reader or a
    crash never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def architecture_name(model: nn.Module) -> str:
    family = FAMILY_PREFIX[model.config.model_type]
    if not _hf_compatible(model.config):
        family = "Litebert" + family  # a name transformers does not know, like the config's model_type
    if _is_bare_encoder(model):
        return family + "Model"
    return type(model).__name__.replace("Encoder", family, 1)


def save_model(model: nn.Module, save_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) and the tokenizer if given."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf = _hf_compatible(config)
    d = config.to_hf_dict()
    d["architectures"] = [architecture_name(model)]
    d["tie_word_embeddings"] = True
    from . import __version__

    d["litebert_version"] = __version__
    if hf:
        tensors = to_hf_state_dict(model)
    else:
        d["litebert_native_weights"] = True
        prefix = "encoder." if _is_bare_encoder(model) else ""
        tensors = {prefix + k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(save_dir / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(save_dir / "config.json", lambda p: p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n"))
    if tokenizer is not None:
        tokenizer.save(save_dir)
    return save_dir


def load_weights_into(model: nn.Module, model_dir: str | Path) -> LoadReport:
    model_dir = Path(model_dir)
    sd = read_weights(model_dir)
    raw = read_json_file(model_dir / "config.json")
    if raw.get("litebert_native_weights"):
        report = load_native_state_dict(model, sd)
    else:
        report = load_hf_state_dict(model, sd)
    if report.missing:
        log.warning("%s: newly initialised (not in checkpoint): %s", model_dir, ", ".join(report.missing[:8]))
    if report.unexpected:
        log.warning("%s: checkpoint tensors not used by %s: %s", model_dir, type(model).__name__,
                    ", ".join(report.unexpected[:8]))
    if report.ignored:
        log.info("%s: ignored tied copies / buffers: %s", model_dir, ", ".join(report.ignored))
    return report


class PreTrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for encoders and task models."""

    config: EncoderConfig
    load_report: LoadReport | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **config_changes: Any):
        """Build the model from a directory's ``config.json`` (with ``config_changes`` applied, e.g. ``id2label``
        for a new classification head) and load its weights. ``model.load_report`` lists unused tensors."""
        model_dir = resolve_model_dir(name_or_path)
        config = load_config(model_dir)
        if config_changes:
            config = config.replace(**config_changes)
        model = cls._build(config)
        model.load_report = load_weights_into(model, model_dir)
        model.eval()
        return model

    @classmethod
    def _build(cls, config: EncoderConfig):
        if getattr(cls, "config_class", None) is not None and not isinstance(config, cls.config_class):
            raise CheckpointError(f"{cls.__name__} needs a {cls.config_class.model_type} checkpoint, "
                                  f"got model_type '{config.model_type}'")
        return cls(config)

    def save_pretrained(self, save_dir: str | Path, tokenizer: Any = None) -> Path:
        return save_model(self, save_dir, tokenizer)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Distinct parameters (shared ALBERT layers and tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
