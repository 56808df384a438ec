"""Parity with `transformers` (test-only dependency): the same random weights give the same outputs, both ways."""

import pytest
import torch

import litebert
from litebert import heads

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}

# (family, HF config kwargs). ALBERT is covered over every sharing layout the reference supports.
FAMILIES = {
    "bert": lambda: transformers.BertConfig(**TINY),
    "albert-g1": lambda: transformers.AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=1, inner_group_num=1),
    "albert-g2": lambda: transformers.AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=2, inner_group_num=1),
    "albert-g2-inner2": lambda: transformers.AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=2,
                                                          inner_group_num=2),
    "albert-unshared": lambda: transformers.AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=4),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0),
    "distilbert-sinusoidal": lambda: transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, sinusoidal_pos_embds=True),
}

TASKS = {  # our class -> HF auto class name suffix
    "base": (None, "Model"),
    "masked-lm": (heads.EncoderForMaskedLM, "ForMaskedLM"),
    "pretraining": (heads.EncoderForPreTraining, "ForPreTraining"),
    "classification": (heads.EncoderForSequenceClassification, "ForSequenceClassification"),
    "ner": (heads.EncoderForTokenClassification, "ForTokenClassification"),
    "qa": (heads.EncoderForQuestionAnswering, "ForQuestionAnswering"),
    "multiple-choice": (heads.EncoderForMultipleChoice, "ForMultipleChoice"),
}

HF_PREFIX = {"bert": "Bert", "albert": "Albert", "distilbert": "DistilBert"}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def hf_class(family: str, suffix: str):
    name = HF_PREFIX[family.split("-")[0]] + suffix
    return getattr(transformers, name, None)


def inputs(multiple_choice: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded rows
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    types = types * mask
    if multiple_choice:
        return ids.view(1, 3, 11), mask.view(1, 3, 11), types.view(1, 3, 11)
    return ids, mask, types


def hf_outputs(model, family, ids, mask, types):
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if not family.startswith("distilbert"):
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        return model(**kwargs)


def compare(ours, theirs, task, mask):
    if task == "base":
        valid = mask.bool()[..., None].expand_as(theirs.last_hidden_state)
        torch.testing.assert_close(ours.last_hidden_state[valid], theirs.last_hidden_state[valid], **TOL)
        if getattr(theirs, "pooler_output", None) is not None:
            torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, **TOL)
    elif task == "pretraining":
        torch.testing.assert_close(ours.logits, theirs.prediction_logits, **TOL)
        theirs_sentence = getattr(theirs, "sop_logits", None)
        if theirs_sentence is None:
            theirs_sentence = theirs.seq_relationship_logits
        torch.testing.assert_close(ours.sentence_logits, theirs_sentence, **TOL)
    elif task == "qa":
        torch.testing.assert_close(ours.start_logits, theirs.start_logits, **TOL)
        torch.testing.assert_close(ours.end_logits, theirs.end_logits, **TOL)
    else:
        torch.testing.assert_close(ours.logits, theirs.logits, **TOL)


def run_ours(model, ids, mask, types):
    with torch.no_grad():
        return model(ids, attention_mask=mask, token_type_ids=types)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_load_transformers_checkpoint(tmp_path, family, task, attn):
    ours_cls, suffix = TASKS[task]
    theirs_cls = hf_class(family, suffix)
    if theirs_cls is None:
        pytest.skip(f"transformers has no {family} {suffix}")
    torch.manual_seed(0)
    theirs = theirs_cls(FAMILIES[family]()).eval()
    theirs.save_pretrained(tmp_path)
    ours = litebert.from_pretrained(str(tmp_path))
    assert ours_cls is None or isinstance(ours, ours_cls)
    litebert.set_attn_implementation(ours, attn)
    assert not ours.load_report.unexpected and not ours.load_report.missing, ours.load_report.summary()
    ids, mask, types = inputs(task == "multiple-choice")
    compare(run_ours(ours, ids, mask, types), hf_outputs(theirs, family, ids, mask, types), task, mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_transformers_loads_what_we_save(tmp_path, family, task):
    ours_cls, suffix = TASKS[task]
    theirs_cls = hf_class(family, suffix)
    if theirs_cls is None:
        pytest.skip(f"transformers has no {family} {suffix}")
    # Build ours from the HF config (converted), random init on our side.
    hf_cfg = FAMILIES[family]()
    config = litebert.config.config_from_dict(hf_cfg.to_dict())
    torch.manual_seed(0)
    ours = (ours_cls or heads.ENCODERS[config.model_type])(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that a mis-mapped tensor shows
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.save_pretrained(tmp_path)
    theirs, info = theirs_cls.from_pretrained(tmp_path, output_loading_info=True)
    theirs.eval()
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    ids, mask, types = inputs(task == "multiple-choice")
    compare(run_ours(ours, ids, mask, types), hf_outputs(theirs, family, ids, mask, types), task, mask)
