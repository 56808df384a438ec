"""BERT (Devlin et al. 2019): the teacher. Embeddings -> N post-LN blocks -> tanh pooler over [CLS]."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checkpoint import PreTrainedMixin
from ..config import BertConfig
from ..layers import Block, Embeddings, EncoderOutput, init_weights, key_padding_mask


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence vector used by NSP and the sequence heads."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(PreTrainedMixin, nn.Module):
    config_class = BertConfig

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config.vocab_size, config.hidden_size, config.max_position_embeddings,
                                     config.type_vocab_size, config.layer_norm_eps, config.hidden_dropout_prob,
                                     config.pad_token_id)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config.hidden_size) if add_pooler else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                first_token_only: bool = False) -> EncoderOutput:
        """See `litebert.layers.EncoderOutput` for the shapes. ``first_token_only``: the last layer computes position 0
        alone (its attention still reads every position), so ``last_hidden_state`` is (B, 1, H): what a [CLS]-reading
        sentence head needs, for 1/L less work. Ignored when hidden states or attentions are requested."""
        mask = key_padding_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        hidden, attns = [x], []
        last = len(self.layers) - 1 if first_token_only and not (output_hidden_states or output_attentions) else -1
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, mask, output_attentions, i == last)
            hidden.append(x)
            attns.append(probs)
        return EncoderOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )
