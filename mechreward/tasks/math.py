"""GSM8K-style math: the final answer after `####` or inside `\\boxed{...}`, compared with math-verify.

Extraction takes the *last* answer marker in the completion (a model that revises itself, or
a few-shot-style continuation, ends with the answer that counts). Equivalence is decided by
math-verify (`1,000` = `1000`, `0.5` = `1/2` = `\\frac{1}{2}`, `-3` != `3`, `$18` = `18`); when
math-verify cannot parse either side, a normalised numeric comparison decides, and failing
that a normalised string comparison.
"""

from __future__ import annotations

import re
import threading

from .base import Question, Task

DEFAULT_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
"""The common Qwen-style math instruction; `{question}` is replaced (no other braces are read)."""

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####")
_NUMBER_RE = re.compile(r"[-+−]?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(start, content) of every `\\boxed{...}` with balanced braces; unclosed ones are skipped."""
    out = []
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end():i - 1].strip()))
    return out


def _hash_answer(text: str) -> tuple[int, str] | None:
    """(start, rest of the line) after the last `####` that has something after it."""
    for m in reversed(list(_HASH_RE.finditer(text))):
        rest = text[m.end():].lstrip("#").strip().split("\n", 1)[0].strip()
        if rest:
            return m.start(), rest
    return None


def _clean(ans: str) -> str:
    """Strip LaTeX decoration that math-verify does not read: `\\$`, `\\,` spacing, `{,}`,
    `\\text{...}` wrappers, `\\%`, surrounding `$...$`, a trailing full stop."""
    s = ans.strip()
    s = _TEXT_WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\$", "").replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\%", "%").replace("−", "-")
    s = s.strip().strip("$").strip()
    return s.rstrip(".").strip()


def _numeric(ans: str) -> float | None:
    """The number a string consists of (commas as thousands separators, `a/b` fractions,
    optionally followed by plain unit words: `18 dollars`), or None when it is anything else."""
    m = _NUMBER_RE.match(_clean(ans).lstrip("$"))
    if not m or not re.fullmatch(r"\s*%?\s*[A-Za-z .]*", _clean(ans).lstrip("$")[m.end():]):
        return None
    tok = re.sub(r"[\s,]", "", m.group(0)).replace("−", "-")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den)
        return float(tok)
    except (ValueError, ZeroDivisionError):
        return None


def _mv_parse(ans: str, timeout: int | None) -> list:
    """math-verify's parse. LaTeX (a backslash, `^`, `{`) is parsed inside `$...$` first,
    because bare `\\dfrac{3}{4}` is not found without delimiters and bare `2\\sqrt{2}` is read
    as 2; plain text ("18 dollars", "The answer is 72") is parsed as it is first."""
    from math_verify import parse

    latex = any(c in ans for c in "\\^{")
    tries = [f"${ans}$", ans] if latex else [ans, f"${ans}$"]
    for t in tries:
        out = parse(t, parsing_timeout=timeout)
        if out:
            return out
    return []


def _mv_timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which only the main thread may install; elsewhere
    # (a dataloader or reward worker thread) it would raise, so parse without a timeout there.
    return 5 if threading.current_thread() is threading.main_thread() else None


EXTRACTION_METHODS = ("marked", "boxed", "hash", "last_number", "regex:<pattern>")
"""How `task.answer_extraction` may read an answer (tried in the order given)."""


def parse_extraction(methods: list[str] | str | None, fallback_last_number: bool = False) -> tuple[str, ...]:
    """Validated extraction methods; ConfigError naming a bad one (or a regex that does not compile)."""
    from ..errors import ConfigError

    if methods is None or (not isinstance(methods, str) and len(methods) == 0):
        out = ["marked"]
    else:
        out = [methods] if isinstance(methods, str) else [str(m) for m in methods]
    for m in out:
        if m.startswith("regex:"):
            try:
                re.compile(m[len("regex:"):])
            except re.error as e:
                raise ConfigError(f"task.answer_extraction: regex {m[6:]!r} does not compile: {e}") from None
        elif m not in EXTRACTION_METHODS[:4]:
            raise ConfigError(f"task.answer_extraction: unknown method {m!r}; expected one of {EXTRACTION_METHODS}")
    if fallback_last_number and "last_number" not in out:
        out.append("last_number")
    return tuple(out)


def extract_with(method: str, completion: str) -> str | None:
    """The answer one extraction method reads from a completion, or None."""
    if method == "marked":
        return MathTask._marked_answer(completion)
    if method == "boxed":
        spans = [a for _, a in _boxed_spans(completion) if a]
        return spans[-1] if spans else None
    if method == "hash":
        h = _hash_answer(completion)
        return h[1] if h else None
    if method == "last_number":
        nums = _NUMBER_RE.findall(completion)
        return nums[-1].strip() if nums else None
    if method.startswith("regex:"):
        matches = list(re.finditer(method[len("regex:"):], completion))
        if not matches:
            return None
        m = matches[-1]
        ans = (m.group(1) if m.re.groups else m.group(0)).strip()
        return ans or None
    raise ValueError(f"unknown extraction method {method!r}")


class MathTask(Task):
    """Free-form math answers (GSM8K, MATH): `#### <ans>` or `\\boxed{<ans>}`, math-verify equivalence."""

    name = "math"

    def __init__(self, questions: list[Question], fallback_last_number: bool = False,
                 extraction: list[str] | str | None = None):
        super().__init__(questions)
        self.extraction = parse_extraction(extraction, fallback_last_number)
        """Extraction methods tried in order (see `EXTRACTION_METHODS`); `fallback_last_number`
        appends `last_number` (lenient; off by default so a reward never credits an unmarked answer)."""

    @property
    def fallback_last_number(self) -> bool:
        return "last_number" in self.extraction

    @staticmethod
    def format_prompt(question: str, template: str = DEFAULT_PROMPT) -> str:
        return template.replace("{question}", question)

    @staticmethod
    def reference_from_solution(solution: str) -> str:
        """A GSM8K solution ending in `#### 72` (or a MATH solution with `\\boxed{}`) → `72`;
        a bare answer is returned stripped; thousands separators are dropped (`1,000` → `1000`)."""
        ans = MathTask._marked_answer(solution)
        ans = ans if ans is not None else solution.strip()
        if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", ans):
            ans = ans.replace(",", "")
        return ans

    @staticmethod
    def _marked_answer(text: str) -> str | None:
        cands = _boxed_spans(text)
        h = _hash_answer(text)
        if h is not None:
            cands.append(h)
        cands = [(pos, a) for pos, a in cands if a]
        if not cands:
            return None
        return max(cands, key=lambda c: c[0])[1]

    def extract(self, completion: str) -> str | None:
        """The answer found by the first extraction method that finds one (default: the last
        `####`/`\\boxed{}` answer, nested braces kept), or None."""
        for method in self.extraction:
            ans = extract_with(method, completion)
            if ans is not None:
                return ans
        return None

    def equivalent(self, predicted: str, reference: str) -> bool:
        """math-verify equivalence; a strict numeric, then string comparison when it cannot parse."""
        from math_verify import verify

        pred, ref = _clean(predicted), _clean(reference)
        timeout = _mv_timeout()
        gold, target = _mv_parse(ref, timeout), _mv_parse(pred, timeout)
        if gold and target:
            return bool(verify(gold, target, timeout_seconds=timeout))
        a, b = _numeric(pred), _numeric(ref)
        if a is not None and b is not None:
            return abs(a - b) <= 1e-6 * max(1.0, abs(b))
        norm = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
        return bool(norm(pred)) and norm(pred) == norm(ref)
