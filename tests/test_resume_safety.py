"""Resume under hostile conditions (issue 17): a torn tokenizer directory or metrics line, a changed recipe, a
corrupt latest checkpoint, a finished run started again, two runs on one directory, Ctrl-C.

The tests that pre-train are `slow` (tens of seconds each on two cores); `make test-slow` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from litebert import cli
from litebert.config import ConfigError
from litebert.tokenizer import train_tokenizer
from litebert.training import pretrain
from litebert.training.pretrain import run_pretraining
from litebert.training.rundir import acquire_lock, release_lock
from test_pretrain_e2e import corpus, recipe  # noqa: F401 - the corpus fixture

STEPS = ("--train.max_steps", "8", "--tokenizer.kind", "wordpiece")


def _rows(out):
    return (out / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finished") / "run"
    run_pretraining(recipe(corpus, out, *STEPS), out)
    return out


@pytest.mark.slow
def test_zero_byte_tokenizer_config_from_a_kill_does_not_block_resume(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # What a kill during the old, unsealed tokenizer save left: tokenizer.json whole, tokenizer_config.json empty.
    train_tokenizer([corpus / "train.txt"], kind="wordpiece", vocab_size=600, out_dir=out / "tokenizer")
    (out / "tokenizer" / "tokenizer_config.json").write_bytes(b"")
    summary = run_pretraining(recipe(corpus, out, "--train.max_steps", "2", "--tokenizer.kind", "wordpiece"), out)
    assert summary["step"] == 2
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["do_lower_case"] is True


@pytest.mark.slow
def test_tokenizer_directory_is_sealed_and_a_torn_one_is_trained_again(corpus, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    real_save = pretrain.train_tokenizer

    def dies_mid_save(*args, **kwargs):
        real_save(*args, **{**kwargs, "out_dir": None})
        (kwargs["out_dir"] / "tokenizer.json").write_text('{"trunc')  # torn, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "train_tokenizer", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(recipe(corpus, out, "--train.max_steps", "2", "--tokenizer.kind", "wordpiece"), out)
    assert not (out / "tokenizer").exists()  # nothing half-written under the real name
    monkeypatch.setattr(pretrain, "train_tokenizer", real_save)
    run_pretraining(recipe(corpus, out, "--train.max_steps", "2", "--tokenizer.kind", "wordpiece"), out)
    assert (out / "tokenizer" / "COMPLETE").is_file()


@pytest.mark.slow
def test_changed_model_or_optimizer_is_refused_and_the_record_kept(corpus, finished):  # noqa: F811
    record = (finished / "run.yaml").read_text()
    for flags, change in ((("--model.hidden_size", "64"), "model.hidden_size: 32 -> 64"),
                          (("--train.optimizer", "adamw"), "train.optimizer: 'lamb' -> 'adamw'")):
        with pytest.raises(ConfigError, match=rf"holds checkpoints of a run with another recipe(.|\n)*{change}"):
            run_pretraining(recipe(corpus, finished, *STEPS, *flags), finished)
        assert (finished / "run.yaml").read_text() == record


@pytest.mark.slow
def test_rerunning_a_finished_run_appends_nothing(corpus, finished):  # noqa: F811
    before = _rows(finished)
    run_pretraining(recipe(corpus, finished, *STEPS), finished)
    assert _rows(finished) == before


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(corpus, finished):  # noqa: F811
    before = _rows(finished)
    (finished / "metrics.jsonl").write_text("\n".join(before) + '\n{"step": 8, "lo')
    run_pretraining(recipe(corpus, finished, *STEPS), finished)
    assert _rows(finished) == before
    (finished / "metrics.jsonl").write_text("\n".join([before[0], "garbage", *before[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{finished / 'metrics.jsonl'}:2: not a JSON object"):
        run_pretraining(recipe(corpus, finished, *STEPS), finished)
    (finished / "metrics.jsonl").write_text("\n".join(before) + "\n")


@pytest.mark.slow
def test_latest_checkpoint_failing_its_hash_falls_back_to_the_previous(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run_pretraining(recipe(corpus, out, *STEPS), out)
    straight = _rows(out)
    weights = out / "checkpoints" / "step-00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 tells
    weights.write_bytes(bytes(data))
    (out / "final").rename(tmp_path / "final-straight")
    run_pretraining(recipe(corpus, out, *STEPS), out)
    assert (out / "checkpoints" / "step-00000008.corrupt").is_dir()
    assert (out / "checkpoints" / "step-00000008" / "COMPLETE").is_file()
    assert _rows(out) == straight or [json.loads(r)["step"] for r in _rows(out)] == \
        [json.loads(r)["step"] for r in straight]


def test_second_run_on_the_same_out_is_refused_and_a_dead_holder_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from litebert.training.rundir import acquire_lock
            acquire_lock({str(out)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another litebert run \(pid {holder.pid}\) is writing"):
            acquire_lock(out)
    finally:
        holder.kill()  # like kill -9: the lock file stays behind, its flock goes with the process
        holder.wait(timeout=30)
    assert (out / ".lock").exists()
    acquire_lock(out)
    release_lock(out)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130_without_traceback(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "run"
    calls = {"n": 0}
    real = pretrain.pretraining_objective

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(pretrain, "pretraining_objective", interrupted)
    args = recipe(corpus, out, *STEPS)
    flags = ["--out", str(out), "--data.train", args["data"]["train"], "--data.validation",
             args["data"]["validation"], "--data.cache_dir", args["data"]["cache_dir"]]
    from test_pretrain_e2e import TINY

    assert cli.main(["pretrain", *flags, *TINY, *STEPS]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-00000005" / "COMPLETE").is_file()
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["max_steps"] == 8
