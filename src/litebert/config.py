"""Encoder configurations: validated dataclasses, named presets, and a JSON round-trip with HF field names.

One hyper-parameter vocabulary for every family (``hidden_size``, ``num_hidden_layers``, ...). DistilBERT's
``dim``/``n_heads``/``n_layers`` names exist only in :meth:`DistilBertConfig.to_hf_dict` / ``from_hf_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ALBERT_SHARING = ("all", "attention", "ffn", "none")

# HF config keys that carry no meaning for our models; accepted silently when reading a config.json.
_HF_BOOKKEEPING = {
    "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "gradient_checkpointing", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "bos_token_id", "eos_token_id", "tie_word_embeddings", "position_embedding_type",
    "problem_type", "model_type", "classifier_dropout", "tokenizer_class", "_attn_implementation_autoset",
    "_attn_implementation", "pruned_heads", "torchscript", "add_cross_attention", "is_decoder", "cross_attention_hidden_size",
    "tie_encoder_decoder", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "max_length", "min_length", "num_beams", "temperature", "top_k", "top_p", "output_scores", "tf_legacy_loss",
    "use_bfloat16", "pad_token_id_", "layer_norm_eps_", "initializer_range_", "num_labels",
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


def unknown_key_error(key: str, valid: list[str] | set[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown field '{key}'{hint}")


# -- the one type check for config.json fields and recipe sections ----------------------------------------------
def _split_top(text: str, sep: str) -> list[str]:
    """Split a type string on ``sep`` outside brackets: ``dict[int, str] | None`` -> ``['dict[int, str]', 'None']``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def _matches(value: Any, kind: str) -> bool:
    base, _, args = kind.partition("[")
    args = args[:-1]
    if base in ("Any", "object") or not base:
        return True
    if base == "None":
        return value is None
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if base == "str":
        return isinstance(value, str)
    if base in ("list", "tuple", "Sequence"):
        if not isinstance(value, (list, tuple)):
            return False
        item = _split_top(args, ",")[0] if args else "Any"
        return all(any(_matches(v, alt) for alt in _split_top(item, "|")) for v in value)
    if base in ("dict", "Mapping"):
        return isinstance(value, dict)
    return True  # a type this checker does not know: the dataclass's own validation decides


def _describe(kind: str) -> str:
    words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null"}
    alts = [words.get(a, "a list" if a.startswith(("list", "tuple")) else "a mapping" if a.startswith("dict")
                      else a) for a in _split_top(kind, "|")]
    return " or ".join(alts)


def check_field_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Every value of ``values`` that names a field of dataclass ``cls`` must match the field's annotation.

    ``where`` prefixes the message (a file, ``config.json`` path or recipe section), so each error names the file
    and the field: ``model/config.json: hidden_dropout_prob must be a number, got '0.1'``."""
    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "Any")
             for f in dataclasses.fields(cls)}
    for name, value in values.items():
        kind = types.get(name)
        if kind is None:
            continue
        if not any(_matches(value, alt) for alt in _split_top(kind, "|")):
            raise ConfigError(f"{where}: {name} must be {_describe(kind)}, got {value!r}")


def read_json_file(path: str | Path, what: str = "JSON") -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file is a ``ConfigError`` naming it (and the line)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid {what} ({e.msg})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid {what} (nested too deeply)") from None


_MAX_SIZE = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "num_hidden_layers": 1 << 10,
             "num_attention_heads": 1 << 10, "intermediate_size": 1 << 18, "max_position_embeddings": 1 << 20}


def _label_map(value: Any, where: str) -> dict[int, str]:
    """``id2label``: a mapping of integer ids (JSON keys are strings) to label names."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: id2label must be a mapping of ids to labels, got {type(value).__name__} "
                          f"{str(value)[:60]}")
    out = {}
    for k, v in value.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: id2label keys must be integer ids, got {k!r}") from None
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ConfigError(f"{where}: id2label[{k!r}] must be a label name, got {v!r}")
        out[key] = str(v)
    if sorted(out) != list(range(len(out))):
        raise ConfigError(f"{where}: id2label ids must be 0..{len(out) - 1}, got {sorted(out)[:10]}")
    return out


