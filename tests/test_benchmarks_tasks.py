"""The quality benchmark's data (``benchmarks/tasks.py``) and its command-line plumbing.

The generated problems must be right (every solution step is true arithmetic and ends with the
answer), reproducible, and the splits disjoint; otherwise the accuracy table means nothing.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from tests.bench_helpers import benchmark_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import tasks as T  # noqa: E402

sys.path.remove(str(BENCH))


def _words(ids: list[int]) -> list[str]:
    return [T.VOCAB[i] for i in ids]


def _check_solution(solution: list[str], answer: int) -> int:
    """Parse ``a op b = r . ...`` and verify each step; return the number of steps."""
    assert solution[-1] == "<eos>"
    facts = " ".join(solution[:-1]).split(" . ")
    facts[-1] = facts[-1].removesuffix(" .")
    previous = None
    for fact in facts:
        a, op, b, eq, r = fact.split()
        assert eq == "="
        assert T.apply_op(op, int(a), int(b)) == int(r), fact
        if op == "/":
            assert int(a) % int(b) == 0, fact
        if previous is not None:
            assert int(a) == previous, f"step does not start from the previous result: {fact}"
        previous = int(r)
        assert 0 <= previous <= T.MAX_NUMBER
    assert previous == answer
    return len(facts)


@pytest.mark.parametrize("name, steps", [("multiarith", {2}), ("singleeq", {1}), ("gsm", {3})])
def test_reasoning_solutions_are_true_chains_ending_in_the_answer(name, steps):
    d = T.reasoning_task(name, 300, 50, 50, seed=0)
    seen = set()
    for split in ("train", "val", "test"):
        for prompt, solution, answer in d[split]:
            words = _words(prompt)
            assert words[0] == "<bos>" and words[-1] == "?"
            assert _check_solution(_words(solution), answer) in steps
            # every number in a solution's first step is read from the question (nothing to guess)
            first = _words(solution)[:3]
            assert first[0] in words and first[2] in words, (words, first)
            seen.add(tuple(prompt))
    assert len(seen) == 400, "splits must be disjoint and without repeats"


def test_reasoning_tasks_are_reproducible_and_seeded():
    a = T.reasoning_task("gsm", 20, 5, 5, seed=0)
    assert a == T.reasoning_task("gsm", 20, 5, 5, seed=0)
    assert a != T.reasoning_task("gsm", 20, 5, 5, seed=1)


def test_base_corpus_facts_are_true_and_it_asks_no_questions():
    corpus = T.base_corpus(300, seed=0)
    assert corpus == T.base_corpus(300, seed=0)
    for seq in corpus:
        words = _words(seq)
        assert words[0] == "<bos>" and words[-1] == "<eos>"
        assert "?" not in words
        text = " ".join(words[1:-1])
        for line in text.split(" . "):
            toks = line.removesuffix(" .").split()
            if "=" in toks:  # a fact: exactly "a op b = r" and true
                a, op, b, _, r = toks
                assert T.apply_op(op, int(a), int(b)) == int(r)


@pytest.mark.parametrize("name", sorted(T.CLASSIFICATION))
def test_classification_splits_are_disjoint_and_labelled(name):
    d = T.classification_task(name, 200, 50, 50, seed=0)
    texts = [t for s in ("train", "val", "test") for t, _ in d[s]]
    assert len(set(texts)) == len(texts)
    labels = {y for s in ("train", "val", "test") for _, y in d[s]}
    assert labels == set(range(len(d["classes"])))


def test_topic_held_out_words_only_in_val_and_test():
    d = T.classification_task("topic", 300, 100, 100, seed=0)
    train_words = {w for ws in T.TOPICS.values() for w in ws[:T.TRAIN_TOPIC_WORDS]}
    held_words = {w for ws in T.TOPICS.values() for w in ws[T.TRAIN_TOPIC_WORDS:]}
    for text, _ in d["train"]:
        assert set(text[:-1].split()) & train_words and not set(text[:-1].split()) & held_words
    for text, y in d["val"] + d["test"]:
        words = set(text[:-1].split())
        assert not words & train_words
        (word,) = words & held_words
        assert word in list(T.TOPICS.values())[y]


def test_count_label_is_the_number_of_fruits():
    d = T.classification_task("count", 100, 10, 10, seed=0)
    for text, y in d["train"]:
        items = text.removeprefix("i saw ").removesuffix(".").split(", ")
        assert sum(w in T.FRUITS for w in items) == y + 1


@pytest.fixture
def quality(monkeypatch):
    """benchmarks/quality.py imported in-process."""
    for mod in ("tqdm", "transformers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    yield from benchmark_module("quality", monkeypatch)


def test_quality_set_overrides_and_rejects_unknown_keys(quality):
    q = quality
    prof = q.apply_overrides(q.copy.deepcopy(q.PROFILES["quick"]),
                             ["llama.steps=7", "llama.seeds=4", "minilm.lr_grid.layerwise=[1e-4,3e-4]",
                              'minilm.tasks=["count"]'])
    assert prof["llama"]["steps"] == 7 and prof["llama"]["seeds"] == 4
    assert prof["minilm"]["lr_grid"]["layerwise"] == [1e-4, 3e-4] and prof["minilm"]["tasks"] == ["count"]
    with pytest.raises(SystemExit, match="unknown key 'llama.stepz'"):
        q.apply_overrides(q.copy.deepcopy(q.PROFILES["quick"]), ["llama.stepz=7"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        q.apply_overrides(q.copy.deepcopy(q.PROFILES["quick"]), ["llama.seeds"])


def test_quality_variants_on_the_command_line(quality):
    q = quality
    args = q.parse_args(["--variant", 'grass-t4={"temperature": 4}', "--methods", "grass", "grass-t4"])
    assert args.variants["grass-t4"] == {"sampler": "grass", "temperature": 4}
    with pytest.raises(SystemExit):
        q.parse_args(["--methods", "grass", "nonsense"])
    with pytest.raises(SystemExit):
        q.parse_args(["--variant", "grass-bad={temperature: 4}"])
    with pytest.raises(SystemExit):
        q.parse_args(["--variant", 'lisa={"temperature": 4}'])


def test_random_is_not_consumed_globally():
    state = random.getstate()
    T.reasoning_task("multiarith", 10, 2, 2)
    T.classification_task("negation", 10, 2, 2)
    T.base_corpus(5)
    assert random.getstate() == state
