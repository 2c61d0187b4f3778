"""Addition for small chat models: "What is 47 + 8?", graded on the answer the reply states.

A generated task (`task.name=addition`) for a real chat model at the size of SmolLM2-135M-Instruct,
which with its chat template answers in prose ("47 + 8 = 55.") rather than with `####` or
`\\boxed{}`: answers are read with `task.answer_extraction` (default `[marked, last_number]`:
a marked answer when there is one, else the last number of the reply).

`task.subset` picks the operands: `2d+1d` (default; a two-digit and a one-digit number, 810
pairs), `1d` (both one digit, 81 pairs) or `2d` (both two digits, 8100 pairs). Which split a
pair belongs to is decided by a hash of `"a+b"` (half of each space is `eval`), so train and
eval questions never overlap; within a split, questions are drawn without repetition by
`task.seed`. The questions are made here from random numbers, so no model was tuned on these
exact items (held out by construction); sums are still what small models have seen in general.
"""

from __future__ import annotations

import hashlib
import random

from ..errors import ConfigError
from .base import Question
from .math import MathTask

DEFAULT_PROMPT = "What is {question}?"
"""`{question}` is replaced by `a + b`."""
SUBSETS = {"1d": ((1, 9), (1, 9)), "2d+1d": ((10, 99), (1, 9)), "2d": ((10, 99), (10, 99))}
DEFAULT_SUBSET = "2d+1d"
DEFAULT_EXTRACTION = ["marked", "last_number"]
DEFAULT_N = 400
SPLITS = ("train", "eval")


def hash_split(key: str) -> str:
    """`eval` or `train` by a hash of `key` (half of all keys each): the split of a generated question."""
    return "eval" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 2 else "train"


def split_of(a: int, b: int) -> str:
    return hash_split(f"{a}+{b}")


def addition_task(split: str = "eval", n: int | None = None, seed: int = 0, subset: str | None = None,
                  prompt_template: str | None = None, extraction: list[str] | None = None) -> MathTask:
    subset = subset or DEFAULT_SUBSET
    if subset not in SUBSETS:
        raise ConfigError(f"task.subset={subset!r} for the addition task; expected one of {sorted(SUBSETS)}")
    if split not in SPLITS:
        raise ConfigError(f"task.split={split!r} for the addition task; expected one of {SPLITS}")
    (a0, a1), (b0, b1) = SUBSETS[subset]
    pairs = [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1) if split_of(a, b) == split]
    random.Random(f"addition-{subset}-{split}-{seed}").shuffle(pairs)
    n = DEFAULT_N if n is None else n
    if n > len(pairs):
        raise ConfigError(f"task.n={n}: the addition task's {subset} {split} split has only {len(pairs)} questions")
    template = prompt_template or DEFAULT_PROMPT
    qs = [Question(id=f"{a}+{b}", prompt=MathTask.format_prompt(f"{a} + {b}", template), answer=str(a + b),
                   meta={"a": a, "b": b}) for a, b in pairs[:n]]
    task = MathTask(qs, extraction=extraction if extraction else DEFAULT_EXTRACTION)
    task.name = "addition"
    return task
