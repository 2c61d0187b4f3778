"""Multiple-choice questions (SuperGPQA style): the answer is a letter among the choices.

Extraction, in order of trust (the last match of the first tier that has a valid one wins):

1. `\\boxed{X}` (also `\\boxed{(X)}`, `\\boxed{\\text{X}}`, `\\boxed{X. text}`);
2. an explicit statement: `Answer: X`, `the answer is (X)`, `correct option is X` (a
   lowercase letter only in parentheses or alone at the end of its line: `Answer: b.`);
3. the last standalone capital letter among the valid choices.

"Standalone" means not part of a word (`B` in "B." or "(B)", not in "Bob" or "I'm"). Capitals
only, so the article "a" is never choice A; and "A"/"I" followed by a lowercase word ("A cat",
"I think") are read as English, not as choices. Letters outside the task's choices are ignored.
"""

from __future__ import annotations

import re
import string

from ..errors import DataError
from .base import Question, Task
from .math import _boxed_spans

LETTERS = string.ascii_uppercase
DEFAULT_PROMPT = (
    "{question}\n\n{choices}\n\n"
    "Answer with the letter of the correct option, and put it within \\boxed{}."
)
"""`{question}` and `{choices}` are replaced (no other braces are read)."""

_EXPLICIT_RE = re.compile(
    r"(?:answer\s*(?:is\b\s*[:：]?|[:：=])|(?:option|choice)\s+is\b\s*[:：]?)"
    r"\s*(?:\*\*|\$)?\s*(?:option\s+|choice\s+)?"
    r"(?:[\(\[]\s*(?P<par>[A-Za-z])\s*[\)\]]|(?P<bare>(?-i:[A-Z]))(?![A-Za-z0-9'’])"
    # a lowercase letter only when nothing but punctuation follows on its line ("Answer: b.")
    r"|(?P<low>(?-i:[a-z]))(?=[ \t]*(?:\*\*|\$)?[.)]?[ \t]*(?:\n|$)))",
    re.IGNORECASE,
)
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9\\'’])([A-Z])(?![A-Za-z0-9'’])")
_BOX_LETTER_RE = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?![A-Za-z0-9])")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
# "A cat", "I think": a capital A/I followed by a lowercase word is an article/pronoun.
# "A is correct" / "I is correct" are still choices ("I is" is not English).
_WORD_AFTER_RE = re.compile(r"\s+(?!is\b)[a-z]")


def _is_english_word(text: str, letter: str, end: int) -> bool:
    return letter in ("A", "I") and _WORD_AFTER_RE.match(text, end) is not None


def letter_of(index: int) -> str:
    if not 0 <= index < len(LETTERS):
        raise DataError(f"choice index {index} out of range 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def format_choices(choices: list[str]) -> str:
    """`A) first\\nB) second ...`"""
    return "\n".join(f"{letter_of(i)}) {c}" for i, c in enumerate(choices))


def reference_letter(answer, choices: list[str]) -> str:
    """The reference as a letter: a letter (`"B"`, `"(B)"`, `"b."`), a 0-based index, or the
    text of one of the choices. Raises DataError when it is none of these."""
    n = len(choices)
    if isinstance(answer, bool):
        raise DataError(f"answer {answer!r} is not a choice letter, index or choice text")
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise DataError(f"answer index {answer} out of range for {n} choices")
        return letter_of(answer)
    s = str(answer).strip()
    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\].]?", s)
    if m:
        letter = m.group(1).upper()
        if LETTERS.index(letter) >= n:
            raise DataError(f"answer letter {letter!r} is outside the {n} choices {LETTERS[:n]}")
        return letter
    matches = [i for i, c in enumerate(choices) if str(c).strip() == s]
    if len(matches) == 1:
        return letter_of(matches[0])
    raise DataError(f"answer {answer!r} is not a choice letter, index or the text of one choice")


class MCQTask(Task):
    """Letter-answer multiple choice; `letters` are the valid choices (from the questions)."""

    name = "mcq"

    def __init__(self, questions: list[Question], letters: str | None = None):
        super().__init__(questions)
        if letters is None:
            n_choices = [len(q.meta["choices"]) for q in self.questions if "choices" in q.meta]
            letters = LETTERS[: max(n_choices)] if n_choices else LETTERS[:4]
        self.letters = letters.upper()
        """Valid choice letters (`"ABCD"`); others are never extracted."""

    @staticmethod
    def format_prompt(question: str, choices: list[str], template: str = DEFAULT_PROMPT) -> str:
        return template.replace("{question}", question).replace("{choices}", format_choices(choices))

    def _valid(self, letter: str) -> bool:
        return len(letter) == 1 and letter.upper() in self.letters

    def extract(self, completion: str) -> str | None:
        """The chosen letter (upper case), or None when no valid choice is stated."""
        boxed = []
        for _, content in _boxed_spans(completion):
            m = _BOX_LETTER_RE.match(_TEXT_WRAPPER_RE.sub(r"\1", content))
            if m and self._valid(m.group(1)):
                boxed.append(m.group(1).upper())
        if boxed:
            return boxed[-1]

        explicit = []
        for m in _EXPLICIT_RE.finditer(completion):
            if m.group("par") or m.group("low"):
                letter = m.group("par") or m.group("low")
            else:
                letter = m.group("bare")
                if _is_english_word(completion, letter, m.end()):
                    continue
            if self._valid(letter):
                explicit.append(letter.upper())
        if explicit:
            return explicit[-1]

        for m in reversed(list(_STANDALONE_RE.finditer(completion))):
            letter = m.group(1)
            if self._valid(letter) and not _is_english_word(completion, letter, m.end()):
                return letter
        return None

    def equivalent(self, predicted: str, reference: str) -> bool:
        return predicted.strip().upper() == reference.strip().upper()
