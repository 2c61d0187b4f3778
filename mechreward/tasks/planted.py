"""Three-step two-digit arithmetic with a planted latent solving mode: the positive control's task.

A question is a chain of four two-digit numbers joined by `+` / `-`, in the built-in
organism's format:

    prompt      "Q: 27+49-44+29=?\\nA:"
    completion  " 27+49=76. 76-44=32. 32+29=61. #### 61"   (mode `right`)
                " 27+49=67. 67-44=32. 32+29=16. #### 16"   (mode `swap`: each result's digits swapped)

The planted organism (`model=organism_planted`) was trained on worked solutions whose rule is
chosen per sample: `right` (the right sum or difference) with probability `RIGHT_SHARE`, else
`swap` (the right sum or difference of the operands as written, its two digits written in reverse
order; the chain carries that wrong value forward). Nothing in the text marks the mode: problems are
drawn so that every intermediate and final result of both pure modes, and every right result before
its digits are swapped, is a two-digit number without a trailing zero, so both modes have the same
format and length. The swap rule is right exactly on the steps whose result is a palindrome (44);
problems with fewer than two other steps are kept at a small share (`KEEP`), so most questions need
the mode at every step, and problems whose swap-mode answer equals the right one by chance are not
drawn.

`mode_of(completion, problem)` recovers the ground-truth mode of any completion from its text:
each written step `a op b = r` is checked against both rules applied to the operands as written
(a swap-mode chain carries its own wrong intermediate forward), and the completion is `right` or
`swap` when all steps that tell the rules apart followed that rule, `undetermined` when no step
tells them apart (both rules give the same digits), `mixed` when steps followed different
rules, `other` when a step follows neither rule or the text is not a worked solution. The
rollouts record it per completion (`mode`).

Which split a problem belongs to is decided by a hash of its canonical string, as for
`mechreward.tasks.arithmetic`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .arithmetic import ArithmeticTask, Problem, split_of
from .base import Question

SPLITS = ("train", "eval")
MODES = ("right", "swap")
"""The two planted solving modes: `right` is the right rule, `swap` the wrong one."""
MODE_LABELS = (*MODES, "undetermined", "mixed", "other")
"""Every value `mode_of` returns."""
RIGHT_SHARE = 0.5
"""Share of training solutions written in the `right` mode."""
KEEP = {0: 0.015, 1: 0.1, 2: 1.0, 3: 1.0}
"""Share of the problems the generator keeps, by the number of steps whose right result is not a
palindrome (the steps that tell the rules apart): most problems need the mode at every step, so that a
mode, once chosen, must be kept up from step to step, and a few need it nowhere."""
N_OPERANDS = 4
LO, HI = 10, 99

_STEP_RE = re.compile(r"\s*(\d+)([+-])(\d+)=(-?\d+)\.")
_FINAL_RE = re.compile(r"\s*####\s*(-?\d+)\s*$")


def right_rule(a: int, op: str, b: int) -> int:
    """The right rule."""
    return a + b if op == "+" else a - b


def swap_rule(a: int, op: str, b: int) -> int:
    """The right result with its digits written in reverse order (sign kept)."""
    c = right_rule(a, op, b)
    return (1 if c >= 0 else -1) * int(str(abs(c))[::-1])


RULES = {"right": right_rule, "swap": swap_rule}


@dataclass(frozen=True)
class PlantedProblem:
    """Four two-digit operands and the three operators between them."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    canonical = Problem.canonical  # "47+38-19+26": the split hash and question id are computed from it

    def steps(self, mode: str = "right") -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) of each fold when every step follows `mode`."""
        rule = RULES[mode]
        acc, rows = self.operands[0], []
        for op, x in zip(self.ops, self.operands[1:]):
            new = rule(acc, op, x)
            rows.append((acc, op, x, new))
            acc = new
        return rows

    def answer(self, mode: str = "right") -> int:
        return self.steps(mode)[-1][3]

    @property
    def determined_steps(self) -> int:
        """Steps (of the right chain) where the two rules give different results."""
        return sum(right_rule(a, op, b) != swap_rule(a, op, b) for a, op, b, _ in self.steps("right"))


def valid(p: PlantedProblem) -> bool:
    """Every result of both pure modes, and every right result before its digits are swapped, is a
    two-digit number without a trailing zero (same format and length in both modes)."""
    for mode in MODES:
        for a, op, b, r in p.steps(mode):
            c = right_rule(a, op, b)
            if not (LO <= r <= HI and LO <= c <= HI and c % 10):
                return False
    return True


def random_problem(rng: random.Random) -> PlantedProblem:
    """A valid problem, kept with probability `KEEP[steps that tell the rules apart]`; those with such a
    step are kept only when the swap rule's final answer is wrong."""
    while True:
        # the right chain stays two-digit by construction: each operand is drawn from the range that
        # keeps it so (for `-` only when the running value leaves room)
        operands, ops = [rng.randint(LO, HI)], []
        for _ in range(N_OPERANDS - 1):
            acc = right_rule(operands[0], ops[0], operands[1]) if ops else operands[0]
            for op, x in zip(ops[1:], operands[2:]):
                acc = right_rule(acc, op, x)
            op = rng.choice("+-") if acc - LO >= LO and HI - acc >= LO else ("+" if HI - acc >= LO else "-")
            operands.append(rng.randint(LO, HI - acc) if op == "+" else rng.randint(LO, acc - LO))
            ops.append(op)
        operands, ops = tuple(operands), tuple(ops)
        p = PlantedProblem(operands, ops)
        if not valid(p):
            continue
        if p.determined_steps and p.answer("right") == p.answer("swap"):
            continue  # the swap chain lands on the right answer by chance
        if rng.random() < KEEP[p.determined_steps]:
            return p


