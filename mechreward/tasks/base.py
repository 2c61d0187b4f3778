"""A task = prompts + reference answers + a verifier."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    """One question of a task."""

    id: str
    """Stable identifier; rollouts, splits and packs refer to questions by it."""
    prompt: str
    """The text given to the model (before any chat template)."""
    answer: str
    """The reference answer, as the verifier compares it."""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    """Free-form extras (difficulty, source row, choices)."""


class Task(ABC):
    """Base class. Subclasses set `name`, fill `questions` and implement `extract`/`equivalent`."""

    name: str = "task"

    def __init__(self, questions: list[Question]):
        self.questions = list(questions)

    def __len__(self) -> int:
        return len(self.questions)

    @abstractmethod
    def extract(self, completion: str) -> str | None:
        """The final answer stated in a completion, or None when it states none."""

    def equivalent(self, predicted: str, reference: str) -> bool:
        """Whether an extracted answer matches the reference."""
        return predicted.strip() == reference.strip()

    def safe_extract(self, completion: str) -> str | None:
        """`extract` that never raises (None: no extractable answer)."""
        try:
            return self.extract(completion)
        except Exception:  # noqa: BLE001 - a grader must not crash a run on odd model output
            return None

    def verify(self, completion: str, reference: str) -> bool:
        """1/0 grading of a completion. Never raises: an unparseable answer is wrong."""
        try:
            pred = self.extract(completion)
            return pred is not None and bool(self.equivalent(pred, reference))
        except Exception:  # noqa: BLE001 - a grader must not crash a run on odd model output
            return False
