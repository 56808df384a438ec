"""litebert: compact BERT-family encoders (ALBERT, DistilBERT, BERT) in plain PyTorch.

    >>> import litebert
    >>> model = litebert.EncoderForSequenceClassification(litebert.preset("albert-base"))
    >>> model = litebert.from_pretrained("path/to/model_dir")   # litebert or transformers checkpoints
"""

from .checkpoint import CheckpointError, LoadReport
from .config import (
    PRESETS,
    AlbertConfig,
    BertConfig,
    ConfigError,
    DistilBertConfig,
    EncoderConfig,
    load_config,
    preset,
)
from .heads import (
    EncoderForMaskedLM,
    EncoderForMultipleChoice,
    EncoderForPreTraining,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    HeadOutput,
    build_encoder,
    from_pretrained,
)
from .inference.pipeline import pipeline
from .layers import EncoderOutput, set_attn_implementation
from .models.albert import AlbertModel
from .models.bert import BertModel
from .models.distilbert import DistilBertModel

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AlbertConfig",
    "AlbertModel",
    "BertConfig",
    "BertModel",
    "CheckpointError",
    "ConfigError",
    "DistilBertConfig",
    "DistilBertModel",
    "EncoderConfig",
    "EncoderForMaskedLM",
    "EncoderForMultipleChoice",
    "EncoderForPreTraining",
    "EncoderForQuestionAnswering",
    "EncoderForSequenceClassification",
    "EncoderForTokenClassification",
    "EncoderOutput",
    "HeadOutput",
    "LoadReport",
    "build_encoder",
    "from_pretrained",
    "load_config",
    "pipeline",
    "preset",
    "set_attn_implementation",
]