def parse_problem(canonical: str) -> PlantedProblem:
    m = re.fullmatch(r"\d+(?:[+-]\d+)+", canonical)
    if not m:
        raise ConfigError(f"not a planted-task chain: {canonical!r}")
    nums = tuple(int(x) for x in re.findall(r"\d+", canonical))
    return PlantedProblem(nums, tuple(re.findall(r"[+-]", canonical)))


def prompt_text(p: PlantedProblem) -> str:
    return f"Q: {p.canonical}=?\nA:"


def solution_text(p: PlantedProblem, mode: str = "right") -> str:
    """The worked solution in `mode` (completion without eos)."""
    if mode not in MODES:
        raise ConfigError(f"unknown planted mode {mode!r}; expected one of {MODES}")
    parts = [f"{a}{op}{b}={r}." for a, op, b, r in p.steps(mode)]
    return " " + " ".join(parts) + f" #### {p.answer(mode)}"


def iter_problems(split: str, seed: int):
    """Endless stream of problems of one split (duplicates possible)."""
    from .arithmetic import split_stream

    return split_stream("planted", split, seed, random_problem, split_of, SPLITS)


def iter_training_texts(split: str, seed: int, right_share: float = RIGHT_SHARE):
    """Endless (problem, mode) pairs of the planted organism's training text: the mode drawn per sample."""
    if not 0.0 <= right_share <= 1.0:
        raise ConfigError(f"right_share must be in [0, 1], got {right_share}")
    rng = random.Random(f"planted-mode:{split}:{seed}")
    for p in iter_problems(split, seed):
        yield p, ("right" if rng.random() < right_share else "swap")


def planted_corpus_texts(split: str, seed: int):
    """Endless prompt + worked solution strings (mode drawn per sample), as the organism was trained."""
    for p, mode in iter_training_texts(split, seed):
        yield prompt_text(p) + solution_text(p, mode)


def mode_of(completion: str, problem: PlantedProblem) -> str:
    """The ground-truth mode of a completion (module docstring): right, swap, undetermined, mixed or other."""
    text = completion
    i = text.find("####")
    if i < 0:
        return "other"
    body, tail = text[:i], text[i:]
    steps = []
    pos = 0
    while True:
        m = _STEP_RE.match(body, pos)
        if not m:
            break
        steps.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
        pos = m.end()
    if body[pos:].strip() or len(steps) != len(problem.ops) or not _FINAL_RE.match(tail):
        return "other"
    followed = set()
    acc = problem.operands[0]
    for (a, op, b, r), want_op, want_b in zip(steps, problem.ops, problem.operands[1:]):
        if a != acc or op != want_op or b != want_b:
            return "other"
        c, d = right_rule(a, op, b), swap_rule(a, op, b)
        if r == c == d:
            pass
        elif r == c:
            followed.add("right")
        elif r == d:
            followed.add("swap")
        else:
            return "other"
        acc = r
    if int(_FINAL_RE.match(tail).group(1)) != acc:
        return "other"
    if not followed:
        return "undetermined"
    return followed.pop() if len(followed) == 1 else "mixed"


def make_questions(split: str, n: int, seed: int) -> list[Question]:
    if n < 1:
        raise ConfigError(f"number of planted questions must be >= 1, got {n}")
    from .arithmetic import first_distinct

    return [Question(id=f"planted:{p.canonical}", prompt=prompt_text(p), answer=str(p.answer()),
                     meta={"split": split, "determined_steps": p.determined_steps, "swap_answer": str(p.answer("swap"))})
            for p in first_distinct(iter_problems(split, seed), n)]


class PlantedTask(ArithmeticTask):
    """Held-out (`eval`) or training (`train`) planted-mode questions; answers are integers.

    `record(completion, question)` gives the extra fields the rollouts store per completion:
    `mode` (ground truth, `mode_of`).
    """

    name = "planted"

    def __init__(self, split: str = "eval", n: int = 200, seed: int = 0):
        self.split = split
        self.seed = seed
        from .base import Task

        Task.__init__(self, make_questions(split, n, seed))

    @staticmethod
    def problem(question: Question) -> PlantedProblem:
        return parse_problem(question.id.split(":", 1)[1])

    def record(self, completion: str, question: Question) -> dict:
        """Per-completion ground truth stored in rollout records."""
        return {"mode": mode_of(completion, self.problem(question))}

    @staticmethod
    def worked_solution(question: Question) -> str:
        return solution_text(PlantedTask.problem(question), "right")
