"""Offline, deterministic task generators for ``benchmarks/quality.py``.

Two families, nothing downloaded:

* **Sentence classification** for the pretrained MiniLM-L6 encoder (:func:`classification_task`).
  The three tasks are meant to lean on different depths of the encoder:

  - ``topic``: which of 6 topics a sentence is about; one topic word among neutral filler words.
    Lexical, but val/test sentences use only topic words that never occur in training (4 of 12 per
    topic): it measures whether fine-tuning keeps and uses the pretrained lexical knowledge
    ("hurricane" is weather) rather than memorising the training words.
  - ``negation``: polarity (2 classes) of a review clause with negations ("not bad", "anything but
    great") that may sit under a second, outer negation ("i would not say the soup was bad").
    Scope of negation over the sentence: upper-layer work.
  - ``count``: how many fruit words (1-4) a list of 6-9 nouns holds, the rest being animals and
    tools. Counting/aggregation across the sentence; the list length varies so the share of fruit
    tokens alone does not give the count.

* **Arithmetic word problems** for a small Llama-architecture causal LM, with a word-level
  vocabulary in which every number 0..``MAX_NUMBER`` is one token, so the answer is one token and
  accuracy is the exact match of the greedy answer token (:func:`reasoning_task`). The model is
  first pretrained on :func:`base_corpus` (single-step arithmetic facts and single-step stories,
  no questions), then fine-tuned on one of three question formats in the spirit of:

  - ``multiarith``: two operations on one quantity ("has a, buys b, gives away c: how many?").
  - ``singleeq``: one unknown to solve for ("had some, bought b, now has c: how many at first?";
    also the multiplicative form "some boxes of b make c: how many boxes?").
  - ``gsm``: three steps with a multiplication ("boxes of a, buys b boxes, gives away c, finds d").

Every generator takes an explicit seed and uses its own ``random.Random``: same seed, same data.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Example = tuple[str, int]

# ----------------------------------------------------------------------------- classification
TOPICS = {  # the first 8 words of each topic are the training words; val/test use only the last 4
    "sports": ["football", "tennis", "soccer", "golf", "hockey", "basketball", "baseball", "cricket",
               "rugby", "boxing", "athlete", "stadium"],
    "food": ["pizza", "bread", "soup", "cheese", "pasta", "salad", "rice", "cake", "sandwich", "butter",
             "chicken", "noodles"],
    "weather": ["rain", "snow", "storm", "wind", "sunshine", "fog", "thunder", "frost", "hail", "drizzle",
                "hurricane", "blizzard"],
    "music": ["guitar", "piano", "violin", "drums", "song", "concert", "singer", "orchestra", "melody",
              "album", "choir", "trumpet"],
    "money": ["bank", "loan", "tax", "price", "budget", "salary", "debt", "profit", "mortgage", "investment",
              "wages", "cash"],
    "health": ["doctor", "hospital", "fever", "medicine", "nurse", "surgery", "injury", "vaccine", "clinic",
               "patient", "illness", "therapy"],
}
TRAIN_TOPIC_WORDS = 8
FILLER = ["the", "a", "some", "people", "talked", "about", "today", "yesterday", "again", "there", "was",
          "much", "news", "on", "in", "town", "this", "week", "everyone", "said", "that", "it", "really",
          "mattered", "and", "then", "we", "heard", "more", "later", "of", "their"]

FOOD = ["food", "pasta", "soup", "steak", "pizza", "dessert", "curry", "bread"]
SERVICE = ["service", "waiter", "staff", "waitress", "host", "manager", "bartender", "cashier"]
POSITIVE = ["good", "great", "excellent", "lovely", "superb", "wonderful", "fantastic", "decent"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "mediocre", "disappointing", "horrible"]
FLIP = ["not", "hardly", "far from", "anything but", "never"]
KEEP = ["", "really", "truly", "very", "quite"]

FRUITS = ["apple", "pear", "banana", "plum", "lemon", "cherry", "grape", "peach", "orange", "mango"]
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "mouse", "rabbit", "lion", "tiger"]
TOOLS = ["hammer", "saw", "drill", "knife", "rope", "shovel", "ladder", "wrench", "nail", "axe"]


def _topic(rng: random.Random, train: bool) -> Example:
    label = rng.randrange(len(TOPICS))
    words = list(TOPICS.values())[label]
    word = rng.choice(words[:TRAIN_TOPIC_WORDS] if train else words[TRAIN_TOPIC_WORDS:])
    words = [rng.choice(FILLER) for _ in range(rng.randint(5, 9))]
    words.insert(rng.randrange(len(words) + 1), word)
    return " ".join(words) + ".", label


def _clause(rng: random.Random, nouns: list[str], positive: bool) -> str:
    negate = rng.random() < 0.5
    adjective = rng.choice(NEGATIVE if positive == negate else POSITIVE)
    modifier = rng.choice(FLIP if negate else KEEP)
    words = ["the", rng.choice(nouns), rng.choice(["was", "is", "seemed"]), modifier, adjective]
    return " ".join(w for w in words if w)


OUTER_KEEP = ["", "honestly,", "i think", "i would say", "to be fair,", "everyone agreed"]
OUTER_FLIP = ["i would not say", "nobody thought", "it is not true that", "i do not think", "no one said"]


def _negation(rng: random.Random, train: bool) -> Example:
    positive = rng.random() < 0.5
    outer = rng.random() < 0.4
    inner = _clause(rng, rng.choice([FOOD, SERVICE]), positive != outer)
    prefix = rng.choice(OUTER_FLIP if outer else OUTER_KEEP)
    return (f"{prefix} {inner}".strip()) + ".", 0 if positive else 1


def _count(rng: random.Random, train: bool) -> Example:
    n_fruit = rng.randint(1, 4)
    length = rng.randint(6, 9)
    words = [rng.choice(FRUITS) for _ in range(n_fruit)]
    words += [rng.choice(ANIMALS + TOOLS) for _ in range(length - n_fruit)]
    rng.shuffle(words)
    return "i saw " + ", ".join(words) + ".", n_fruit - 1


CLASSIFICATION: dict[str, tuple[Callable[[random.Random, bool], Example], list[str]]] = {
    "topic": (_topic, list(TOPICS)),
    "negation": (_negation, ["positive", "negative"]),
    "count": (_count, ["1 fruit", "2 fruits", "3 fruits", "4 fruits"]),
}


def _distinct(gen: Callable[[random.Random, bool], Example], rng: random.Random, n: int, train: bool,
              seen: set[str]) -> list[Example]:
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        text, label = gen(rng, train)
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could not draw {n} distinct examples")
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def classification_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict:
    """``{"train", "val", "test": [(text, label)], "classes": [...]}``, the splits disjoint."""
    gen, classes = CLASSIFICATION[name]
    rng, seen = random.Random(f"{name}-{seed}"), set()
    train = _distinct(gen, rng, n_train, True, seen)
    held = _distinct(gen, rng, n_val + n_test, False, seen)
    return {"train": train, "val": held[:n_val], "test": held[n_val:], "classes": classes}


# ----------------------------------------------------------------------------- arithmetic LM
MAX_NUMBER = 60
NAMES = ["tom", "ann", "sam", "mia", "joe", "eva", "max", "lily"]
PRONOUN = {"tom": "he", "sam": "he", "joe": "he", "max": "he", "ann": "she", "mia": "she", "eva": "she",
           "lily": "she"}
OBJECTS = ["apples", "pens", "coins", "books", "cards", "eggs", "stamps", "marbles"]
CONTAINERS = ["box", "bag", "pack", "jar"]
WORDS = (["<pad>", "<bos>", "<eos>", "+", "-", "*", "/", "=", ".", "?", "has", "had", "have", "buys", "bought",
          "finds", "gets", "more", "gives", "away", "loses", "now", "then", "and", "how", "many", "does",
          "did", "at", "first", "some", "each", "holds", "hold", "of", "make", "in", "all", "left", "he", "she",
          "boxes", "bags", "packs", "jars", "a"]
         + NAMES + OBJECTS + CONTAINERS)
VOCAB = WORDS + [str(i) for i in range(MAX_NUMBER + 1)]
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<eos>"]
PLURAL = {"box": "boxes", "bag": "bags", "pack": "packs", "jar": "jars"}
BASE_CORPUS_VERSION = "v3"  # part of the cached base model's key: bump when base_corpus changes


def encode(text: str) -> list[int]:
    return [TOKEN[w] for w in text.split()]


def _ok(*numbers: int) -> bool:
    return all(0 <= n <= MAX_NUMBER for n in numbers)


def _fact(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b} = {apply_op(op, a, b)} ."


def apply_op(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _base_item(rng: random.Random) -> str:
    """One pretraining line: an arithmetic fact, or a single-step story stated (not asked)."""
    while True:
        kind = rng.randrange(9)
        a, b = rng.randint(0, MAX_NUMBER), rng.randint(1, 12)
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        pro = PRONOUN[name]
        if kind in (0, 1) and _ok(a + b):
            return _fact("+", a, b)
        if kind == 2 and _ok(a - b):
            return _fact("-", a, b)
        if kind == 3:
            a, b = rng.randint(0, 12), rng.randint(1, 12)
            if _ok(a * b):
                return _fact("*", a, b) if rng.random() < 0.7 else _fact("/", a * b, b)
        if kind == 4 and _ok(a + b):
            verb = rng.choice(["buys", "finds", "gets"])
            return f"{name} has {a} {obj} . {pro} {verb} {b} more . now {name} has {a + b} {obj} ."
        if kind == 5 and _ok(a - b):
            verb = rng.choice(["gives away", "loses"])
            return f"{name} has {a} {obj} . {pro} {verb} {b} . now {name} has {a - b} {obj} ."
        if kind == 6:
            a, b = rng.randint(1, 10), rng.randint(2, 6)
            cont = rng.choice(CONTAINERS)
            return f"each {cont} holds {b} {obj} . {a} {PLURAL[cont]} hold {a * b} {obj} ."
        if kind in (7, 8):  # a bare chain of facts, each starting from the previous result
            steps = [("*", rng.randint(1, 10), rng.randint(2, 6))] if kind == 8 else []
            r = apply_op(*steps[0]) if steps else rng.randint(2, 40)
            while len(steps) < 3 and (len(steps) < 2 or rng.random() < 0.5):
                op, b = rng.choice("+-"), rng.randint(1, 12)
                if _ok(apply_op(op, r, b)):
                    steps.append((op, r, b))
                    r = apply_op(op, r, b)
            return solution_text(steps)


def base_corpus(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` tokenised pretraining sequences (``<bos> ... <eos>``), each two to four lines.

    Single-step arithmetic facts (``a + b = c .``, ``-``, ``*``, ``/``), bare chains of two or three
    facts each starting from the previous result (``5 * 4 = 20 . 20 - 3 = 17 .``) and single-step
    stories stated with their result: the arithmetic a solution of the fine-tuning tasks is made of,
    but never a question, nor a story with more than one step. What fine-tuning has to teach is
    reading a word problem: which numbers, in which order, with which operations.
    """
    rng = random.Random(f"base-{seed}")
    out = []
    for _ in range(n):
        lines = [_base_item(rng) for _ in range(rng.randint(2, 4))]
        out.append([BOS] + encode(" ".join(lines)) + [EOS])
    return out


