"""Hostile and careless input (issue 17): recipe paths that would import code, config.json / recipe / data files
with the wrong types or bytes. Every one must be a clear error naming the file and field (or line), never a traceback
from deep inside, and never code execution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from litebert.config import ConfigError
from litebert.training import finetune
from litebert.training.finetune import resolve_path


# -- 1. pkg: paths never import ----------------------------------------------------------------------------------
def test_pkg_path_does_not_import_the_named_module(tmp_path):
    """`pkg:evil.sub/x` used to import `evil` (find_spec imports parents); the side effect must not happen."""
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text(f"open({str(tmp_path / 'pwned2')!r}, 'w').write('x')\n")
    (tmp_path / "evilpkg" / "sub").mkdir()
    code = ("import sys; from litebert.training.finetune import resolve_path; from litebert.config import ConfigError\n"
            "for v in ('pkg:evil.sub/t.csv', 'pkg:evil/t.csv', 'pkg:evilpkg.sub/t.csv', 'pkg:evilpkg/t.csv'):\n"
            "    try: print(resolve_path(v))\n"
            "    except ConfigError as e: print('refused', e)\n"
            "assert 'evil' not in sys.modules and 'evilpkg' not in sys.modules\n")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(finetune.__file__).parents[2]}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused") and lines[1].startswith("refused")  # a module, not a package
    assert lines[2] == str(tmp_path / "evilpkg" / "sub" / "t.csv")  # a directory, located without running it


@pytest.mark.parametrize("value,match", [
    ("pkg:../x", "not a Python package name"),
    ("pkg:/etc/passwd", "not a Python package name"),
    ("pkg:litebert/../../../etc/passwd", "must stay inside"),
    ("pkg:litebert//etc/passwd", "must stay inside"),
    ("pkg:os;print(1)/x", "not a Python package name"),
    ("pkg:litebert.no_such_sub/x", "no installed Python package 'litebert.no_such_sub'"),
])
def test_pkg_path_names_are_validated_and_stay_inside(value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_path(value)


def test_pkg_path_symlink_out_of_the_package_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "datapkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "link").symlink_to("/etc")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_path("pkg:datapkg/a.csv") == str(pkg / "a.csv")
    with pytest.raises(ConfigError, match="outside the package"):
        resolve_path("pkg:datapkg/link/passwd")


# -- 5. config.json, recipes and data files: errors name the file and the field / line ----------------------------
@pytest.fixture()
def tiny_dir(tmp_path):
    import litebert

    out = tmp_path / "model"
    litebert.BertModel(litebert.preset("bert-test")).save_pretrained(out)
    return out


def _patch_config(model_dir, **changes):
    import json

    path = model_dir / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("changes,field", [
    ({"hidden_dropout_prob": "0.1"}, "hidden_dropout_prob must be a number, got '0.1'"),
    ({"pad_token_id": "0"}, "pad_token_id must be an integer, got '0'"),
    ({"id2label": ["neg", "pos"]}, "id2label must be a mapping"),
    ({"id2label": {"a": "neg"}}, "id2label keys must be integer ids"),
    ({"vocab_size": 1e12}, "vocab_size must be an integer"),
    ({"vocab_size": 10**12}, r"vocab_size \(1000000000000\) is larger than"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps must be a number, got 'x'"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a positive number"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
])
def test_config_json_wrong_types_name_file_and_field(tiny_dir, changes, field):
    import litebert

    path = _patch_config(tiny_dir, **changes)
    with pytest.raises(ConfigError, match=rf"{path}: .*{field}"):
        litebert.from_pretrained(str(tiny_dir))


def test_config_json_top_level_list_and_invalid_json(tiny_dir):
    import litebert

    path = tiny_dir / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{path}: .*expected a JSON object"):
        litebert.from_pretrained(str(tiny_dir))
    path.write_text('{"model_type": "bert",\n "hidden_size": }')
    with pytest.raises(ConfigError, match=rf"{path}:2: invalid JSON"):
        litebert.from_pretrained(str(tiny_dir))


def test_malformed_tokenizer_files_name_the_file(tmp_path):
    from litebert.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'tokenizer.json'}: not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'tokenizer.json'}:1: invalid tokenizer JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("")  # what a kill mid-save used to leave
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'tokenizer_config.json'}:1: invalid JSON"):
        load_tokenizer(tmp_path)


def test_shard_index_without_weight_map_or_with_outside_paths(tiny_dir):
    import json

    from litebert.checkpoint import CheckpointError, read_weights

    (tiny_dir / "model.safetensors").rename(tiny_dir / "shard-1.safetensors")
    index = tiny_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=rf"{index}: no 'weight_map'"):
        read_weights(tiny_dir)
    for bad in ("../outside.safetensors", "/etc/passwd"):
        index.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors", "b": bad}}))
        with pytest.raises(CheckpointError, match=rf"shard '{bad}' is not a file inside"):
            read_weights(tiny_dir)
    index.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    assert read_weights(tiny_dir)


@pytest.mark.parametrize("flags,match", [
    (["--train.max_steps", "abc"], "train: max_steps must be an integer, got 'abc'"),
    (["--train.max_steps", "3", "--train.betas", "0.9"], "train: betas must be a list, got 0.9"),
    (["--train.max_steps", "3", "--train.warmup_steps", "[1]"], "train: warmup_steps must be an integer or null"),
])
def test_recipe_keys_with_none_or_list_defaults_are_type_checked(flags, match):
    from litebert.recipe import build, resolve
    from litebert.training.finetune import default_recipe
    from litebert.training.loop import TrainConfig

    train = resolve(default_recipe(), None, flags)["train"]
    for finetune_only in ("num_epochs", "eval_batch_size"):
        train.pop(finetune_only)
    with pytest.raises(ConfigError, match=match):
        build(TrainConfig, train, "train")


NOT_UTF8 = b"\xff\xfe bad \x80 bytes"


@pytest.mark.parametrize("name,content,line", [
    ("a.csv", b"text,label\ngood film,pos\n" + NOT_UTF8 + b",neg\n", 3),
    ("a.jsonl", b'{"text": "ok", "label": "pos"}\n{"text": "' + NOT_UTF8 + b'", "label": "neg"}\n', 2),
    ("a.tsv", b"text\tlabel\n" + NOT_UTF8 + b"\tneg\n", 2),
])
def test_non_utf8_classification_input_names_file_and_line(tmp_path, name, content, line):
    from litebert.data.tasks import read_text_classification

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}:{line}: not UTF-8 text"):
        read_text_classification(path, "text", None, "label")


def test_non_utf8_conll_squad_mc_and_predict_input_name_file_and_line(tmp_path):
    from litebert.data.tasks import read_conll, read_multiple_choice, read_squad
    from litebert.inference.pipeline import read_inputs

    conll = tmp_path / "a.conll"
    conll.write_bytes(b"Alice\tB-PER\n" + NOT_UTF8 + b"\tO\n")
    with pytest.raises(ValueError, match=rf"{conll}:2: not UTF-8 text"):
        read_conll(conll)
    squad = tmp_path / "squad.json"
    squad.write_bytes(b'{"data": [\n"' + NOT_UTF8 + b'"]}')
    with pytest.raises(ValueError, match=rf"{squad}:2: not UTF-8 text"):
        read_squad(squad)
    mc = tmp_path / "mc.jsonl"
    mc.write_bytes(NOT_UTF8 + b"\n")
    with pytest.raises(ValueError, match=rf"{mc}:1: not UTF-8 text"):
        read_multiple_choice(mc)
    for name in ("in.txt", "in.jsonl"):
        path = tmp_path / name
        path.write_bytes(b'{"text": "fine"}\n\n' + NOT_UTF8 + b"\n")
        with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text"):
            read_inputs(path)


# -- 6. partial-sharing ALBERT is not silently loadable by transformers --------------------------------------------
@pytest.mark.parametrize("share", ["attention", "ffn"])
def test_partial_sharing_albert_is_refused_by_transformers_and_loaded_by_litebert(tmp_path, share):
    import torch

    import litebert

    transformers = pytest.importorskip("transformers")
    model = litebert.EncoderForMaskedLM(litebert.preset("albert-test", share=share)).eval()
    model.save_pretrained(tmp_path)
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path))
    loaded = litebert.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model) and loaded.config.share == share
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