@dataclass
class EncoderConfig:
    """Fields shared by every family. Sizes are in units (tokens, features), probabilities in [0, 1)."""

    model_type: ClassVar[str] = "encoder"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    attn_implementation: str = "sdpa"
    id2label: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if self.id2label is not None:
            self.id2label = _label_map(self.id2label, type(self).__name__)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        check_field_types(type(self), dataclasses.asdict(self), type(self).__name__)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
            if value > _MAX_SIZE[name]:
                # A typo'd size would otherwise try to allocate terabytes before anything says why.
                raise ConfigError(f"{type(self).__name__}.{name} ({value}) is larger than any encoder this "
                                  f"library builds (at most {_MAX_SIZE[name]})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{type(self).__name__}.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"{type(self).__name__}.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{type(self).__name__}.{name} must be in [0, 1), got {p!r}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"{type(self).__name__}.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"{type(self).__name__}.pad_token_id ({self.pad_token_id}) must be < vocab_size")
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ConfigError(f"{type(self).__name__}.layer_norm_eps must be a positive number, got "
                              f"{self.layer_norm_eps!r}")
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            raise ConfigError(f"{type(self).__name__}.initializer_range must be a number >= 0, got "
                              f"{self.initializer_range!r}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}.classifier_dropout must be in [0, 1), got "
                              f"{self.classifier_dropout!r}")

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in (self.id2label or {}).items()}

    @property
    def head_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    def replace(self, **changes: Any) -> EncoderConfig:
        """A validated copy with some fields changed (unknown fields are errors naming the field)."""
        valid = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in valid:
                raise unknown_key_error(key, valid, type(self).__name__)
        return dataclasses.replace(self, **changes)

    # -- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents, with the field names ``transformers`` expects."""
        d = dataclasses.asdict(self)
        d.pop("attn_implementation")
        id2label = d.pop("id2label")
        if id2label:
            d["id2label"] = {str(k): v for k, v in id2label.items()}
            d["label2id"] = {v: k for k, v in id2label.items()}
        d["model_type"] = self.model_type
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        d = dict(d)
        d.pop("label2id", None)
        valid = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in valid:
                kwargs[key] = value
            elif key in _HF_BOOKKEEPING or key.startswith(("_", "litebert_")):
                continue
            else:
                raise unknown_key_error(key, valid, f"{cls.__name__} (config.json)")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


@dataclass
class BertConfig(EncoderConfig):
    """BERT (Devlin et al. 2019): the teacher. Post-LN blocks, token-type embeddings, tanh pooler."""

    model_type: ClassVar[str] = "bert"


