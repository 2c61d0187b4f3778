"""Look-up in context for small chat models: facts generated here, one of them asked back.

A generated task (`task.name=lookup`): each question states `k` made-up facts and asks for one,

    The red box has number 47. The blue box has number 18. What number does the blue box have?

`task.subset` is `k` (facts per question): `2` (default), `3` or `4`. The objects, colours and
two-digit numbers are drawn from a seeded generator, so the facts exist nowhere but in the
prompt: no model was tuned on them, and the answer can only come from reading the context
(held out by construction). A wrong answer is almost always a distractor's number, which makes
correct and wrong responses look alike on the surface (same length, same form).

Which split a question belongs to is decided by a hash of its whole text (half of all questions
are `eval`), so train and eval never share a question; questions are drawn by `task.seed`.
Graded on the number the reply states (`task.answer_extraction`, default `[marked, last_number]`).
"""

from __future__ import annotations

import hashlib
import random

from ..errors import ConfigError
from .addition import DEFAULT_EXTRACTION, DEFAULT_N, SPLITS, hash_split
from .base import Question
from .math import MathTask

OBJECTS = ("box", "door", "bag", "car", "key", "card", "room", "ticket")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey")
DEFAULT_PROMPT = "{question}"
"""`{question}` is replaced by the facts and the question."""
SUBSETS = ("2", "3", "4")
DEFAULT_SUBSET = "2"


def _draw(rng: random.Random, k: int) -> tuple[str, str, dict]:
    obj = rng.choice(OBJECTS)
    colours = rng.sample(COLOURS, k)
    numbers = rng.sample(range(10, 100), k)
    asked = rng.randrange(k)
    facts = " ".join(f"The {c} {obj} has number {v}." for c, v in zip(colours, numbers))
    text = f"{facts} What number does the {colours[asked]} {obj} have?"
    meta = {"object": obj, "colours": colours, "numbers": numbers, "asked": asked}
    return text, str(numbers[asked]), meta


def lookup_task(split: str = "eval", n: int | None = None, seed: int = 0, subset: str | None = None,
                prompt_template: str | None = None, extraction: list[str] | None = None) -> MathTask:
    subset = DEFAULT_SUBSET if subset is None else str(subset)
    if subset not in SUBSETS:
        raise ConfigError(f"task.subset={subset!r} for the lookup task (facts per question); expected one of "
                          f"{list(SUBSETS)}")
    if split not in SPLITS:
        raise ConfigError(f"task.split={split!r} for the lookup task; expected one of {SPLITS}")
    n = DEFAULT_N if n is None else n
    if n < 1:
        raise ConfigError(f"task.n={n} for the lookup task; expected at least 1")
    rng = random.Random(f"lookup-{subset}-{split}-{seed}")
    template = prompt_template or DEFAULT_PROMPT
    seen: set[str] = set()
    qs: list[Question] = []
    while len(qs) < n:
        text, answer, meta = _draw(rng, int(subset))
        if hash_split(text) != split or text in seen:
            continue
        seen.add(text)
        qid = hashlib.sha256(text.encode()).hexdigest()[:12]
        qs.append(Question(id=qid, prompt=MathTask.format_prompt(text, template), answer=answer, meta=meta))
    task = MathTask(qs, extraction=extraction if extraction else DEFAULT_EXTRACTION)
    task.name = "lookup"
    return task
