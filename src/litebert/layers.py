"""Primitives shared by every family: activations, masks, embeddings, attention, feed-forward, the post-LN block.

All three families (BERT, ALBERT, DistilBERT) use the same post-LayerNorm block; they differ in embeddings,
sharing and heads, which live in ``models/`` and ``heads.py``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .runtime import hardware


def activation(name: str):
    """The activation as one fused op. ALBERT's ``gelu_new`` is the tanh approximation."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"hidden_act: unknown activation {name!r}")


# hidden_act -> (oneDNN post-op, its algorithm) for the fused inference path below.
_ONEDNN_POSTOP = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                  "relu": ("relu", ""), "silu": ("swish", "")}


def _onednn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == weight.dtype
            and hardware().fused_linear(x.dtype) and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


# Linears opted in by `prepack_linears` -> (key of the weight they were packed from, the packed weight) or None.
_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int, torch.dtype], Tensor] | None] = (
    weakref.WeakKeyDictionary())
# bf16 rows (batch x tokens) up to which the packed weight pays; past it oneDNN's own per-call reorder is faster
# (`bench/inference_switches.py` times packing on and off).
_BF16_PACKED_MAX_ROWS = 256


def prepack_linears(model: nn.Module) -> nn.Module:
    """Opt ``model``'s encoder linears into pre-packed weights for CPU inference: each weight is reordered once into
    oneDNN's blocked layout (a second copy of the encoder weights) instead of on every call. The packed copy is
    made lazily and remade whenever the weight changes (an optimizer step, ``load_state_dict``, ``.to(dtype)``), so
    the model stays trainable and saveable; the packs live outside the module (nothing in its state dict). Where the
    hardware probe says packing does not apply to a weight's dtype, that linear runs unpacked."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module not in _PACKED:
            _PACKED[module] = None
    return model


def _packed_weight(layer: nn.Linear, rows: int) -> Tensor:
    weight = layer.weight
    if (layer not in _PACKED or not hardware().prepack(weight.dtype)
            or (weight.dtype == torch.bfloat16 and rows > _BF16_PACKED_MAX_ROWS)):
        return weight
    # Inference tensors (a model built under inference_mode) keep no version counter; they can only change in place
    # under inference_mode, so a pack made from one is kept until the tensor is replaced.
    key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version, weight.dtype)
    entry = _PACKED[layer]
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _PACKED[layer] = entry
    return entry[1]


def linear(x: Tensor, layer: nn.Linear, act: str | None = None) -> Tensor:
    """``act(layer(x))``. At inference on CPU (no autograd, weights and input of one dtype that the hardware probe
    says oneDNN runs natively) this is one oneDNN matmul with the bias and the activation fused into it (the op
    PyTorch's own compiler emits for CPU linears; `bench/inference_switches.py` times it). Training, autocast,
    tracing for export, other devices and dtypes without native support take the plain path; both agree to
    rounding (``tests/test_models.py``)."""
    if _onednn_linear_applies(x, layer.weight):
        postop, algorithm = _ONEDNN_POSTOP[act] if act else ("none", "")
        weight = _packed_weight(layer, x.numel() // x.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, postop, [], algorithm)
    y = layer(x)
    return activation(act)(y) if act else y


@dataclass
class EncoderOutput:
    """What every encoder returns. Shapes: last_hidden_state (B, T, H), pooler_output (B, H) or None,
    hidden_states: tuple of (B, T, H), one per pass plus the embedding output; attentions: tuple of (B, nh, T, T)."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, T) 1/0 mask -> (B, 1, 1, T) bool mask for SDPA, or None when nothing is padded.

    Returning None when there is no padding lets SDPA pick its fastest kernel; the (B, 1, 1, T) mask broadcasts
    over heads and queries, so a (B, nh, T, T) mask is never materialised.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]  # (B, 1, 1, T)


def sinusoidal_positions(num_positions: int, dim: int) -> Tensor:
    """Fixed sin/cos position table (Vaswani et al. 2017), as DistilBERT's ``sinusoidal_pos_embds``."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table.float()


class Embeddings(nn.Module):
    """word + position (+ token type) -> LayerNorm -> dropout, at width ``dim`` (E for ALBERT, H otherwise)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, type_vocab_size: int, eps: float,
                 dropout: float, pad_token_id: int = 0, sinusoidal: bool = False):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, dim)
        if sinusoidal:
            self.position.weight.data.copy_(sinusoidal_positions(max_positions, dim))
            self.position.weight.requires_grad_(False)
        self.token_type = nn.Embedding(type_vocab_size, dim) if type_vocab_size else None
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        T = input_ids.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings ({self.position.num_embeddings})")
        x = self.word(input_ids) + self.position.weight[:T]  # (B, T, E)
        if self.token_type is not None:
            if token_type_ids is None:
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


# Set by `onnx_attention_op` for the duration of an ONNX export.
_ONNX_ATTENTION_OP = False


@contextlib.contextmanager
def onnx_attention_op():
    """Within this block, tracing writes each attention as one ONNX ``Attention`` node (opset 23) instead of
    matmul, softmax, matmul and the reshapes and transposes around them. The caller declares opset 23 in the file."""
    global _ONNX_ATTENTION_OP
    previous, _ONNX_ATTENTION_OP = _ONNX_ATTENTION_OP, True
    try:
        yield
    finally:
        _ONNX_ATTENTION_OP = previous