@dataclass
class AlbertConfig(EncoderConfig):
    """ALBERT (Lan et al. 2019).

    ``embedding_size`` (E) is factorised from ``hidden_size`` (H) with an E->H projection. Layers are shared the
    way the reference does it: the ``num_hidden_layers`` passes are split evenly over ``num_hidden_groups``
    groups, and each pass runs all ``inner_group_num`` layers of its group. ``share`` picks what is shared across
    the passes of a group: ``all`` (the reference), ``attention`` (attention shared, one FFN per pass), ``ffn``
    (FFN shared, one attention per pass) or ``none`` (nothing shared). Only ``all`` (and ``none``, saved as one
    group per layer) have a ``transformers`` equivalent.
    """

    model_type: ClassVar[str] = "albert"
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    share: str = "all"
    classifier_dropout_prob: float = 0.1

    def validate(self) -> None:
        super().validate()
        for name in ("embedding_size", "num_hidden_groups", "inner_group_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value > 1 << 16:
                raise ConfigError(f"AlbertConfig.{name} must be a positive integer, got {value!r}")
        if self.num_hidden_layers % self.num_hidden_groups:
            raise ConfigError(
                f"AlbertConfig.num_hidden_groups ({self.num_hidden_groups}) must divide "
                f"num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.share not in ALBERT_SHARING:
            raise ConfigError(f"AlbertConfig.share must be one of {ALBERT_SHARING}, got {self.share!r}")

    @property
    def head_dropout(self) -> float:
        return self.classifier_dropout_prob

    @property
    def hf_compatible(self) -> bool:
        return self.share == "all"

    def to_hf_dict(self) -> dict[str, Any]:
        d = super().to_hf_dict()
        if self.share == "none":
            # "nothing shared" is the reference's one-group-per-layer layout.
            d["num_hidden_groups"] = self.num_hidden_layers
        d.pop("share")
        if self.share not in ("all", "none"):
            d["litebert_share"] = self.share
            # transformers has no layout for partial sharing: under model_type "albert" its AutoModel would load
            # this checkpoint with random weights and only a warning, so the type is one only litebert knows.
            d["model_type"] = PARTIAL_SHARING_TYPE
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> AlbertConfig:
        share = d.get("litebert_share", "all")
        cfg = super().from_hf_dict(d)
        return cfg.replace(share=share) if share != "all" else cfg


@dataclass
class DistilBertConfig(EncoderConfig):
    """DistilBERT (Sanh et al. 2019): no token-type embeddings, no pooler, optional sinusoidal positions."""

    model_type: ClassVar[str] = "distilbert"
    type_vocab_size: int = 0
    num_hidden_layers: int = 6
    sinusoidal_pos_embds: bool = False
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2

    _HF_NAMES: ClassVar[dict[str, str]] = {
        "hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
        "intermediate_size": "hidden_dim", "hidden_dropout_prob": "dropout",
        "attention_probs_dropout_prob": "attention_dropout", "hidden_act": "activation",
    }

    def validate(self) -> None:
        super().validate()
        if self.type_vocab_size != 0:
            raise ConfigError("DistilBertConfig.type_vocab_size must be 0: DistilBERT has no token-type embeddings")

    def to_hf_dict(self) -> dict[str, Any]:
        d = super().to_hf_dict()
        for ours, theirs in self._HF_NAMES.items():
            d[theirs] = d.pop(ours)
        for unused in ("type_vocab_size", "layer_norm_eps", "classifier_dropout"):
            d.pop(unused)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DistilBertConfig:
        d = dict(d)
        for ours, theirs in cls._HF_NAMES.items():
            if theirs in d:
                d[ours] = d.pop(theirs)
        d.pop("tie_weights_", None)
        d.pop("type_vocab_size", None)
        return super().from_hf_dict(d)


CONFIG_CLASSES: dict[str, type[EncoderConfig]] = {c.model_type: c for c in (BertConfig, AlbertConfig, DistilBertConfig)}
PARTIAL_SHARING_TYPE = "litebert_albert"  # ALBERT with share: attention / ffn (no transformers equivalent)
LITEBERT_ONLY_TYPES = {PARTIAL_SHARING_TYPE: "albert"}


def config_from_dict(d: dict[str, Any]) -> EncoderConfig:
    """Build a config from a ``config.json`` dict (HF field names), dispatching on ``model_type``."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a JSON object of fields at the top level, got {type(d).__name__}")
    model_type = LITEBERT_ONLY_TYPES.get(d.get("model_type"), d.get("model_type"))
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"config: model_type must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}")
    return CONFIG_CLASSES[model_type].from_hf_dict(d)


def load_config(path: str | Path) -> EncoderConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {path}")
    d = read_json_file(path)
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# -- presets ----------------------------------------------------------------------------------------------------
_TEST = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
         "intermediate_size": 37, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0}

PRESETS: dict[str, tuple[type[EncoderConfig], dict[str, Any]]] = {
    # name: (class, overrides). Sizes follow the papers; parameter counts are asserted in tests/test_presets.py.
    "bert-base": (BertConfig, {}),
    "bert-large": (BertConfig, {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                "intermediate_size": 4096}),
    "albert-base": (AlbertConfig, {}),
    "albert-large": (AlbertConfig, {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "intermediate_size": 4096}),
    "albert-xlarge": (AlbertConfig, {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                                     "intermediate_size": 8192}),
    "albert-xxlarge": (AlbertConfig, {"hidden_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 64,
                                      "intermediate_size": 16384}),
    "distilbert-base": (DistilBertConfig, {}),
    "bert-test": (BertConfig, _TEST),
    "albert-test": (AlbertConfig, dict(_TEST, embedding_size=16, num_hidden_groups=2, inner_group_num=1)),
    "distilbert-test": (DistilBertConfig, dict(_TEST, num_hidden_layers=2)),
}


def preset(name: str, **overrides: Any) -> EncoderConfig:
    """A named preset, optionally with fields changed: ``preset("albert-base", num_hidden_layers=6)``."""
    if name not in PRESETS:
        raise unknown_key_error(name, set(PRESETS), "preset")
    cls, base = PRESETS[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in valid:
            raise unknown_key_error(key, valid, f"preset {name}")
    return cls(**{**base, **overrides})