# A problem: (question text ending with "?", solution steps [(op, a, b)], answer). The solution the
# model must write after "?" is the chain of single-step facts "a op b = r ." ending with the answer.
Problem = tuple[str, list[tuple[str, int, int]], int]


def _multiarith(rng: random.Random) -> Problem:
    while True:
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        pro = PRONOUN[name]
        a, b, c = rng.randint(2, 40), rng.randint(1, 12), rng.randint(1, 12)
        start = f"{name} has {a} {obj} . {pro}"
        form = rng.randrange(3)
        if form == 0:
            steps, text = [("+", a, b), ("-", a + b, c)], f"{start} buys {b} more and then gives away {c} ."
        elif form == 1:
            steps, text = [("-", a, b), ("+", a - b, c)], f"{start} loses {b} and then finds {c} more ."
        else:
            steps, text = [("+", a, b), ("+", a + b, c)], f"{start} gets {b} more and then buys {c} more ."
        ans = apply_op(steps[1][0], *steps[1][1:])
        if _ok(ans, a + b, a - b):
            return f"{text} how many {obj} does {name} have now ?", steps, ans


def _singleeq(rng: random.Random) -> Problem:
    """One unknown to solve for: the solution inverts the story's operation."""
    while True:
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        pro = PRONOUN[name]
        form = rng.randrange(3)
        if form == 0:
            x, b = rng.randint(0, 40), rng.randint(1, 12)
            steps = [("-", x + b, b)]
            text = f"{name} had some {obj} . {pro} bought {b} more . now {pro} has {x + b} {obj} ."
        elif form == 1:
            x, b = rng.randint(1, 50), rng.randint(1, 12)
            steps = [("+", x - b, b)]
            text = f"{name} had some {obj} . {pro} loses {b} . now {pro} has {x - b} {obj} ."
        else:
            x, b = rng.randint(1, 10), rng.randint(2, 6)
            cont = rng.choice(CONTAINERS)
            if _ok(x * b):
                return (f"each {cont} holds {b} {obj} . {name} has {x * b} {obj} in all . "
                        f"how many {PLURAL[cont]} does {name} have ?"), [("/", x * b, b)], x
            continue
        if _ok(x + b, x - b, x):
            return f"{text} how many {obj} did {name} have at first ?", steps, x


