"""DistilBERT (Sanh et al. 2019): BERT with half the layers, no token-type embeddings and no pooler."""

from __future__ import annotations

from torch import Tensor, nn

from ..checkpoint import PreTrainedMixin
from ..config import DistilBertConfig
from ..layers import Block, Embeddings, EncoderOutput, init_weights, key_padding_mask


class DistilBertModel(PreTrainedMixin, nn.Module):
    config_class = DistilBertConfig

    def __init__(self, config: DistilBertConfig, add_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config.vocab_size, config.hidden_size, config.max_position_embeddings, 0,
                                     config.layer_norm_eps, config.hidden_dropout_prob, config.pad_token_id,
                                     sinusoidal=config.sinusoidal_pos_embds)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.pooler = None  # DistilBERT has none; sequence heads use a pre-classifier over [CLS] instead
        self.apply(lambda m: init_weights(m, config.initializer_range))

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                first_token_only: bool = False) -> EncoderOutput:
        """See `litebert.models.bert.BertModel.forward`. ``token_type_ids`` is accepted (tokenizers produce it) and
        ignored: DistilBERT has no segment embeddings."""
        mask = key_padding_mask(attention_mask)
        x = self.embeddings(input_ids)  # (B, T, H)
        hidden, attns = [x], []
        last = len(self.layers) - 1 if first_token_only and not (output_hidden_states or output_attentions) else -1
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, mask, output_attentions, i == last)
            hidden.append(x)
            attns.append(probs)
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )
