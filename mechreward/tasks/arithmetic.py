"""Multi-step integer arithmetic: the built-in organism's task.

A question is a left-to-right chain of 2-4 integers (1-3 digits each) joined by `+` / `-`:

    prompt      "Q: 12+7-3=?\\nA:"
    completion  " 12+7=19. 19-3=16. #### 16"      (+ eos when the model writes it)

The worked solution folds the chain one operation at a time; the final answer follows the
last `####`. Which split a problem belongs to is decided by a hash of its canonical string
(`"12+7-3"`), so train and evaluation questions never overlap whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Question, Task

SPLITS = ("train", "eval")
EVAL_FRACTION = 0.125
"""Share of the problem space (by hash) reserved for evaluation."""
MIN_OPERANDS, MAX_OPERANDS = 2, 4
MAX_DIGITS = 3
ANSWER_MARKER = "####"

_ANSWER_RE = re.compile(r"-?\s*\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    """One arithmetic chain: operands and the operators between them."""

    operands: tuple[int, ...]
    """Non-negative integers, 1-3 digits each."""
    ops: tuple[str, ...]
    """`+` or `-`, one fewer than operands."""

    @property
    def canonical(self) -> str:
        """`"12+7-3"`: the string the split hash and question id are computed from."""
        out = str(self.operands[0])
        for op, x in zip(self.ops, self.operands[1:]):
            out += f"{op}{x}"
        return out

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for each fold, left to right."""
        acc, rows = self.operands[0], []
        for op, x in zip(self.ops, self.operands[1:]):
            new = acc + x if op == "+" else acc - x
            rows.append((acc, op, x, new))
            acc = new
        return rows

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def difficulty(self) -> int:
        """Number of operations plus total digits beyond one per operand (0 = easiest)."""
        return (len(self.ops) - 1) + sum(len(str(x)) - 1 for x in self.operands)


def split_of(canonical: str) -> str:
    """`eval` or `train`, from a hash of the canonical problem string (seed-independent)."""
    h = int.from_bytes(hashlib.sha256(canonical.encode("ascii")).digest()[:8], "big")
    return "eval" if (h % 1_000_000) < EVAL_FRACTION * 1_000_000 else "train"


def random_problem(rng: random.Random) -> Problem:
    """Operand count uniform in 2..4; each operand's digit count uniform in 1..3."""
    k = rng.randint(MIN_OPERANDS, MAX_OPERANDS)
    operands = []
    for _ in range(k):
        d = rng.randint(1, MAX_DIGITS)
        lo = 0 if d == 1 else 10 ** (d - 1)
        operands.append(rng.randint(lo, 10**d - 1))
    ops = tuple(rng.choice("+-") for _ in range(k - 1))
    return Problem(tuple(operands), ops)


def parse_problem(canonical: str) -> Problem:
    """Inverse of `Problem.canonical`."""
    m = re.fullmatch(r"\d+(?:[+-]\d+)+", canonical)
    if not m:
        raise ConfigError(f"not an arithmetic chain: {canonical!r}")
    nums = [int(x) for x in re.findall(r"\d+", canonical)]
    ops = tuple(re.findall(r"[+-]", canonical))
    return Problem(tuple(nums), ops)


def prompt_text(problem: Problem) -> str:
    return f"Q: {problem.canonical}=?\nA:"


def solution_text(problem: Problem) -> str:
    """The worked solution (completion without eos): `" 12+7=19. 19-3=16. #### 16"`."""
    parts = [f"{a}{op}{b}={r}." for a, op, b, r in problem.steps()]
    return " " + " ".join(parts) + f" {ANSWER_MARKER} {problem.answer}"


def worked_solution(question: Question) -> str:
    """The full worked-solution completion for a question of this task (no eos)."""
    return solution_text(parse_problem(question.id.split(":", 1)[1]))


def split_stream(task: str, split: str, seed: int, draw, split_of_canonical, splits=SPLITS):
    """Endless stream of `draw(rng)` problems whose `split_of_canonical(p.canonical)` is `split` (duplicates
    possible; callers dedupe); the generator is seeded by task name, split and seed."""
    if split not in splits:
        raise ConfigError(f"unknown {task} split {split!r}; expected one of {splits}")
    rng = random.Random(f"{task}:{split}:{seed}")
    while True:
        p = draw(rng)
        if split_of_canonical(p.canonical) == split:
            yield p


def first_distinct(problems, n: int) -> list:
    """The first `n` problems of an endless stream with distinct `canonical` forms, in stream order."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.canonical not in seen:
            seen.add(p.canonical)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the stream is endless")


def iter_problems(split: str, seed: int):
    """Endless stream of problems of one split (duplicates possible; callers dedupe)."""
    return split_stream("arithmetic", split, seed, random_problem, split_of)


def make_questions(split: str, n: int, seed: int) -> list[Question]:
    """`n` distinct questions of `split`, reproducible for (split, n, seed)."""
    if n < 1:
        raise ConfigError(f"number of arithmetic questions must be >= 1, got {n}")
    return [Question(id=f"arith:{p.canonical}", prompt=prompt_text(p), answer=str(p.answer),
                     meta={"n_operands": len(p.operands), "max_digits": max(len(str(x)) for x in p.operands),
                           "difficulty": p.difficulty, "split": split})
            for p in first_distinct(iter_problems(split, seed), n)]


def organism_corpus(n_docs: int = 2000, seed: int = 0, eos: str = "") -> list[str]:
    """The organism's own text: train-split prompt + worked solution (+ `eos` if given).

    The default SAE-training corpus for the organism: the distribution it was trained on.
    """
    if n_docs < 1:
        raise ConfigError(f"n_docs must be >= 1, got {n_docs}")
    gen = iter_problems("train", seed)
    return [prompt_text(p) + solution_text(p) + eos for p, _ in zip(gen, range(n_docs))]


class ArithmeticTask(Task):
    """Held-out (`eval`) or training (`train`) arithmetic questions; answers are integers."""

    name = "arithmetic"

    def __init__(self, split: str = "eval", n: int = 200, seed: int = 0):
        self.split = split
        self.seed = seed
        super().__init__(make_questions(split, n, seed))

    def extract(self, completion: str) -> str | None:
        """The integer after the last `####` (spaces, a minus sign and commas allowed)."""
        i = completion.rfind(ANSWER_MARKER)
        if i < 0:
            return None
        m = _ANSWER_RE.match(completion[i + len(ANSWER_MARKER):].lstrip())
        if not m:
            return None
        return str(int(re.sub(r"[\s,]", "", m.group(0))))

    def equivalent(self, predicted: str, reference: str) -> bool:
        return int(predicted.replace(",", "").strip()) == int(reference.replace(",", "").strip())

    @staticmethod
    def worked_solution(question: Question) -> str:
        return worked_solution(question)
