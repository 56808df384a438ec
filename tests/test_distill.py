"""`litebert distill`: loss terms, layer maps, student initialisation, the frozen teacher, tiny end-to-end runs
(task and general distillation, logit cache, compression report) and bad input."""

import csv
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import litebert
from litebert.config import BertConfig, ConfigError, preset
from litebert.heads import EncoderForMaskedLM, EncoderForSequenceClassification
from litebert.recipe import resolve
from litebert.tokenizer import train_tokenizer
from litebert.training import distill
from litebert.training.distill import (
    DistillationObjective,
    DistillationStudent,
    LossConfig,
    attention_mse_loss,
    build_student,
    check_layer_map,
    default_layer_map,
    default_recipe,
    hidden_cosine_loss,
    run_distillation,
    soft_target_kl,
)

POS = ["good", "great", "lovely", "superb", "moving", "funny"]
NEG = ["bad", "awful", "poor", "dull", "weak", "boring"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "was", "is", "and", "a", "story", "scenes", "music", "its",
           "with", "very", "quite", "cast", "ending"]
LABELS = {0: "neg", 1: "pos"}
QUIET = ["--train.progress", "false", "--train.tensorboard", "false", "--train.precision", "fp32"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is ~10x faster than two on a CPU shared with other jobs (no OpenMP barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentence(rng, label):
    words = rng.choices(NEUTRAL, k=rng.randint(4, 9)) + rng.choices(POS if label else NEG, k=rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-data")
    rng = random.Random(0)
    rows = [(sentence(rng, i % 2), LABELS[i % 2]) for i in range(400)]
    with open(root / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    (root / "corpus.txt").write_text("\n\n".join(". ".join(sentence(rng, i % 2) for _ in range(4))
                                                 for i in range(150)))
    tok = train_tokenizer([root / "corpus.txt"], kind="wordpiece", vocab_size=120, min_frequency=1,
                          out_dir=root / "tokenizer")
    return root, tok


def tiny_bert(tok, **changes):
    values = {"vocab_size": tok.vocab_size, "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
                  "intermediate_size": 48, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0, "pad_token_id": tok.pad_token_id}
    values.update(changes)
    return BertConfig(**values)


@pytest.fixture(scope="module")
def teachers(data):
    """Tiny teachers saved as model directories with the tokenizer: a sequence classifier, a masked LM, and a bare
    encoder (no head, like all-MiniLM-L6-v2)."""
    root, tok = data
    torch.manual_seed(0)
    classifier = EncoderForSequenceClassification(tiny_bert(tok, id2label=LABELS))
    with torch.no_grad():
        classifier.classifier.weight.mul_(100.0)  # confident logits, so the soft targets carry something to learn
    dirs = {}
    for name, model in (("classifier", classifier),
                        ("mlm", EncoderForMaskedLM(tiny_bert(tok))),
                        ("bare", litebert.BertModel(tiny_bert(tok)))):
        dirs[name] = model.save_pretrained(root / f"teacher-{name}", tokenizer=tok)
    return dirs


def task_recipe(root, teacher, *flags):
    args = ["--data.train", str(root / "reviews.csv"), "--data.max_seq_length", "32", "--student.num_hidden_layers",
            "2", "--train.batch_size", "16", "--train.log_every", "1", "--train.eval_every", "1000",
            "--train.save_every", "1000", "--train.lr", "0.003", "--train.warmup_ratio", "0", "--report.enabled",
            "false", "--train.num_threads", "1", *QUIET, *flags]
    recipe = resolve(default_recipe(), None, args)
    recipe["teacher"]["path"] = str(teacher)
    return recipe


def losses(out_dir, key="loss"):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


# -- loss terms -------------------------------------------------------------------------------------------------
def test_kl_is_zero_for_identical_logits_and_scales_with_t_squared():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    for T in (1.0, 2.0, 4.0):
        assert soft_target_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
        expected = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
        torch.testing.assert_close(soft_target_kl(s, t, T), expected)
    # Same softened distributions at T=2 as at T=1 (logits doubled): the loss is exactly T² = 4 times larger.
    torch.testing.assert_close(soft_target_kl(2 * s, 2 * t, 2.0), 4 * soft_target_kl(s, t, 1.0))


def test_kl_and_hidden_losses_ignore_padding_positions():
    s, t = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 4:], t2[0, 4:] = 100.0, -100.0  # garbage at the padding
    torch.testing.assert_close(soft_target_kl(s, t, 2.0, mask), soft_target_kl(s2, t2, 2.0, mask))
    torch.testing.assert_close(hidden_cosine_loss(s, t, mask), hidden_cosine_loss(s2, t2, mask))
    assert hidden_cosine_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    a = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    assert attention_mse_loss([a], [a], mask).item() == 0.0
    # Different head counts are compared head-averaged.
    assert attention_mse_loss([a], [a.repeat(1, 2, 1, 1)], mask).item() == pytest.approx(0.0, abs=1e-7)


# -- layer maps -------------------------------------------------------------------------------------------------
def test_mcnemar_counts_discordant_pairs():
    from litebert.report import mcnemar

    assert mcnemar([True] * 5 + [False] * 5, [True] * 10) == {"examples": 10, "only_first_right": 0,
                                                                "only_second_right": 5, "p_value": 0.0625}
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_default_layer_map_reproduces_distilbert_and_is_evenly_spaced():
    assert default_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert default_layer_map(6, 3) == [0, 3, 5]
    assert default_layer_map(12, 4) == [0, 4, 7, 11]
    assert default_layer_map(6, 6) == list(range(6))
    assert default_layer_map(6, 1) == [5]
    for n in range(1, 25):
        for m in range(2, n + 1):
            lm = default_layer_map(n, m)
            assert lm[0] == 0 and lm[-1] == n - 1 and lm == sorted(set(lm)), (n, m, lm)


def test_layer_map_out_of_range_names_the_bad_index():
    with pytest.raises(ConfigError, match=r"student\.layer_map\[1\] = 7 is out of range: the teacher has 6 layers"):
        check_layer_map([0, 7, 5], 6, 3)
    with pytest.raises(ConfigError, match=r"layer_map\[2\] = -1"):
        check_layer_map([0, 1, -1], 6, 3)
    with pytest.raises(ConfigError, match="has 2 entries but the student has 3 layers"):
        check_layer_map([0, 1], 6, 3)


# -- student initialisation -------------------------------------------------------------------------------------
def test_distilbert_student_init_copies_exactly_the_mapped_layers(data):
    _, tok = data
    torch.manual_seed(0)
    teacher = EncoderForSequenceClassification(tiny_bert(tok, id2label=LABELS)).eval()
    section = {**default_recipe()["student"], "preset": "distilbert-base", "num_hidden_layers": 3,
               "layer_map": [0, 2, 5]}
    student, layer_map = build_student(teacher, section, EncoderForSequenceClassification)
    assert layer_map == [0, 2, 5] and student.config.model_type == "distilbert"
    assert student.config.hidden_size == 32 and student.config.vocab_size == tok.vocab_size  # teacher widths
    t_layers, s_layers = teacher.encoder.layers, student.encoder.layers
    for j, i in enumerate(layer_map):
        for key, value in s_layers[j].state_dict().items():
            assert torch.equal(value, t_layers[i].state_dict()[key]), (j, i, key)
        others = [k for k in range(6) if k != i]
        assert not any(torch.equal(s_layers[j].attn.qkv.weight, t_layers[k].attn.qkv.weight) for k in others)
    te, se = teacher.encoder.embeddings, student.encoder.embeddings
    assert torch.equal(se.word.weight, te.word.weight)
    # Token types are dropped; type 0 is folded into the positions, so single-segment inputs embed exactly alike.
    torch.testing.assert_close(se.position.weight, te.position.weight + te.token_type.weight[0])
    assert torch.equal(student.pre_classifier.weight, teacher.encoder.pooler.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_full_depth_distilbert_student_reproduces_the_teacher(data):
    _, tok = data
    teacher = litebert.BertModel(tiny_bert(tok)).eval()
    student, _ = build_student(teacher, {**default_recipe()["student"], "num_hidden_layers": 6},
                               litebert.DistilBertModel)
    ids = torch.randint(5, tok.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(ids, mask).last_hidden_state, teacher(ids, mask).last_hidden_state)


def test_albert_student_factorised_embeddings_and_shared_layer(data):
    _, tok = data
    torch.manual_seed(0)
    teacher = litebert.BertModel(tiny_bert(tok)).eval()
    emb = teacher.embeddings
    with torch.no_grad():  # embeddings of rank 7 < E - 1: the factorisation is then exact
        basis = torch.randn(7, 32)
        for table in (emb.word, emb.position, emb.token_type):
            table.weight.copy_(torch.randn(table.num_embeddings, 7) @ basis)
    section = {**default_recipe()["student"], "preset": "albert-base", "embedding_size": 8, "num_hidden_layers": 4}
    student, layer_map = build_student(teacher, section, litebert.AlbertModel)
    assert student.config.embedding_size == 8 and len(student.attn) == 1  # one shared layer
    assert layer_map == [0, 2, 3, 5]
    # The shared layer runs every pass; it comes from the teacher layer mapped to the middle pass (2 -> layer 3).
    assert torch.equal(student.attn[0].qkv.weight, teacher.layers[3].attn.qkv.weight)
    assert torch.equal(student.ffn[0].up.weight, teacher.layers[3].ffn.up.weight)
    ids = torch.randint(5, tok.vocab_size, (2, 12))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        ours = student.project(student.embeddings(ids, types))
        theirs = teacher.embeddings(ids, types)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# -- the frozen teacher -----------------------------------------------------------------------------------------
def test_teacher_gets_no_gradients_and_stays_in_eval_mode(data):
    _, tok = data
    teacher = EncoderForMaskedLM(tiny_bert(tok, hidden_dropout_prob=0.1))
    section = {**default_recipe()["student"], "num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64,
               "num_attention_heads": 4}  # another width: hidden losses go through the learned projection
    student, layer_map = build_student(teacher, section, EncoderForMaskedLM)
    loss = LossConfig(kl=1.0, hard=1.0, cos=1.0, hidden_mse=1.0, attn_mse=1.0)
    objective = DistillationObjective(teacher, loss, layer_map, "general")
    model = DistillationStudent(student, teacher.config.hidden_size).train()
    teacher.train()  # the objective puts it back in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = torch.randint(5, tok.vocab_size, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    out = objective(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    assert set(out) == {"loss", "kl", "hard", "cos", "hidden_mse", "attn_mse"}
    out["loss"].backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert model.hidden_proj is not None and model.hidden_proj.weight.grad is not None
    assert all(p.grad is not None for n, p in student.named_parameters() if "position" not in n)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert "teacher" not in dict(model.named_modules())  # the optimizer can never see it


def test_the_trained_module_is_the_student_for_checkpoints(data, tmp_path):
    """The loop saves the student and reloads the best one into the module it trains: same keys, same tensors."""
    from litebert.checkpoint import load_weights_into

    _, tok = data
    config = preset("distilbert-test", vocab_size=tok.vocab_size, id2label=LABELS)
    student = EncoderForSequenceClassification(config)
    model = DistillationStudent(student)
    assert model.state_dict().keys() == student.state_dict().keys()
    best = EncoderForSequenceClassification(config)
    best.save_pretrained(tmp_path / "best")
    load_weights_into(model, tmp_path / "best")
    assert all(torch.equal(v, best.state_dict()[k]) for k, v in student.state_dict().items())
    model.eval()
    assert not student.training and not student.encoder.training


# -- end to end -------------------------------------------------------------------------------------------------
def test_tiny_task_distillation_lowers_its_loss_and_caches_teacher_logits(data, teachers, tmp_path, caplog):
    root, _ = data
    out = tmp_path / "run"
    summary = run_distillation(task_recipe(root, teachers["classifier"], "--train.max_steps", "60",
                                           "--data.cache_dir", str(tmp_path / "cache")), out)
    assert summary["step"] == 60 and summary["layer_map"] == [0, 5]
    for key in ("loss", "kl"):
        curve = losses(out, key)
        assert sum(curve[-10:]) / 10 < 0.7 * sum(curve[:10]) / 10, (key, curve)
    assert set(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])) >= {"kl", "hard"}
    cached = list((tmp_path / "cache").glob("teacher-logits-*.npy"))
    assert len(cached) == 1
    student = litebert.from_pretrained(str(out / "final"))
    assert isinstance(student, EncoderForSequenceClassification) and student.config.model_type == "distilbert"
    assert student.config.num_hidden_layers == 2 and student.config.id2label == LABELS
    # A second run on the same teacher and data reads the logits instead of recomputing them.
    mtime = cached[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="litebert.training.distill"):
        run_distillation(task_recipe(root, teachers["classifier"], "--train.max_steps", "2",
                                     "--data.cache_dir", str(tmp_path / "cache")), tmp_path / "again")
    assert cached[0].stat().st_mtime_ns == mtime and "teacher logits: read" in caplog.text


def test_a_transfer_set_adds_teacher_labelled_sentences(data, teachers, tmp_path, caplog):
    root, _ = data
    rng = random.Random(1)
    with open(root / "unlabelled.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "source"])
        for i in range(30):
            a, b = sentence(rng, i % 2).capitalize(), sentence(rng, 1 - i % 2).capitalize()
            w.writerow([f"{a}.<br /><br />{b}. Too short.", "web"])
        w.writerow(["this row is filtered out by source", "other"])
    recipe = task_recipe(root, teachers["classifier"], "--train.max_steps", "4", "--task.transfer",
                         str(root / "unlabelled.csv"), "--task.transfer_filter", "{source: web}",
                         "--task.transfer_max", "50")
    examples = distill.load_transfer_set(recipe["task"])
    assert len(examples) == 50 and all(ex.label is None and "<br" not in ex.text for ex in examples)
    assert all(len(ex.text.split()) >= 4 for ex in examples)  # "Too short." is dropped
    with caplog.at_level(logging.INFO, logger="litebert.training.distill"):
        summary = run_distillation(recipe, tmp_path / "run")
    assert summary["step"] == 4 and "320 train (+ 50 unlabelled transfer)" in caplog.text
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run", "hard"))))
    # pkg: paths (a file inside an installed package) work here as in data.train.
    recipe["task"]["transfer"] = ["pkg:litebert/training/x.csv"]
    assert distill._resolve_paths(recipe)["task"]["transfer"][0].endswith("litebert/training/x.csv")
    # Hard labels alone cannot use it: the ablation recipe drops it.
    assert distill._ablation_recipe(recipe)["task"]["transfer"] == []


@pytest.mark.slow
def test_cli_task_distillation_with_hidden_losses_writes_the_report(data, teachers, tmp_path):
    root, _ = data
    out = tmp_path / "cli"
    cmd = [sys.executable, "-c", ("import sys; from litebert.training.distill import distill_main; "
           "sys.exit(distill_main(sys.argv[1:]))"), "--teacher", str(teachers["classifier"]), "--student",
           "distilbert-base", "--out", str(out), "--data.train", str(root / "reviews.csv"), "--data.max_seq_length",
           "32", "--student.num_hidden_layers", "2", "--train.max_steps", "6", "--train.batch_size", "16",
           "--loss.cos", "1", "--loss.hidden_mse", "1", "--loss.attn_mse", "0.5", "--report.batch_sizes", "[1,4]",
           "--report.seq_len", "16", "--report.repeats", "2", "--report.precision", "[fp32]", "--report.ablation", "true",
           "--train.num_threads", "1", *QUIET]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("run.yaml", "metrics.jsonl", "metrics.json", "final/config.json", "final/tokenizer.json",
                 "report.md", "report.json", "ablation-hard-labels/final/model.safetensors"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["teacher"]["parameters"]["total"] > report["models"]["student"]["parameters"]["total"]
    assert {(r["batch_size"], r["precision"]) for r in report["latency"]} == {(1, "fp32"), (4, "fp32")}
    assert set(report["scores"]) == {"teacher", "student"} and "student" in report["retention_pct"]
    assert list(report["ablation"]) == ["hard labels only (no distillation)"]
    pair = report["ablation_paired"]
    assert pair["examples"] == 40 and 0.0 <= pair["p_value"] <= 1.0 and "McNemar" in proc.stdout
    assert "# Compression report" in proc.stdout and "retention" in proc.stdout
    assert set(losses(out)[0:1]) and "hidden_mse" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_tiny_general_distillation_lowers_its_loss(data, teachers, tmp_path):
    root, _ = data
    out = tmp_path / "general"
    recipe = resolve(default_recipe(), None, [
        "--data.train", str(root / "corpus.txt"), "--data.max_seq_length", "32", "--data.eval_batches", "2",
        "--student.num_hidden_layers", "2", "--train.batch_size", "8", "--train.max_steps", "30",
        "--train.log_every", "1", "--train.eval_every", "1000", "--train.save_every", "1000", "--train.lr", "0.003",
        "--train.warmup_ratio", "0", "--loss.cos", "1", "--report.repeats", "1", "--report.batch_sizes", "[2]",
        "--report.seq_len", "16", "--report.precision", "[fp32]", "--data.cache_dir", str(tmp_path / "cache"),
        "--train.num_threads", "1", *QUIET])
    recipe["teacher"]["path"] = str(teachers["mlm"])
    summary = run_distillation(recipe, out)
    assert summary["step"] == 30
    curve = losses(out)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5, curve
    student = litebert.from_pretrained(str(out / "final"))
    assert isinstance(student, EncoderForMaskedLM) and student.config.model_type == "distilbert"
    assert "masked-LM accuracy" in (out / "report.md").read_text()


# -- bad input --------------------------------------------------------------------------------------------------
def test_different_vocabularies_are_refused_with_a_clear_message(data, teachers, tmp_path):
    root, tok = data
    recipe = task_recipe(root, teachers["classifier"], "--student.vocab_size", str(tok.vocab_size + 7))
    with pytest.raises(ConfigError, match=rf"vocabularies differ: the teacher has {tok.vocab_size} tokens, the "
                                          rf"student {tok.vocab_size + 7}\. .*--tokenizer\.path"):
        run_distillation(recipe, tmp_path / "bad")


def test_a_shared_tokenizer_aligns_a_larger_teacher_vocabulary(data, tmp_path):
    root, tok = data
    teacher = EncoderForMaskedLM(tiny_bert(tok, vocab_size=tok.vocab_size + 8))  # e.g. padded to a multiple of 8
    teacher_dir = teacher.save_pretrained(tmp_path / "teacher")  # ships no tokenizer
    recipe = resolve(default_recipe(), None, [
        "--data.train", str(root / "corpus.txt"), "--data.max_seq_length", "32", "--data.eval_batches", "1",
        "--student.num_hidden_layers", "1", "--train.batch_size", "8", "--train.max_steps", "2",
        "--train.lr", "0.000000001", "--report.enabled", "false", "--tokenizer.path", str(root / "tokenizer"), *QUIET])
    recipe["teacher"]["path"] = str(teacher_dir)
    run_distillation(recipe, tmp_path / "run")
    student = litebert.from_pretrained(str(tmp_path / "run" / "final"))
    assert student.config.vocab_size == tok.vocab_size
    torch.testing.assert_close(student.encoder.embeddings.word.weight,  # copied, then 2 steps at lr 1e-9
                               teacher.encoder.embeddings.word.weight[:tok.vocab_size], atol=1e-7, rtol=0)


def test_bad_teachers_and_layer_maps_are_refused(data, teachers, tmp_path):
    root, _ = data
    recipe = resolve(default_recipe(), None, ["--data.train", str(root / "corpus.txt"), *QUIET])
    recipe["teacher"]["path"] = str(teachers["bare"])
    with pytest.raises(ConfigError, match="has no masked-LM head.*--loss.kl 0"):
        run_distillation(recipe, tmp_path / "a")
    recipe = task_recipe(root, teachers["bare"], "--distill.mode", "task")
    with pytest.raises(ConfigError, match="not a fine-tuned sequence classifier"):
        run_distillation(recipe, tmp_path / "b")
    recipe = task_recipe(root, teachers["classifier"], "--student.layer_map", "[0,6]")
    with pytest.raises(ConfigError, match=r"student\.layer_map\[1\] = 6 is out of range"):
        run_distillation(recipe, tmp_path / "c")
    with pytest.raises(ConfigError, match="did you mean 'distilbert-base'"):
        distill.student_config(preset("bert-test"), {"preset": "distilbert-bse"})


def test_readme_general_distillation_command_runs_and_the_report_clamps_its_length(data, teachers, tmp_path):
    """The README's distill-general command as written (placeholders filled, a few flags to make it tiny); the
    recipe's report.seq_len (128) exceeds the tiny models' 64 positions, which used to crash after training."""
    import re
    import shlex

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = re.findall(r"^litebert distill .*$", readme.replace("\\\n", " "), re.MULTILINE)
    line = next(m for m in commands if "distill-general" in m)
    root, _ = data
    argv = shlex.split(line.replace("configs/", str(Path(__file__).parents[1] / "configs") + "/"))[2:]
    argv = [str(teachers["mlm"]) if a == "DIR" else str(root / "corpus.txt") if a == "corpus/*.txt"
            else str(tmp_path / "general") if a == "runs/general" else a for a in argv]
    from litebert.training.distill import distill_main

    tiny = ["--data.max_seq_length", "32", "--data.eval_batches", "1", "--student.num_hidden_layers", "2",
            "--train.batch_size", "4", "--train.grad_accum", "1", "--train.max_steps", "2", "--report.repeats", "1",
            "--report.batch_sizes", "[1]", "--report.bf16", "[false]", "--data.cache_dir", str(tmp_path / "cache"),
            "--train.num_threads", "1", *QUIET]
    assert distill_main([*argv, *tiny]) == 0
    report = json.loads((tmp_path / "general" / "report.json").read_text())
    assert {r["seq_len"] for r in report["latency"]} == {64}
