"""ALBERT (Lan et al. 2019): factorised embeddings (E -> H projection) and cross-layer parameter sharing."""

from __future__ import annotations

from torch import Tensor, nn

from ..checkpoint import PreTrainedMixin
from ..config import AlbertConfig
from ..layers import Embeddings, EncoderOutput, init_weights, key_padding_mask, make_attention, make_ffn
from .bert import BertPooler


class AlbertModel(PreTrainedMixin, nn.Module):
    """The encoder runs ``num_hidden_layers`` passes; pass i belongs to group ``i // (L / G)`` and runs that
    group's ``inner_group_num`` layers. Attention and FFN modules are kept in two flat lists so that ``share``
    can share one kind and not the other:

    - ``all``:       attention[g, j] and ffn[g, j]       (the reference; G * inner modules of each)
    - ``attention``: attention[g, j] and ffn[pass, j]    (one FFN per pass)
    - ``ffn``:       attention[pass, j] and ffn[g, j]
    - ``none``:      attention[pass, j] and ffn[pass, j] (equivalent to G = L in the reference)
    """

    config_class = AlbertConfig

    def __init__(self, config: AlbertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        L, G, inner = config.num_hidden_layers, config.num_hidden_groups, config.inner_group_num
        self.embeddings = Embeddings(config.vocab_size, config.embedding_size, config.max_position_embeddings,
                                     config.type_vocab_size, config.layer_norm_eps, config.hidden_dropout_prob,
                                     config.pad_token_id)
        self.project = nn.Linear(config.embedding_size, config.hidden_size)
        share_attn, share_ffn = config.share in ("all", "attention"), config.share in ("all", "ffn")
        self.attn = nn.ModuleList(make_attention(config) for _ in range((G if share_attn else L) * inner))
        self.ffn = nn.ModuleList(make_ffn(config) for _ in range((G if share_ffn else L) * inner))

        # For pass i and inner layer j: which attention / FFN module runs.
        def index(i: int, j: int, shared: bool) -> int:
            return (i // (L // G) if shared else i) * inner + j

        self._attn_index = [[index(i, j, share_attn) for j in range(inner)] for i in range(L)]
        self._ffn_index = [[index(i, j, share_ffn) for j in range(inner)] for i in range(L)]
        self.pooler = BertPooler(config.hidden_size) if add_pooler else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                first_token_only: bool = False) -> EncoderOutput:
        """See `litebert.models.bert.BertModel.forward` (here the last pass's last inner layer is the one cut to
        position 0)."""
        mask = key_padding_mask(attention_mask)
        x = self.project(self.embeddings(input_ids, token_type_ids))  # (B, T, E) -> (B, T, H)
        hidden, attns = [x], []
        cut = first_token_only and not (output_hidden_states or output_attentions)
        last = (len(self._attn_index) - 1, len(self._attn_index[-1]) - 1) if cut else None
        for i, (attn_ids, ffn_ids) in enumerate(zip(self._attn_index, self._ffn_index)):
            for j, (a, f) in enumerate(zip(attn_ids, ffn_ids)):
                x, probs = self.attn[a](x, mask, output_attentions, (i, j) == last)
                x = self.ffn[f](x)
                attns.append(probs)
            hidden.append(x)
        return EncoderOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )
