"""``litebert distill``: knowledge distillation from a teacher into a smaller, faster student.

    teacher dir ─▶ student config (teacher widths, fewer layers) ─▶ student init (embeddings + mapped layers)
    data ─▶ batches ─▶ DistillationObjective(teacher under no_grad, eval) ─▶ loop.train ─▶ OUT/final
                                                                             └─▶ compression report

Two modes (``distill.mode``):

- ``general``: pre-training distillation on raw text (DistilBERT). MLM batches from ``data/pretraining.py``
  (``sop`` off); the teacher is a masked-LM checkpoint; the student gets an MLM head.
- ``task``: task-specific distillation on a labelled file with a fine-tuned ``EncoderForSequenceClassification``
  teacher. The teacher's logits on the training set are computed once and cached as ``.npy`` (they do not change:
  the teacher is frozen and in eval mode), unless a hidden-state term needs the teacher online anyway.
- ``auto`` (default): ``task`` when the teacher is a sequence classifier, else ``general``.

Task distillation can also learn from a *transfer set* (``task.transfer``): unlabelled in-domain text that only the
teacher labels (Tang et al. 2019; TinyBERT's augmentation plays the same role). Its rows get soft targets and no hard
label; ``task.transfer_sentences`` splits long texts into sentences so they look like the task's inputs, and
``task.transfer_max`` caps how many (a seeded sample) are used.

Loss terms (section ``loss``; a weight of 0 switches a term off and skips the work it needs):

- ``kl``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per position, averaged over the non-padding positions (MLM:
  every non-padding token, or only the masked ones with ``kl_positions: masked``; task: each example). The T²
  keeps the gradient scale independent of T (Hinton et al. 2015).
- ``hard``: the student's own loss on the labels: masked LM, or the task's cross-entropy.
- ``cos``: ``1 - cos(h_s, h_t)`` between the last hidden states over non-padding positions (DistilBERT).
- ``hidden_mse``: MSE between the embedding outputs and each student layer and its mapped teacher layer
  (TinyBERT); ``attn_mse``: MSE between their attention probabilities (head-averaged when head counts differ).
  When the widths differ, student hidden states go through one learned ``Linear(H_s, H_t)``, trained with the
  student and not saved with it.

Student construction (section ``student``): ``preset`` (a preset such as ``distilbert-base``, or a family name
``bert`` / ``distilbert`` / ``albert``) or ``config`` (a ``config.json`` / model directory, used as it is). With
a preset and ``init_from_teacher``, the student takes the teacher's widths (vocabulary, hidden, heads, FFN,
positions, activation, dropout) so that its weights can be copied, and ``num_hidden_layers`` defaults to half the
teacher's; any other ``student.*`` key overrides. See :func:`default_layer_map` and
:func:`init_student_from_teacher` for what is copied.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (
    CONFIG_CLASSES,
    PRESETS,
    AlbertConfig,
    ConfigError,
    DistilBertConfig,
    EncoderConfig,
    load_config,
    unknown_key_error,
)
from ..heads import (
    EncoderForMaskedLM,
    EncoderForPreTraining,
    EncoderForSequenceClassification,
    from_pretrained,
)
from ..recipe import build, resolve
from .accel import autocast_for, training_precision
from .loop import TrainConfig, init_distributed, is_main_process, train
from .rundir import claim_run, release_lock

log = logging.getLogger(__name__)

MODES = ("auto", "general", "task")
KL_POSITIONS = ("all", "masked")
# Student fields inherited from the teacher when the student is built from a preset: everything that decides
# whether a teacher tensor fits into the student, plus the activation and dropout it was trained with.
INHERITED = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
             "hidden_act", "layer_norm_eps", "pad_token_id", "initializer_range", "hidden_dropout_prob",
             "attention_probs_dropout_prob")
STUDENT_KEYS = ("preset", "config", "init_from_teacher", "layer_map")


# -- recipe -----------------------------------------------------------------------------------------------------
def _config_fields() -> dict[str, None]:
    """Every encoder config field of every family, as student overrides (None = inherit / preset default)."""
    names: dict[str, None] = {}
    for cls in CONFIG_CLASSES.values():
        for f in dataclasses.fields(cls):
            if f.name not in ("id2label",):
                names[f.name] = None
    return names


@dataclasses.dataclass
class LossConfig:
    """Weights of the loss terms (0 = off) and the softmax temperature of the soft targets."""

    kl: float = 1.0
    hard: float = 1.0
    cos: float = 0.0
    hidden_mse: float = 0.0
    attn_mse: float = 0.0
    temperature: float = 2.0
    kl_positions: str = "all"

    def __post_init__(self) -> None:
        for name in ("kl", "hard", "cos", "hidden_mse", "attn_mse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loss.{name} must be a number >= 0, got {value!r}")
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature!r}")
        if self.kl_positions not in KL_POSITIONS:
            raise ConfigError(f"loss.kl_positions must be one of {KL_POSITIONS}, got {self.kl_positions!r}")
        if not any(getattr(self, n) for n in ("kl", "hard", "cos", "hidden_mse", "attn_mse")):
            raise ConfigError("loss: every weight is 0, so there is nothing to train")

    @property
    def needs_teacher_states(self) -> bool:
        return bool(self.cos or self.hidden_mse or self.attn_mse)


def default_recipe() -> dict[str, Any]:
    from ..data.pretraining import PretrainingConfig

    mlm = dataclasses.asdict(PretrainingConfig(sop=False))
    mlm.pop("max_seq_length")  # data.max_seq_length serves both modes
    return {
        "teacher": {"path": None},
        "tokenizer": {"path": None},
        "student": {"preset": "distilbert-base", "config": None, "init_from_teacher": True, "layer_map": None,
                    **_config_fields()},
        "distill": {"mode": "auto", "cache_teacher_logits": True},
        "loss": dataclasses.asdict(LossConfig()),
        "data": {"train": [], "validation": [], "test": [], "max_seq_length": 128, "cache_dir": None,
                 "eval_batches": 20, "num_workers": 0},
        "task": {"text_column": "text", "text_pair_column": None, "label_column": "label", "filter": None,
                 "test_fraction": 0.1, "validation_fraction": 0.1, "split_seed": 0, "eval_batch_size": 64,
                 "transfer": [], "transfer_filter": None, "transfer_max": 20000, "transfer_sentences": True},
        "mlm": mlm,
        "train": dataclasses.asdict(TrainConfig(optimizer="adamw", lr=1e-4, max_steps=1000, warmup_ratio=0.1)),
        "report": {"enabled": True, "ablation": False, "batch_sizes": [1, 32], "seq_len": 128, "repeats": 10,
                   "precision": ["fp32", "auto"]},
    }


# -- layer map --------------------------------------------------------------------------------------------------
def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layer initialises (and, for hidden-state losses, teaches) each student layer.

    Evenly spaced with the first and the last layer kept: student layer ``i`` takes teacher layer
    ``round(i * (N - 1) / (M - 1))``, halves rounded up, in exact integer arithmetic. 12 -> 6 gives DistilBERT's
    ``[0, 2, 4, 7, 9, 11]``, 6 -> 3 ``[0, 3, 5]``, 12 -> 4 ``[0, 4, 7, 11]``, N -> N the identity. A one-layer
    student takes the last layer, ``[N - 1]``. M > N repeats layers.
    """
    n, m = teacher_layers, student_layers
    if n < 1 or m < 1:
        raise ConfigError(f"layer map: layer counts must be >= 1, got teacher {n}, student {m}")
    if m == 1:
        return [n - 1]
    return [(2 * i * (n - 1) + (m - 1)) // (2 * (m - 1)) for i in range(m)]


def check_layer_map(layer_map: Sequence[int], teacher_layers: int, student_layers: int) -> list[int]:
    """Validate an explicit map: one teacher index per student layer (pass, for ALBERT), each in range."""
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
        raise ConfigError(f"student.layer_map must be a list of teacher layer indices, got {layer_map!r}")
    if len(layer_map) != student_layers:
        raise ConfigError(f"student.layer_map has {len(layer_map)} entries but the student has {student_layers} "
                          f"layers: give one teacher layer per student layer")
    for i, index in enumerate(layer_map):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < teacher_layers:
            raise ConfigError(f"student.layer_map[{i}] = {index!r} is out of range: the teacher has "
                              f"{teacher_layers} layers (0..{teacher_layers - 1})")
    return list(layer_map)


# -- student construction ---------------------------------------------------------------------------------------
def _encoder(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, nn.Module) else model


def student_config(teacher_config: EncoderConfig, section: dict[str, Any]) -> EncoderConfig:
    """The student's config from the ``student`` recipe section (see the module docstring)."""
    overrides = {k: v for k, v in section.items() if k not in STUDENT_KEYS and v is not None}
    if section.get("config"):
        config = load_config(section["config"])
        return config.replace(**overrides) if overrides else config
    name = section.get("preset")
    if not name:
        raise ConfigError("student: give a preset (e.g. distilbert-base) or a config (a config.json / model dir)")
    if name in CONFIG_CLASSES:
        cls, base = CONFIG_CLASSES[name], {}
    elif name in PRESETS:
        cls, base = PRESETS[name]
    else:
        raise unknown_key_error(name, set(PRESETS) | set(CONFIG_CLASSES), "student.preset")
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in valid:
            raise unknown_key_error(key, valid, f"student ({cls.model_type})")
    values = dict(base)
    if section.get("init_from_teacher", True):
        values.update({k: getattr(teacher_config, k) for k in INHERITED})
        values["num_hidden_layers"] = max(1, teacher_config.num_hidden_layers // 2)
        if cls is not DistilBertConfig:
            values["type_vocab_size"] = max(teacher_config.type_vocab_size, 1)
    values["id2label"] = teacher_config.id2label
    values.update(overrides)
    return cls(**values)


def _blocks_by_module(encoder: nn.Module) -> tuple[list[tuple[nn.Module, list[int]]], list[tuple[nn.Module, list[int]]]]:
    """(attention modules, feed-forward modules), each with the passes that run it, for every family."""
    if hasattr(encoder, "layers"):
        return ([(b.attn, [i]) for i, b in enumerate(encoder.layers)],
                [(b.ffn, [i]) for i, b in enumerate(encoder.layers)])
    if encoder.config.inner_group_num != 1:
        raise ConfigError("student/teacher init: ALBERT with inner_group_num > 1 is not supported (one layer per "
                          "pass is needed to map teacher layers)")
    attn = [(m, [i for i, ids in enumerate(encoder._attn_index) if ids[0] == k]) for k, m in enumerate(encoder.attn)]
    ffn = [(m, [i for i, ids in enumerate(encoder._ffn_index) if ids[0] == k]) for k, m in enumerate(encoder.ffn)]
    return attn, ffn


def _teacher_block(encoder: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
    attn, ffn = _blocks_by_module(encoder)
    pick = lambda mods: next(m for m, passes in mods if layer in passes)
    return pick(attn), pick(ffn)


def _copy_(dst: Tensor, src: Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


@torch.no_grad()
def _factorize_embeddings(student_enc: nn.Module, teacher_emb: nn.Module) -> None:
    """ALBERT student from a full-width teacher: E-dim embeddings + an E->H projection that reproduce the
    teacher's embedding output for inputs in the span of its top E-1 principal directions.

    With P (r x H, r = E - 1) the top right-singular vectors of the row-centred [word; position; token type]
    tables, and Q (E x r) an orthonormal basis of the E-vectors with zero mean, the student's tables are the
    teacher's times A^T (A = Q P). Then the student's sum z = A s has zero mean, so LayerNorm_E only rescales it
    by sqrt(E)/|z|, and a projection W = sqrt(H/E) diag(gamma_t) A^T, b = beta_t gives the teacher's
    LayerNorm_H(s) = gamma_t (s - mean) sqrt(H)/|s - mean| + beta_t whenever s - mean lies in P's span.
    """
    emb, project = student_enc.embeddings, student_enc.project
    E, H = emb.word.embedding_dim, teacher_emb.word.embedding_dim
    tables = [teacher_emb.word.weight, teacher_emb.position.weight]
    if teacher_emb.token_type is not None:
        tables.append(teacher_emb.token_type.weight)
    stacked = torch.cat([t.float() for t in tables])
    centred = stacked - stacked.mean(dim=1, keepdim=True)
    r = min(E - 1, H - 1, centred.shape[0])
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    P = vh[:r] - vh[:r].mean(dim=1, keepdim=True)  # numerically orthogonal to the all-ones direction
    P = torch.linalg.qr(P.T).Q.T  # (r, H), orthonormal rows
    ones_free = torch.eye(E) - 1.0 / E
    Q = torch.linalg.qr(ones_free[:, :r]).Q  # (E, r), columns orthonormal and zero-mean
    A = Q @ P  # (E, H)
    V = min(emb.word.num_embeddings, teacher_emb.word.num_embeddings)
    emb.word.weight[:V] = teacher_emb.word.weight[:V].float() @ A.T
    npos = min(emb.position.num_embeddings, teacher_emb.position.num_embeddings)
    if emb.position.weight.requires_grad:
        emb.position.weight[:npos] = teacher_emb.position.weight[:npos].float() @ A.T
    if emb.token_type is not None:
        if teacher_emb.token_type is not None:
            nt = min(emb.token_type.num_embeddings, teacher_emb.token_type.num_embeddings)
            emb.token_type.weight[:nt] = teacher_emb.token_type.weight[:nt].float() @ A.T
        else:
            emb.token_type.weight.zero_()
    emb.norm.weight.fill_(1.0)
    emb.norm.bias.zero_()
    gamma, beta = teacher_emb.norm.weight.float(), teacher_emb.norm.bias.float()
    project.weight.copy_((H / E) ** 0.5 * gamma[:, None] * A.T)  # (H, E)
    project.bias.copy_(beta)


@torch.no_grad()
def init_student_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: Sequence[int]) -> list[str]:
    """Copy what fits from the teacher into the student; returns a line per copy (``student <- teacher``).

    - Embeddings: word and position rows and the LayerNorm. A student without token types (DistilBERT) gets the
      teacher's type-0 vector folded into its positions, so single-segment inputs embed exactly as in the teacher.
      An ALBERT student gets a factorised copy (see :func:`_factorize_embeddings`).
    - Layers: a module run by passes S takes teacher layer ``layer_map[S[len(S) // 2]]``, the layer the map gives
      the middle pass: for BERT/DistilBERT students, layer j <- teacher layer ``layer_map[j]``; for an ALBERT
      student with one shared layer over L passes, the teacher layer mapped to pass L // 2.
    - Heads (same width): pooler <-> pooler; a DistilBERT ``pre_classifier`` <-> a BERT/ALBERT pooler (DistilBERT
      uses ReLU where the pooler uses tanh, so this is a starting point, not an equivalence); the classifier when
      the labels agree; the masked-LM transform, norm and bias.
    Tensors whose shapes differ (another width) are left as initialised, with a warning.
    """
    s_enc, t_enc = _encoder(student), _encoder(teacher)
    copied: list[str] = []
    t_layers = len(_blocks_by_module(t_enc)[0]) if hasattr(t_enc, "layers") else t_enc.config.num_hidden_layers
    check_layer_map(layer_map, t_layers, student.config.num_hidden_layers)
    se, te = s_enc.embeddings, t_enc.embeddings

    # embeddings
    if isinstance(s_enc.config, AlbertConfig) and not isinstance(t_enc.config, AlbertConfig):
        if se.word.embedding_dim >= 2 and te.word.embedding_dim == s_enc.config.hidden_size:
            _factorize_embeddings(s_enc, te)
            copied.append("embeddings + project <- factorised teacher embeddings (SVD)")
        else:
            log.warning("student init: the teacher's embedding width differs from the student's hidden size; "
                        "embeddings left randomly initialised")
    elif se.word.embedding_dim == te.word.embedding_dim:
        V = min(se.word.num_embeddings, te.word.num_embeddings)
        _copy_(se.word.weight[:V], te.word.weight[:V])
        npos = min(se.position.num_embeddings, te.position.num_embeddings)
        if se.position.weight.requires_grad:
            _copy_(se.position.weight[:npos], te.position.weight[:npos])
            if se.token_type is None and te.token_type is not None:
                se.position.weight[:npos] += te.token_type.weight[0].to(se.position.weight.dtype)
                copied.append("embeddings.position <- teacher position + token_type[0] (token types dropped)")
            else:
                copied.append("embeddings.position <- teacher embeddings.position")
        else:
            log.warning("student init: sinusoidal student positions are fixed; teacher positions not copied")
        if se.token_type is not None and te.token_type is not None:
            nt = min(se.token_type.num_embeddings, te.token_type.num_embeddings)
            _copy_(se.token_type.weight[:nt], te.token_type.weight[:nt])
            copied.append("embeddings.token_type <- teacher embeddings.token_type")
        se.norm.load_state_dict(te.norm.state_dict())
        copied.append("embeddings.word, embeddings.norm <- teacher")
        if hasattr(s_enc, "project") and hasattr(t_enc, "project") and _same_shapes(s_enc.project, t_enc.project):
            s_enc.project.load_state_dict(t_enc.project.state_dict())
            copied.append("project <- teacher project")
    else:
        log.warning("student init: embedding widths differ (%d vs %d); embeddings left randomly initialised",
                    se.word.embedding_dim, te.word.embedding_dim)

    # transformer layers
    s_attn, s_ffn = _blocks_by_module(s_enc)
    skipped = 0
    for kind, modules in (("attn", s_attn), ("ffn", s_ffn)):
        for k, (module, passes) in enumerate(modules):
            source_layer = layer_map[passes[len(passes) // 2]]
            t_attn, t_ffn = _teacher_block(t_enc, source_layer)
            source = t_attn if kind == "attn" else t_ffn
            if not _same_shapes(module, source):
                skipped += 1
                continue
            module.load_state_dict(source.state_dict())
            where = f"layers.{k}.{kind}" if hasattr(s_enc, "layers") else f"{kind}.{k}"
            copied.append(f"{where} <- teacher layer {source_layer}")
    if skipped:
        log.warning("student init: %d transformer sub-layers differ in shape from the teacher's (another width); "
                    "they stay randomly initialised", skipped)

    # heads
    t_sent = getattr(t_enc, "pooler", None) or getattr(teacher, "pre_classifier", None)
    t_sent = t_sent.dense if hasattr(t_sent, "dense") else t_sent
    s_pool = getattr(s_enc, "pooler", None)
    s_sent = s_pool.dense if s_pool is not None else getattr(student, "pre_classifier", None)
    if t_sent is not None and s_sent is not None and _same_shapes(s_sent, t_sent):
        s_sent.load_state_dict(t_sent.state_dict())
        copied.append("sentence vector (pooler / pre_classifier) <- teacher's")
    s_cls, t_cls = getattr(student, "classifier", None), getattr(teacher, "classifier", None)
    if (s_cls is not None and t_cls is not None and _same_shapes(s_cls, t_cls)
            and student.config.id2label == teacher.config.id2label):
        s_cls.load_state_dict(t_cls.state_dict())
        copied.append("classifier <- teacher classifier")
    s_mlm, t_mlm = getattr(student, "mlm_head", None), getattr(teacher, "mlm_head", None)
    if s_mlm is not None and t_mlm is not None and _same_shapes(s_mlm.transform, t_mlm.transform):
        s_mlm.transform.load_state_dict(t_mlm.transform.state_dict())
        s_mlm.norm.load_state_dict(t_mlm.norm.state_dict())
        V = min(s_mlm.bias.numel(), t_mlm.bias.numel())
        _copy_(s_mlm.bias[:V], t_mlm.bias[:V])
        copied.append("mlm_head <- teacher mlm_head")
    return copied


def build_student(teacher: nn.Module, section: dict[str, Any], head: type[nn.Module],
                  vocab_size: int | None = None) -> tuple[nn.Module, list[int]]:
    """The student model (``head`` class) and its layer map, initialised from the teacher when asked."""
    t_cfg = teacher.config
    config = student_config(t_cfg, section)
    if vocab_size is not None and section.get("vocab_size") is None and not section.get("config"):
        config = config.replace(vocab_size=vocab_size)
    if head is EncoderForPreTraining and isinstance(config, DistilBertConfig):
        head = EncoderForMaskedLM
    t_layers = t_cfg.num_hidden_layers
    if section.get("layer_map") is not None:
        layer_map = check_layer_map(section["layer_map"], t_layers, config.num_hidden_layers)
    else:
        layer_map = default_layer_map(t_layers, config.num_hidden_layers)
    student = head(config)
    if section.get("init_from_teacher", True):
        for line in init_student_from_teacher(student, teacher, layer_map):
            log.info("student init: %s", line)
    return student, layer_map


# -- vocabularies -----------------------------------------------------------------------------------------------
def _vocab(tokenizer: Any) -> dict[str, int] | None:
    backend = getattr(tokenizer, "backend", None)
    return backend.get_vocab(with_added_tokens=True) if backend is not None else None


def check_vocabularies(teacher_config: EncoderConfig, student_config_: EncoderConfig, tokenizer: Any = None,
                       shared: bool = False, student_tokenizer: Any = None,
                       teacher_tokenizer: Any = None) -> int | None:
    """Refuse teacher/student pairs whose outputs cannot be compared token by token.

    Without a shared tokenizer the two vocabularies must be the same (size, and token -> id when both ship a
    tokenizer). With one (``shared=True``), each model must cover its ids and the logits are compared over its
    ``vocab_size`` first ids; returns that number (None: compare everything).
    """
    vt, vs = teacher_config.vocab_size, student_config_.vocab_size
    hint = ("Distillation compares the two models' outputs token by token, so they must use one vocabulary: "
            "leave student.vocab_size to be inherited from the teacher, or give a tokenizer both models cover with "
            "--tokenizer.path (the logits are then compared over its ids).")
    if not shared:
        if vt != vs:
            raise ConfigError(f"vocabularies differ: the teacher has {vt} tokens, the student {vs}. {hint}")
        if student_tokenizer is not None and teacher_tokenizer is not None:
            a, b = _vocab(teacher_tokenizer), _vocab(student_tokenizer)
            if a is not None and b is not None and a != b:
                by_id_a, by_id_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
                first = next(i for i in sorted(set(by_id_a) | set(by_id_b)) if by_id_a.get(i) != by_id_b.get(i))
                raise ConfigError(f"vocabularies differ: token id {first} is {by_id_a.get(first)!r} for the teacher "
                                  f"but {by_id_b.get(first)!r} for the student. {hint}")
        return None
    V = tokenizer.vocab_size
    for who, size in (("teacher", vt), ("student", vs)):
        if size < V:
            raise ConfigError(f"the shared tokenizer has {V} tokens but the {who}'s vocabulary only {size}: "
                              f"the {who} cannot embed all of its ids")
    if teacher_tokenizer is not None:
        a, b = _vocab(teacher_tokenizer), _vocab(tokenizer)
        if a is not None and b is not None:
            bad = [t for t, i in b.items() if a.get(t, i) != i]
            if bad:
                raise ConfigError(f"the shared tokenizer gives {bad[0]!r} id {b[bad[0]]} but the teacher's own "
                                  f"tokenizer gives it id {a[bad[0]]}: the teacher was not trained on these ids")
    return V


# -- loss terms -------------------------------------------------------------------------------------------------
def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                   mask: Tensor | None = None) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, summed over classes, averaged over positions.

    Logits are (N, C) or (B, T, C) with ``mask`` (B, T) selecting the non-padding positions. Computed in fp32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    s, t = student_logits.float(), teacher_logits.float()
    if mask is not None:
        s, t = s[mask.bool()], t[mask.bool()]  # (N, C)
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (N,)
    return kl.mean() * temperature**2


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean ``1 - cos`` between (B, T, H) hidden states over the non-padding positions of ``mask`` (B, T)."""
    s, t = student_hidden.float(), teacher_hidden.float()
    if mask is not None:
        s, t = s[mask.bool()], t[mask.bool()]  # (N, H)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def hidden_mse_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
                    mask: Tensor | None = None) -> Tensor:
    """MSE between paired (B, T, H) hidden states over non-padding positions, averaged over the pairs."""
    terms = []
    for s, t in zip(student_states, teacher_states):
        s, t = s.float(), t.float()
        if mask is not None:
            s, t = s[mask.bool()], t[mask.bool()]
        terms.append(F.mse_loss(s, t))
    return torch.stack(terms).mean()


def attention_mse_loss(student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor],
                       mask: Tensor | None = None) -> Tensor:
    """MSE between paired (B, nh, T, T) attention probabilities over valid (query, key) pairs, averaged over the
    pairs of layers. Head counts that differ are compared head-averaged."""
    terms = []
    for s, t in zip(student_attn, teacher_attn):
        s, t = s.float(), t.float()
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)  # (B, 1, T, T)
        if mask is None:
            terms.append(F.mse_loss(s, t))
            continue
        m = mask.bool()
        pair = (m[:, :, None] & m[:, None, :])[:, None].expand_as(s)  # (B, nh, T, T)
        terms.append(((s - t) ** 2)[pair].mean())
    return torch.stack(terms).mean()


# -- the trained module and the objective -----------------------------------------------------------------------
def forward_parts(model: nn.Module, batch: dict[str, Tensor], positions: Tensor | None = None,
                  output_hidden_states: bool = False, output_attentions: bool = False) -> dict[str, Any]:
    """Logits and internal states of any family / head, uniformly.

    Masked-LM models project only the ``positions`` (B, T) bool -> logits (N, V); sequence classifiers give
    (B, C); a bare encoder gives no logits. Also ``last_hidden_state`` (B, T, H), ``hidden_states`` and
    ``attentions`` (when asked)."""
    args = (batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    kwargs = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
    logits = None
    if hasattr(model, "mlm_head"):
        out = model.encoder(*args, **kwargs)
        hidden = out.last_hidden_state if positions is None else out.last_hidden_state[positions]
        logits = model.mlm_head(hidden, model.encoder.word_embeddings.weight)  # (N, V)
    elif isinstance(model, EncoderForSequenceClassification):
        out = model(*args, **kwargs)
        logits = out.logits  # (B, C)
    else:
        out = model(*args, **kwargs)
    return {"logits": logits, "last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states,
            "attentions": out.attentions}


class DistillationStudent(nn.Module):
    """What the loop trains: the student, plus a learned ``Linear(H_s, H_t)`` for its hidden states when a
    hidden-state loss compares different widths (TinyBERT's W_h). Only ``student`` is saved as the final model.

    The student's own children are registered here (not the student under a prefix), so without a projection this
    module's state dict *is* the student's: the loop's best-model reload (``load_weights_into``) works on it.
    """

    def __init__(self, student: nn.Module, teacher_hidden_size: int | None = None):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a child: its children are registered below instead
        for name, child in student.named_children():
            self.add_module(name, child)
        self.config = student.config
        hs = student.config.hidden_size
        self.hidden_proj = (nn.Linear(hs, teacher_hidden_size, bias=False)
                            if teacher_hidden_size and teacher_hidden_size != hs else None)
        if self.hidden_proj is not None:
            nn.init.normal_(self.hidden_proj.weight, std=student.config.initializer_range)

    def train(self, mode: bool = True) -> DistillationStudent:
        super().train(mode)
        self.student.training = mode
        return self

    def forward(self, batch: dict[str, Tensor], positions: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> dict[str, Any]:
        parts = forward_parts(self.student, batch, positions, output_hidden_states, output_attentions)
        if self.hidden_proj is not None:
            parts["last_hidden_state"] = self.hidden_proj(parts["last_hidden_state"])
            if parts["hidden_states"] is not None:
                parts["hidden_states"] = tuple(self.hidden_proj(h) for h in parts["hidden_states"])
        return parts


class DistillationObjective(nn.Module):
    """``(model, batch) -> {"loss", "kl", "hard", ...}`` for :func:`~litebert.training.loop.train`.

    Holds the frozen teacher (never a child of the trained module, so the optimizer never sees it): it runs in
    eval mode under ``torch.no_grad``. Batches may carry precomputed ``teacher_logits``; then the teacher only
    runs when a hidden-state term needs it. ``vocab_limit`` compares MLM logits over the first ids only (a shared
    tokenizer smaller than the models' vocabularies).
    """

    def __init__(self, teacher: nn.Module | None, loss: LossConfig, layer_map: Sequence[int], mode: str,
                 vocab_limit: int | None = None):
        super().__init__()
        if mode not in ("general", "task"):
            raise ValueError(f"mode must be 'general' or 'task', got {mode!r}")
        self.loss = loss
        self.mode = mode
        self.layer_map = list(layer_map)
        self.vocab_limit = vocab_limit
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def _teacher_outputs(self, batch: dict[str, Tensor], positions: Tensor | None) -> dict[str, Any]:
        if self.teacher is None:
            raise ConfigError("this loss needs the teacher, but none was given")
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.eval()  # whatever the caller did with .train()
        with torch.no_grad():
            return forward_parts(self.teacher, batch, positions, output_hidden_states=self.loss.hidden_mse > 0,
                                 output_attentions=self.loss.attn_mse > 0)

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w = self.loss
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
        positions = None
        if self.mode == "general":
            positions = mask if w.kl_positions == "all" else batch["labels"] != -100  # (B, T)
            positions = positions & mask
        s = model(batch, positions, output_hidden_states=w.hidden_mse > 0, output_attentions=w.attn_mse > 0)
        cached = batch.get("teacher_logits")
        t = None
        if (w.kl and cached is None) or w.needs_teacher_states:
            t = self._teacher_outputs(batch, positions)
        terms: dict[str, Tensor] = {}
        if w.kl:
            t_logits = cached if cached is not None else t["logits"]
            if t_logits is None:
                raise ConfigError("loss.kl > 0 needs teacher logits, but the teacher has no head for this task")
            s_logits = s["logits"]
            if self.vocab_limit is not None:
                s_logits, t_logits = s_logits[..., : self.vocab_limit], t_logits[..., : self.vocab_limit]
            terms["kl"] = soft_target_kl(s_logits, t_logits, w.temperature)
        if w.hard:
            labels = batch["labels"]
            if self.mode == "general":
                labels = labels[positions]  # (N,), -100 where not masked
                if bool((labels != -100).any()):
                    terms["hard"] = F.cross_entropy(s["logits"].float(), labels, ignore_index=-100)
                else:
                    terms["hard"] = s["logits"].sum() * 0.0
            elif bool((labels != -100).any()):  # transfer-set rows carry no label (-100)
                terms["hard"] = F.cross_entropy(s["logits"].float(), labels, ignore_index=-100)
            else:
                terms["hard"] = s["logits"].sum() * 0.0
        if w.cos:
            terms["cos"] = hidden_cosine_loss(s["last_hidden_state"], t["last_hidden_state"], mask)
        if w.hidden_mse:
            t_states = [t["hidden_states"][0]] + [t["hidden_states"][i + 1] for i in self.layer_map]
            terms["hidden_mse"] = hidden_mse_loss(s["hidden_states"], t_states, mask)
        if w.attn_mse:
            t_attn = [t["attentions"][i] for i in self.layer_map]
            terms["attn_mse"] = attention_mse_loss(s["attentions"], t_attn, mask)
        loss = sum(getattr(w, name) * value for name, value in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


# -- teacher logits cache ---------------------------------------------------------------------------------------
def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for name, tensor in sorted(part.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _length_order(features: Sequence[dict[str, Any]]) -> list[int]:
    return sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))


@torch.no_grad()
def predict_logits(model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int = 64,
                   precision: str = "fp32", pad_token_id: int = 0) -> np.ndarray:
    """(N, C) float32 logits of a classifier over task features, in their order. Batches by length (little
    padding); the model runs in eval mode."""
    from ..data.tasks import collate_features

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = _length_order(features)
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_features([features[i] for i in idx], pad_token_id=pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with autocast_for(precision, device):
            logits = forward_parts(model, batch)["logits"].float().cpu().numpy()
        if out is None:
            out = np.zeros((len(features), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def cached_teacher_logits(teacher: nn.Module, features: Sequence[dict[str, Any]], cache_dir: str | Path,
                          batch_size: int = 64, precision: str = "fp32", pad_token_id: int = 0) -> np.ndarray:
    """The teacher's (N, C) logits on ``features``, computed once and kept in ``cache_dir`` as
    ``teacher-logits-{fingerprint}.npy`` keyed by the teacher's weights and the input ids (written atomically)."""
    key = _fingerprint(teacher, [f["input_ids"] for f in features], [f.get("token_type_ids") for f in features],
                       {"precision": precision})
    path = Path(cache_dir) / f"teacher-logits-{key}.npy"
    if path.exists():
        logits = np.load(path)
        if logits.shape[0] == len(features):
            log.info("teacher logits: read %s", path)
            return logits
    started = time.perf_counter()
    logits = predict_logits(teacher, features, batch_size, precision, pad_token_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, logits)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("teacher logits: %d examples in %.1fs, cached at %s", len(features), time.perf_counter() - started, path)
    return logits


# -- task data --------------------------------------------------------------------------------------------------
def _files(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def load_task_splits(data: dict[str, Any], task: dict[str, Any]) -> tuple[list, list, list]:
    """(train, validation, test) examples: the given files, or splits of the training file(s) with
    ``split_train_test`` (the test split depends only on its seed and fraction; it is never trained or tuned on)."""
    from ..data.tasks import read_text_classification, split_train_test

    def read(files: list[str]) -> list:
        examples = []
        for path in files:
            examples += read_text_classification(path, task["text_column"], task["text_pair_column"],
                                                 task["label_column"], filter=task["filter"])
        return examples

    train_files = _files(data["train"])
    if not train_files:
        raise ConfigError("data.train: no training file given (a CSV / TSV / JSONL with text and label columns)")
    train_ex, val_ex, test_ex = read(train_files), read(_files(data["validation"])), read(_files(data["test"]))
    if not test_ex or not val_ex:
        splits = split_train_test(train_ex, task["test_fraction"] if not test_ex else 0.0, seed=task["split_seed"],
                                  validation_fraction=task["validation_fraction"] if not val_ex else 0.0)
        train_ex = splits.train
        val_ex = val_ex or splits.validation
        test_ex = test_ex or splits.test
    return train_ex, val_ex, test_ex


def load_transfer_set(task: dict[str, Any]) -> list:
    """Unlabelled examples for the teacher to label: the ``task.transfer`` files (read like the task's, without a
    label column, rows kept by ``task.transfer_filter``), split into sentences when ``task.transfer_sentences``
    (HTML line breaks removed, sentences of fewer than 4 words dropped), then at most ``task.transfer_max`` of them
    in a seeded random order."""
    import random
    import re

    from ..data.corpus import split_sentences
    from ..data.tasks import TextExample, read_text_classification

    examples = []
    for path in _files(task["transfer"]):
        rows = read_text_classification(path, task["text_column"], None, label_column=None,
                                        filter=task["transfer_filter"])
        for ex in rows:
            if not task["transfer_sentences"]:
                examples.append(ex)
                continue
            text = re.sub(r"<br\s*/?>", " ", ex.text)
            examples += [TextExample(sent, None, None, ex.source, ex.line) for sent in split_sentences(text)
                         if len(sent.split()) >= 4]
    random.Random(f"transfer:{task['split_seed']}").shuffle(examples)
    return examples[: task["transfer_max"]]


def _task_loader(features: list[dict[str, Any]], batch_size: int, pad_token_id: int, seed: int,
                 teacher_logits: np.ndarray | None, rank: int = 0, world: int = 1):
    """Fine-tuning's resumable, length-grouped loader, with the cached teacher logits added to each batch as
    ``teacher_logits`` (B, C) and, under torchrun, every ``world``-th batch for this rank."""
    from ..data.tasks import collate_features
    from .finetune import FeatureLoader

    logits = None if teacher_logits is None else torch.from_numpy(teacher_logits)

    class DistillFeatureLoader(FeatureLoader):
        def __iter__(self):
            done = 0
            for i, batch in enumerate(self._batches()):
                done += len(batch)
                if done <= self.examples_yielded or i % world != rank:
                    continue  # handed out before the checkpoint we resumed from, or another rank's
                self.examples_yielded = done
                out = collate_features([self.features[j] for j in batch], self.pad_token_id, pad_to_multiple_of=8)
                if logits is not None:
                    out["teacher_logits"] = logits[batch]
                yield out

    return DistillFeatureLoader(features, batch_size, pad_token_id, seed)


def classification_evaluator(features: Sequence[dict[str, Any]], batch_size: int, pad_token_id: int):
    labels = np.array([f["labels"] for f in features])

    def evaluate(model: nn.Module) -> dict[str, float]:
        student = getattr(model, "student", model)
        logits = predict_logits(student, features, batch_size, pad_token_id=pad_token_id)
        nll = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        return {"accuracy": float((logits.argmax(-1) == labels).mean()), "loss": nll}

    return evaluate


# -- the command ------------------------------------------------------------------------------------------------
def _load_teacher(path: str) -> nn.Module:
    if not path:
        raise ConfigError("teacher.path: no teacher given (--teacher DIR, a litebert or transformers model dir)")
    teacher = from_pretrained(path)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _resolve_mode(mode: str, teacher: nn.Module) -> str:
    if mode not in MODES:
        raise ConfigError(f"distill.mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "task" if isinstance(teacher, EncoderForSequenceClassification) else "general"


def _teacher_for_mode(teacher: nn.Module, mode: str, loss: LossConfig, path: str) -> nn.Module:
    """Reload the teacher with the head the mode needs; refuse soft targets from a teacher without that head."""
    if mode == "task":
        if isinstance(teacher, EncoderForSequenceClassification):
            return teacher
        if loss.kl:
            raise ConfigError(f"teacher {path} is a {type(teacher).__name__}, not a fine-tuned sequence classifier: "
                              "task distillation's soft targets need one (fine-tune it first), or set --loss.kl 0 "
                              "to train on hard labels only")
        return teacher
    if hasattr(teacher, "mlm_head"):
        return teacher
    with_head = from_pretrained(path, task="masked-lm")
    lacks_head = any("predictions" in k or "vocab_" in k for k in with_head.load_report.missing)
    if lacks_head:
        if loss.kl:
            raise ConfigError(f"teacher {path} has no masked-LM head (all-MiniLM-L6-v2, for one, ships none): general "
                              "distillation's soft targets need one. Set --loss.kl 0 to distil hidden states only "
                              "(--loss.cos / --loss.hidden_mse), or use task distillation with a fine-tuned teacher")
        return teacher
    with_head.requires_grad_(False)
    return with_head


def _resolve_paths(recipe: dict[str, Any]) -> dict[str, Any]:
    """``pkg:PACKAGE/path`` (a path inside an installed package, as in fine-tuning recipes) -> a real path."""
    from .finetune import resolve_path

    r = copy.deepcopy(recipe)
    r["teacher"]["path"] = resolve_path(r["teacher"]["path"])
    r["tokenizer"]["path"] = resolve_path(r["tokenizer"]["path"])
    r["student"]["config"] = resolve_path(r["student"]["config"])
    for section, key in (("data", "train"), ("data", "validation"), ("data", "test"), ("task", "transfer")):
        value = r[section][key]
        r[section][key] = [resolve_path(v) for v in value] if isinstance(value, list) else resolve_path(value)
    return r


def run_distillation(recipe: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Distil as the recipe says; returns the final metrics (and ``report`` when one was made)."""
    from ..tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    rank, world = init_distributed()
    recipe = _resolve_paths(recipe)
    loss_cfg = build(LossConfig, recipe["loss"], "loss")
    train_cfg = build(TrainConfig, recipe["train"], "train")
    teacher_path = recipe["teacher"]["path"]
    teacher = _load_teacher(teacher_path)
    mode = _resolve_mode(recipe["distill"]["mode"], teacher)
    teacher = _teacher_for_mode(teacher, mode, loss_cfg, teacher_path)
    recipe = copy.deepcopy(recipe)
    recipe["distill"]["mode"] = mode

    shared = bool(recipe["tokenizer"]["path"])
    teacher_tok = None
    if (Path(teacher_path) / "tokenizer.json").exists() or (Path(teacher_path) / "vocab.txt").exists():
        teacher_tok = load_tokenizer(teacher_path)
    tokenizer = load_tokenizer(recipe["tokenizer"]["path"]) if shared else teacher_tok
    if tokenizer is None:
        raise ConfigError(f"teacher {teacher_path} has no tokenizer (tokenizer.json / vocab.txt): give the one it was "
                          "trained with as --tokenizer.path")
    student_section = recipe["student"]
    student_tok = None
    if student_section.get("config") and Path(student_section["config"]).is_dir():
        d = Path(student_section["config"])
        if (d / "tokenizer.json").exists() or (d / "vocab.txt").exists():
            student_tok = load_tokenizer(d)

    head = EncoderForSequenceClassification if mode == "task" else EncoderForMaskedLM
    train_ex = val_ex = test_ex = None
    if mode == "task":
        from ..data.tasks import build_label_map, check_labels

        train_ex, val_ex, test_ex = load_task_splits(recipe["data"], recipe["task"])
        if isinstance(teacher, EncoderForSequenceClassification) and teacher.config.id2label:
            label2id = teacher.config.label2id
        else:
            label2id = build_label_map(train_ex)
        for split in (train_ex, val_ex, test_ex):
            check_labels(split, label2id)
        id2label = {i: lab for lab, i in label2id.items()}
        if teacher.config.id2label != id2label:
            teacher.config = teacher.config.replace(id2label=id2label)
    # A shared tokenizer smaller than the teacher's vocabulary: the student gets the tokenizer's size.
    s_config = student_config(teacher.config, student_section)
    vocab_for_student = tokenizer.vocab_size if shared and student_section.get("vocab_size") is None \
        and not student_section.get("config") else None
    if vocab_for_student is not None:
        s_config = s_config.replace(vocab_size=vocab_for_student)
    vocab_limit = check_vocabularies(teacher.config, s_config, tokenizer, shared, student_tok, teacher_tok)

    torch.manual_seed(train_cfg.seed)
    student, layer_map = build_student(teacher, student_section, head, vocab_size=vocab_for_student)
    recipe["student"]["layer_map"] = layer_map
    if rank == 0:
        claim_run(out_dir, recipe, train_cfg.resume)
        log.info("teacher %s (%.2fM parameters) -> student %s, %d layers, layer map %s (%.2fM parameters)",
                 type(teacher).__name__, sum(p.numel() for p in teacher.parameters()) / 1e6,
                 student.config.model_type, student.config.num_hidden_layers, layer_map,
                 sum(p.numel() for p in student.parameters()) / 1e6)
    needs_proj = loss_cfg.cos or loss_cfg.hidden_mse
    model = DistillationStudent(student, teacher.config.hidden_size if needs_proj else None)
    if model.hidden_proj is not None and train_cfg.metric_for_best:
        raise ConfigError("train.metric_for_best cannot yet be combined with a learned hidden-state projection (the "
                          f"student's width {student.config.hidden_size} differs from the teacher's "
                          f"{teacher.config.hidden_size} and loss.cos / loss.hidden_mse are on): the loop reloads the "
                          "best weights without it. Leave train.metric_for_best unset for this run.")

    data = recipe["data"]
    cache = Path(data["cache_dir"]) if data["cache_dir"] else out_dir / "cache"
    if mode == "task":
        from ..data.tasks import prepare_classification_features

        max_len = data["max_seq_length"]
        train_f = prepare_classification_features(train_ex, tokenizer, label2id, max_len)
        val_f = prepare_classification_features(val_ex, tokenizer, label2id, max_len)
        transfer_ex = load_transfer_set(recipe["task"]) if recipe["task"]["transfer"] else []
        if transfer_ex:
            if not loss_cfg.kl and not loss_cfg.needs_teacher_states:
                raise ConfigError("task.transfer: a transfer set has no labels, so it needs the teacher (loss.kl > 0)")
            transfer_f = prepare_classification_features(transfer_ex, tokenizer, None, max_len)
            for f in transfer_f:
                f["labels"] = -100  # soft targets only
            train_f = train_f + transfer_f
        teacher_logits = None
        use_cache = recipe["distill"]["cache_teacher_logits"] and loss_cfg.kl and not loss_cfg.needs_teacher_states
        if use_cache:
            teacher_logits = cached_teacher_logits(teacher, train_f, cache, recipe["task"]["eval_batch_size"],
                                                   training_precision(train_cfg.precision, next(teacher.parameters()).device),
                                                   pad_token_id=tokenizer.pad_token_id)
        teacher_online = (loss_cfg.kl and not use_cache) or loss_cfg.needs_teacher_states
        loader = _task_loader(train_f, train_cfg.batch_size, tokenizer.pad_token_id, train_cfg.seed, teacher_logits,
                              rank, world)
        evaluate = classification_evaluator(val_f, recipe["task"]["eval_batch_size"], tokenizer.pad_token_id)
        if rank == 0:
            log.info("task data: %d train (+ %d unlabelled transfer) / %d validation / %d test examples",
                     len(train_ex), len(transfer_ex), len(val_ex), len(test_ex))
    else:
        from ..data.pretraining import PretrainingConfig, build_pretraining_loader
        from .pretrain import make_evaluator

        train_files, val_files = _files(data["train"]), _files(data["validation"])
        if not train_files:
            raise ConfigError("data.train: no text files given (e.g. --data.train 'corpus/*.txt')")
        ex_cfg = build(PretrainingConfig, {**recipe["mlm"], "max_seq_length": data["max_seq_length"]}, "mlm")
        if ex_cfg.sop:
            raise ConfigError("mlm.sop: distillation trains a masked-LM student; set mlm.sop false")
        loader = build_pretraining_loader(train_files, tokenizer, ex_cfg, batch_size=train_cfg.batch_size, rank=rank,
                                          world_size=world, num_workers=data["num_workers"], cache_dir=cache,
                                          drop_last=True)
        eval_cfg = dataclasses.replace(ex_cfg, dynamic_masking=False, shuffle_buffer=0, seed=ex_cfg.seed + 1)
        held_out = []
        for batch in build_pretraining_loader(val_files or train_files, tokenizer, eval_cfg,
                                              batch_size=train_cfg.batch_size, rank=rank, world_size=world,
                                              cache_dir=cache):
            held_out.append(batch)
            if len(held_out) >= data["eval_batches"]:
                break
        mlm_eval = make_evaluator(held_out)
        evaluate = lambda m: mlm_eval(getattr(m, "student", m))
        teacher_online = bool(loss_cfg.kl) or loss_cfg.needs_teacher_states

    objective = DistillationObjective(teacher if teacher_online else None, loss_cfg, layer_map, mode, vocab_limit)

    def save_final(m: nn.Module, d: Path) -> None:
        getattr(m, "student", m).save_pretrained(d, tokenizer=tokenizer)

    summary = train(model, objective, loader, train_cfg, out_dir, evaluate=evaluate, save_final=save_final)
    summary["layer_map"] = layer_map
    if rank == 0 and recipe["report"]["enabled"]:
        summary["report"] = _make_report(recipe, out_dir, teacher, teacher_path, student, mode, test_ex, tokenizer,
                                         label2id if mode == "task" else None, evaluate)
        (out_dir / "metrics.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "report"},
                                                         indent=2) + "\n")
    if rank == 0:
        release_lock(out_dir)
    return summary


def _ablation_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The same student, init, labelled data and steps, trained on hard labels only (the no-distillation
    baseline; a transfer set is dropped, having no labels)."""
    r = copy.deepcopy(recipe)
    r["loss"].update(kl=0.0, cos=0.0, hidden_mse=0.0, attn_mse=0.0, hard=1.0)
    r["task"]["transfer"] = []  # nothing to learn from without the teacher's labels
    r["report"].update(enabled=False, ablation=False)
    return r


def report_seq_len(wanted: int, *models: nn.Module) -> int:
    """The report's timing length, clamped to the shortest position table: a student with fewer positions than
    ``report.seq_len`` cannot run that input at all, and the run it reports on has already finished."""
    limit = min(m.config.max_position_embeddings for m in models)
    if wanted > limit:
        log.warning("report.seq_len %d exceeds a model's max_position_embeddings (%d); timing at %d", wanted, limit,
                    limit)
    return min(wanted, limit)


def _make_report(recipe: dict[str, Any], out_dir: Path, teacher: nn.Module, teacher_path: str, student: nn.Module,
                 mode: str, test_ex: list | None, tokenizer: Any, label2id: dict[str, int] | None,
                 evaluate: Any) -> dict[str, Any]:
    from .. import report as report_mod

    section = recipe["report"]
    scores: dict[str, float] = {}
    metric = None
    ablation_score = paired = None
    if mode == "task":
        from ..data.tasks import prepare_classification_features

        test_f = prepare_classification_features(test_ex, tokenizer, label2id, recipe["data"]["max_seq_length"])
        bs = recipe["task"]["eval_batch_size"]
        metric = "accuracy (held-out test split)"
        teacher_eval = classification_evaluator(test_f, bs, tokenizer.pad_token_id)
        if isinstance(teacher, EncoderForSequenceClassification):
            scores["teacher"] = teacher_eval(teacher)["accuracy"]
        scores["student"] = teacher_eval(student)["accuracy"]
        if section["ablation"]:
            abl_dir = out_dir / "ablation-hard-labels"
            run_distillation(_ablation_recipe(recipe), abl_dir)
            ablation = from_pretrained(str(abl_dir / "final"))
            ablation_score = teacher_eval(ablation)["accuracy"]
            labels = np.array([f["labels"] for f in test_f])
            right = [predict_logits(m, test_f, bs, pad_token_id=tokenizer.pad_token_id).argmax(-1) == labels
                     for m in (student, ablation)]
            paired = report_mod.mcnemar(right[0], right[1])
    else:
        if hasattr(teacher, "mlm_head"):
            metric = "masked-LM accuracy (held-out batches)"
            scores["teacher"] = evaluate(teacher)["mlm_acc"]
            scores["student"] = evaluate(student)["mlm_acc"]
    models = {"teacher": teacher, "student": student}
    if mode == "general":  # what gets deployed downstream is the encoder; the vocabulary projection is not
        models = {k: _encoder(m) for k, m in models.items()}
    teacher_dir = Path(teacher_path)
    seq_len = report_seq_len(section["seq_len"], teacher, student)
    report = report_mod.compression_report(
        models, model_dirs={"teacher": teacher_dir, "student": out_dir / "final"}, scores=scores, metric=metric,
        ablation={"hard labels only (no distillation)": ablation_score} if ablation_score is not None else None,
        batch_sizes=section["batch_sizes"], seq_len=seq_len, repeats=section["repeats"],
        precisions=section["precision"], vocab_size=tokenizer.vocab_size,
        details={"mode": mode, "teacher": str(teacher_path), "student": f"{student.config.model_type}, "
                 f"{student.config.num_hidden_layers} layers", "layer_map": recipe["student"]["layer_map"],
                 "loss": recipe["loss"], "steps": recipe["train"]["max_steps"]})
    if paired is not None:
        report["ablation_paired"] = paired
    report_mod.write_report(report, out_dir)
    print(report_mod.render_markdown(report))
    return report


def distill_main(argv: list[str]) -> int:
    """litebert distill --teacher DIR --student PRESET|CONFIG --out DIR [--config FILE.yaml] [--section.key value]"""
    parser = argparse.ArgumentParser(
        prog="litebert distill", allow_abbrev=False,
        description="Distil a teacher into a smaller, faster student (DistilBERT / TinyBERT losses), then write a "
                    "compression report (parameters, size, CPU latency, task score and retention).",
        epilog="Any recipe key can be set as --section.key value, e.g. --student.num_hidden_layers 3 "
               "--loss.temperature 4 --train.max_steps 500 --data.train data.csv --task.filter "
               "'{source: rotten_tomatoes}' --report.ablation true. See configs/distill-*.yaml.",
    )
    parser.add_argument("--config", help="YAML recipe (sections teacher, tokenizer, student, distill, loss, data, task, "
                        "mlm, train, report)")
    parser.add_argument("--teacher", help="teacher model directory (sets teacher.path)")
    parser.add_argument("--student", help="a preset (distilbert-base, bert-base, albert-base, or a family name) or a "
                        "config.json / model dir (sets student.preset or student.config)")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds checkpoints)")
    args, rest = parser.parse_known_args(argv)
    recipe = resolve(default_recipe(), args.config, rest)
    if args.teacher:
        recipe["teacher"]["path"] = args.teacher
    if args.student:
        is_file = Path(args.student).exists() or args.student.endswith(".json")
        if is_file:
            recipe["student"].update(config=args.student, preset=None)
        else:
            recipe["student"].update(preset=args.student, config=None)
    summary = run_distillation(recipe, args.out)
    if is_main_process():
        print(json.dumps({k: v for k, v in summary.items() if k != "report"}))
        out = Path(args.out)
        print(f"model: {out / 'final'}\nreport: {out / 'report.md'}\nmetrics: {out / 'metrics.jsonl'}")
    return 0