def _gsm(rng: random.Random) -> Problem:
    """Three steps with a multiplication."""
    while True:
        name, obj, cont = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
        pro = PRONOUN[name]
        a, b, c, d = rng.randint(2, 8), rng.randint(2, 6), rng.randint(1, 10), rng.randint(1, 10)
        ans = a * b - c + d
        if _ok(a * b, a * b - c, ans):
            return (f"each {cont} holds {a} {obj} . {name} buys {b} {PLURAL[cont]} and gives away {c} {obj} . "
                    f"then {pro} finds {d} more . how many {obj} does {name} have now ?",
                    [("*", a, b), ("-", a * b, c), ("+", a * b - c, d)], ans)


REASONING: dict[str, Callable[[random.Random], Problem]] = {
    "multiarith": _multiarith,
    "singleeq": _singleeq,
    "gsm": _gsm,
}


def solution_text(steps: list[tuple[str, int, int]]) -> str:
    return " ".join(_fact(op, a, b) for op, a, b in steps)


def reasoning_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict:
    """``{"train", "val", "test": [(prompt ids, solution ids, answer)]}``, the splits disjoint.

    The prompt is ``<bos>`` + the question ending with ``?``; the solution is the chain of single-step
    facts the model must write after it, then ``<eos>`` (e.g. ``5 + 3 = 8 . 8 - 2 = 6 . <eos>``).
    """
    gen = REASONING[name]
    rng = random.Random(f"{name}-{seed}")
    seen: set[str] = set()
    data: list[tuple[list[int], list[int], int]] = []
    n = n_train + n_val + n_test
    while len(data) < n:
        text, steps, ans = gen(rng)
        if text in seen:
            continue
        seen.add(text)
        data.append(([BOS] + encode(text), encode(solution_text(steps)) + [EOS], ans))
    return {"train": data[:n_train], "val": data[n_train:n_train + n_val], "test": data[n_train + n_val:]}
