"""Task heads that work for every family: ``EncoderFor{MaskedLM,PreTraining,SequenceClassification,
TokenClassification,QuestionAnswering,MultipleChoice}``. Each wraps an encoder under ``self.encoder``.

Head layouts follow the reference so checkpoints convert one to one: BERT and ALBERT classify from the tanh
pooler, DistilBERT from ``relu(pre_classifier(h_[CLS]))``; the masked-LM decoder is tied to the input embeddings
(ALBERT's transform projects back to E first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import PreTrainedMixin
from .config import AlbertConfig, DistilBertConfig, EncoderConfig
from .layers import EncoderOutput, activation, init_weights
from .models.albert import AlbertModel
from .models.bert import BertModel
from .models.distilbert import DistilBertModel

ENCODERS: dict[str, type[nn.Module]] = {"bert": BertModel, "albert": AlbertModel, "distilbert": DistilBertModel}


def build_encoder(config: EncoderConfig, add_pooler: bool = True) -> nn.Module:
    return ENCODERS[config.model_type](config, add_pooler=add_pooler)


@dataclass
class HeadOutput:
    """Outputs of a head. Shapes: logits (B, num_labels) | (B, T, num_labels) | (B, C) | (B, T, V), or (N, V) for
    masked LM with labels (only the N labelled positions are projected); start/end_logits (B, T)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    sentence_logits: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class EncoderHead(PreTrainedMixin, nn.Module):
    """Base of every task model: builds the family's encoder and initialises the head."""

    task: ClassVar[str] = ""
    uses_pooler: ClassVar[bool] = False  # BERT/ALBERT sentence-level heads read the tanh pooler

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config, add_pooler=self.uses_pooler and config.model_type != "distilbert")

    def _init_head(self) -> None:
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(lambda m: init_weights(m, self.config.initializer_range))

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None,
                output_hidden_states: bool, output_attentions: bool, first_token_only: bool = False) -> EncoderOutput:
        return self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, first_token_only=first_token_only)

    def _output(self, out: EncoderOutput, **fields) -> HeadOutput:
        return HeadOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                          attentions=out.attentions, **fields)


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the word embeddings (+ its own bias)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        dim = config.embedding_size if isinstance(config, AlbertConfig) else config.hidden_size
        self.transform = nn.Linear(config.hidden_size, dim)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, decoder_weight: Tensor) -> Tensor:
        return F.linear(self.norm(self.act(self.transform(hidden))), decoder_weight, self.bias)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits, computed in float32 a block of rows at a time.

    Same value and gradient as ``F.cross_entropy(logits.float(), target)``, but none of the (N, V) float32
    temporaries the stock op allocates (the up-cast copy, the log-probabilities, their gradient, the one-hot
    scatter) ever exists: only ~8 MB row blocks, which the allocator reuses, and the gradient in the logits' dtype.
    A fresh (N, V) float32 buffer is above glibc's mmap threshold, so it is page-faulted in again on every step;
    at N=608, V=30000 on the 2-core reference CPU this op takes ~40 ms where the stock one takes 120-220 ms.
    Backward recomputes the softmax of each block from the logits, which autograd keeps anyway.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        rows = max(1, (1 << 21) // logits.shape[1])
        nll = torch.cat([
            -F.log_softmax(block, dim=-1, dtype=torch.float32).gather(1, t[:, None]).squeeze(1)
            for block, t in zip(logits.split(rows), target.split(rows))
        ])  # (N,)
        ctx.save_for_backward(logits, target)
        ctx.rows = rows
        return nll.mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        logits, target = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss / logits.shape[0]
        for block, t, out in zip(logits.split(ctx.rows), target.split(ctx.rows), grad.split(ctx.rows)):
            p = F.softmax(block, dim=-1, dtype=torch.float32)  # (rows, V)
            p[torch.arange(len(t), device=p.device), t] -= 1.0
            out.copy_(p.mul_(scale))
        return grad, None


def masked_lm_loss(head: MaskedLMHead, decoder_weight: Tensor, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the labelled positions only. The positions are gathered *before* the vocabulary
    projection: with 15% masking that is ~7x less work and memory than projecting every position.
    Returns (loss, logits of the N labelled positions (N, V))."""
    selected = labels != -100  # (B, T)
    logits = head(hidden[selected], decoder_weight)  # (N, V)
    target = labels[selected]
    if target.numel() == 0:  # nothing masked in this batch: a zero loss that still has a graph
        return logits.sum() * 0.0, logits
    return _ChunkedCrossEntropy.apply(logits, target), logits


class EncoderForMaskedLM(EncoderHead):
    task = "fill-mask"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.mlm_head = MaskedLMHead(config)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> HeadOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        weight = self.encoder.word_embeddings.weight
        if labels is None:
            return self._output(out, logits=self.mlm_head(out.last_hidden_state, weight))
        loss, logits = masked_lm_loss(self.mlm_head, weight, out.last_hidden_state, labels)
        return self._output(out, loss=loss, logits=logits, losses={"mlm": loss})


class EncoderForPreTraining(EncoderHead):
    """Masked LM + a two-way sentence head on the pooler: sentence-order prediction for ALBERT (label 1 =
    swapped), next-sentence prediction for BERT (label 1 = random next). DistilBERT has no sentence task."""

    task = "pretraining"
    uses_pooler = True

    def __init__(self, config: EncoderConfig):
        if isinstance(config, DistilBertConfig):
            # a valid config this head cannot use: a ValueError, as every other config error here
            msg = "DistilBERT has no sentence-level pre-training head; use EncoderForMaskedLM"
            raise ValueError(msg)  # noqa: TRY004
        super().__init__(config)
        self.mlm_head = MaskedLMHead(config)
        self.sentence_dropout = nn.Dropout(config.head_dropout if isinstance(config, AlbertConfig) else 0.0)
        self.sentence_head = nn.Linear(config.hidden_size, 2)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, sentence_order_label: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> HeadOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        weight = self.encoder.word_embeddings.weight
        sentence_logits = self.sentence_head(self.sentence_dropout(out.pooler_output))  # (B, 2)
        if labels is None:
            return self._output(out, logits=self.mlm_head(out.last_hidden_state, weight),
                                sentence_logits=sentence_logits)
        mlm, logits = masked_lm_loss(self.mlm_head, weight, out.last_hidden_state, labels)
        losses = {"mlm": mlm}
        if sentence_order_label is not None:
            losses["sop"] = F.cross_entropy(sentence_logits.float(), sentence_order_label)
        return self._output(out, loss=sum(losses.values()), logits=logits, sentence_logits=sentence_logits,
                            losses=losses)


class _SentenceHead(EncoderHead):
    """Shared by sequence classification and multiple choice: the sentence vector and its dropout.

    Their ``forward`` takes ``first_token_only=True`` to have the encoder's last layer compute the [CLS] position
    alone, the only one the head reads (the logits are the same; ``last_hidden_state`` is then (B, 1, H)): 1/L of
    the encoder's work saved, 1/6 for DistilBERT. The text-classification pipeline, the server, ``litebert bench``
    and the ONNX export use it; it is off by default, and ignored when hidden states or attentions are requested."""

    uses_pooler = True

    def __init__(self, config: EncoderConfig, num_outputs: int):
        super().__init__(config)
        distil = isinstance(config, DistilBertConfig)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size) if distil else None
        self.dropout = nn.Dropout(config.seq_classif_dropout if distil else config.head_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_outputs)
        self._init_head()

    def _sentence_vector(self, out: EncoderOutput) -> Tensor:
        if self.pre_classifier is not None:
            return F.relu(self.pre_classifier(out.last_hidden_state[:, 0]))  # (B, H)
        return out.pooler_output  # (B, H)


class EncoderForSequenceClassification(_SentenceHead):
    """Classification over ``config.num_labels`` classes, or regression (MSE) when ``num_labels == 1``."""

    task = "text-classification"

    def __init__(self, config: EncoderConfig):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
                first_token_only: bool = False) -> HeadOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions,
                           first_token_only)
        logits = self.classifier(self.dropout(self._sentence_vector(out)))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return self._output(out, loss=loss, logits=logits)


class EncoderForMultipleChoice(_SentenceHead):
    """Scores each of C choices; inputs are (B, C, T), logits (B, C)."""

    task = "multiple-choice"

    def __init__(self, config: EncoderConfig):
        super().__init__(config, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
                first_token_only: bool = False) -> HeadOutput:
        B, C, T = input_ids.shape

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(B * C, T)

        out = self._encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), output_hidden_states,
                           output_attentions, first_token_only)
        logits = self.classifier(self.dropout(self._sentence_vector(out))).view(B, C)  # (B, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return self._output(out, loss=loss, logits=logits)


class EncoderForTokenClassification(EncoderHead):
    """Per-token labels (NER). Labels of -100 (special tokens, non-first word pieces) are ignored."""

    task = "token-classification"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        p = config.hidden_dropout_prob if isinstance(config, DistilBertConfig) else config.head_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> HeadOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return self._output(out, loss=loss, logits=logits)


class EncoderForQuestionAnswering(EncoderHead):
    """Extractive QA: start and end logits over tokens. Positions outside the sequence are ignored in the loss."""

    task = "question-answering"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.dropout = nn.Dropout(config.qa_dropout if isinstance(config, DistilBertConfig) else 0.0)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> HeadOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        start, end = self.qa_outputs(self.dropout(out.last_hidden_state)).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]
            s, e = start_positions.clamp(0, T), end_positions.clamp(0, T)  # T is "ignore"
            loss = (F.cross_entropy(start.float(), s, ignore_index=T) + F.cross_entropy(end.float(), e, ignore_index=T)) / 2
        return self._output(out, loss=loss, start_logits=start, end_logits=end)


HEADS: dict[str, type[EncoderHead]] = {
    "masked-lm": EncoderForMaskedLM,
    "pretraining": EncoderForPreTraining,
    "classification": EncoderForSequenceClassification,
    "regression": EncoderForSequenceClassification,
    "ner": EncoderForTokenClassification,
    "token-classification": EncoderForTokenClassification,
    "qa": EncoderForQuestionAnswering,
    "multiple-choice": EncoderForMultipleChoice,
}

_ARCH_SUFFIX = {cls.__name__.removeprefix("Encoder"): cls for cls in set(HEADS.values())}


def model_class_for(config_json: dict, task: str | None = None) -> type[nn.Module]:
    """The class to build for a checkpoint: ``task`` when given, else its ``architectures`` entry, else the
    family's bare encoder."""
    if task is not None:
        if task not in HEADS:
            from .config import unknown_key_error

            raise unknown_key_error(task, set(HEADS), "task")
        return HEADS[task]
    for arch in config_json.get("architectures") or []:
        for suffix, cls in _ARCH_SUFFIX.items():
            if arch.endswith(suffix):
                return cls
    from .config import LITEBERT_ONLY_TYPES, ConfigError

    model_type = config_json.get("model_type")
    model_type = LITEBERT_ONLY_TYPES.get(model_type, model_type)
    if model_type not in ENCODERS:
        raise ConfigError(f"config.json: model_type must be one of {sorted(ENCODERS)}, got {model_type!r}")
    return ENCODERS[model_type]


def from_pretrained(name_or_path: str, task: str | None = None, **config_changes) -> nn.Module:
    """Load any litebert or ``transformers`` BERT/ALBERT/DistilBERT directory as the right model class."""
    from pathlib import Path

    from .checkpoint import resolve_model_dir
    from .config import load_config, read_json_file

    model_dir = resolve_model_dir(name_or_path)
    load_config(model_dir)  # validates every field, naming the file, before anything is built
    config_json = read_json_file(Path(model_dir) / "config.json")
    return model_class_for(config_json, task).from_pretrained(model_dir, **config_changes)