class _AttentionOp(torch.autograd.Function):
    """softmax(q k^T / sqrt(hs) + bias) v over (B, T, H) projections, traced as one ONNX ``Attention`` node, which ONNX
    Runtime runs in less time than the spelled-out graph with its head split and merge (exploratory timing of one
    layer; whole-model figures in the README). ``bias``: (B, 1, Tq, Tk), additive: ONNX Runtime requires the query
    axis written out."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_heads: int) -> Tensor:
        B, Tq, H = q.shape
        heads = lambda t: t.view(B, t.shape[1], num_heads, H // num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)  # (B, nh, Tq, hs)
        return y.transpose(1, 2).reshape(B, Tq, H)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int):
        """The ONNX node (``g``: the TorchScript graph being exported; ``q``, ``k``, ``v``, ``bias``: its values)."""
        return g.op("Attention", q, k, v, bias, q_num_heads_i=num_heads, kv_num_heads_i=num_heads).setType(q.type())


_EXPLICIT_ATTENTION_MAX_T = 384


def _explicit_attention_is_faster(q: Tensor) -> bool:
    """Whether to train with matmul + softmax instead of SDPA's CPU flash kernel, whose reduced-precision backward
    is slow on short sequences where bf16 is native (`bench/pretrain_throughput.py` times both). The explicit path
    keeps the (B, nh, T, T) probabilities for backward, which starts to cost memory past a few hundred tokens. In
    fp32, without autograd, or where bf16 is emulated, SDPA stays."""
    return (q.requires_grad and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] <= _EXPLICIT_ATTENTION_MAX_T and hardware().cpu_bf16)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, output projection, residual and LayerNorm.

    ``impl="sdpa"`` uses ``F.scaled_dot_product_attention`` with a key-padding mask, except when training in
    native bf16/fp16 on CPU at short lengths, where the explicit softmax is faster (see
    ``_explicit_attention_is_faster``); ``"eager"`` is always the explicit softmax and is used when attention
    probabilities are requested.
    """

    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float, hidden_dropout: float, eps: float,
                 impl: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.impl = impl
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None, output_attentions: bool = False,
                first_token_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """``first_token_only``: attend from position 0 alone (over every key) and return (B, 1, H)."""
        if _ONNX_ATTENTION_OP and torch.jit.is_tracing() and not output_attentions:
            (y, x), probs = self._attention_node(x, mask, first_token_only), None
        else:
            y, x, probs = self._attention(x, mask, output_attentions, first_token_only)
        return self.norm(x + self.dropout(linear(y, self.out))), probs

    def _attention(self, x: Tensor, mask: Tensor | None, output_attentions: bool,
                   first_token_only: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> the heads' merged output (B, T, H), the residual input (``x``, or its position 0) and the probabilities
        when computed."""
        B, T, H = x.shape
        qkv = linear(x, self.qkv).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        if first_token_only:
            q, x, T = q[:, :, :1], x[:, :1], 1  # (B, nh, 1, hs), (B, 1, H)
        p = self.attn_dropout if self.training else 0.0
        probs = None
        # Tracing (ONNX export) takes the explicit path too: the exporter writes SDPA with a mask as a softmax
        # followed by a NaN guard, Where(IsNaN) over the (B, nh, T, T) probabilities, measured at 14% of an int8
        # BERT-base forward in ONNX Runtime; an additive (B, 1, 1, T) bias needs no guard.
        if (self.impl == "sdpa" and not output_attentions and not _explicit_attention_is_faster(q)
                and not torch.jit.is_tracing()):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, T)
            if mask is not None:  # a padded key gets the dtype's lowest value: probability 0 after the softmax
                scores = scores + (~mask).to(scores.dtype) * torch.finfo(scores.dtype).min
            probs = scores.softmax(dim=-1)
            y = F.dropout(probs, p, self.training) @ v  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H), x, probs

    def _attention_node(self, x: Tensor, mask: Tensor | None, first_token_only: bool) -> tuple[Tensor, Tensor]:
        """`_attention` for `onnx_attention_op`: the (B, T, H) projections into one `_AttentionOp`, no head split."""
        B, T, H = x.shape
        q, k, v = linear(x, self.qkv).split(H, dim=-1)  # (B, T, H) each
        if first_token_only:
            q, x = q[:, :1], x[:, :1]
        if mask is None:
            mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        bias = ((~mask).to(x.dtype) * torch.finfo(x.dtype).min).expand(B, 1, q.shape[1], T)  # (B, 1, Tq, T)
        return _AttentionOp.apply(q, k, v, bias, self.num_heads), x


class FeedForward(nn.Module):
    """up-projection -> activation -> down-projection, residual and LayerNorm."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, dropout: float, eps: float):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        activation(act)  # validates the name
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(linear(linear(x, self.up, self.act), self.down)))


class Block(nn.Module):
    """A post-LN transformer block: attention sub-layer then feed-forward sub-layer."""

    def __init__(self, config):
        super().__init__()
        self.attn = make_attention(config)
        self.ffn = make_ffn(config)

    def forward(self, x: Tensor, mask: Tensor | None, output_attentions: bool = False,
                first_token_only: bool = False) -> tuple[Tensor, Tensor | None]:
        x, probs = self.attn(x, mask, output_attentions, first_token_only)
        return self.ffn(x), probs


def make_attention(config) -> SelfAttention:
    return SelfAttention(config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob,
                         config.hidden_dropout_prob, config.layer_norm_eps, config.attn_implementation)


def make_ffn(config) -> FeedForward:
    return FeedForward(config.hidden_size, config.intermediate_size, config.hidden_act, config.hidden_dropout_prob,
                       config.layer_norm_eps)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: N(0, std) for projections and embeddings, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        if module.weight.requires_grad:  # sinusoidal tables are fixed
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_attn_implementation(model: nn.Module, impl: str) -> None:
    """Switch every attention layer between ``sdpa`` and ``eager`` (outputs are the same up to rounding)."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {impl!r}")
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.impl = impl
    if hasattr(model, "config"):
        model.config.attn_implementation = impl
