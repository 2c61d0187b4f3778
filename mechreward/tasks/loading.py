"""`TaskConfig` → `Task`: the built-in arithmetic organism, or rows from a local file or the HF hub.

Local `.jsonl` / `.json` files are read with plain `json` (no network, no cache). Anything
else is treated as a Hugging Face dataset id and loaded with `datasets.load_dataset`; when the
hub cannot be reached the error names the dataset and says how to use a local file instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError, DataError
from .base import Question, Task

log = logging.getLogger(__name__)

MATH_NAMES = ("gsm8k", "math")
MCQ_NAMES = ("mcq", "supergpqa")
TASK_NAMES = ("arithmetic", "planted", "addition", "lookup", *MATH_NAMES, *MCQ_NAMES)
LOCAL_SUFFIXES = (".jsonl", ".json")


@dataclass
class TaskConfig:
    """Which questions to use and how to read them (the `task:` group of every command)."""

    name: str = "arithmetic"
    """`arithmetic` (built-in organism task), `planted` (the planted organism's task, arithmetic with a
    ground-truth solving mode per completion, mechreward.tasks.planted), `addition` (generated "What is 47 + 8?" for small
    chat models, mechreward.tasks.addition), `lookup` (generated facts, one asked back: "The red box
    has number 47. ... What number does the blue box have?", mechreward.tasks.lookup), `gsm8k`/`math` (free-form math, MathTask) or
    `mcq`/`supergpqa` (letter multiple choice, MCQTask)."""
    source: str | None = None
    """A local `.jsonl`/`.json` file, or a Hugging Face dataset id (`openai/gsm8k`).
    None for `arithmetic`, which generates its questions."""
    subset: str | None = None
    """HF dataset configuration name (`main` for openai/gsm8k); ignored for local files. For
    `addition`: the operands, `2d+1d` (default), `1d` or `2d`. For `lookup`: facts per question,
    `2` (default), `3` or `4`."""
    split: str = "eval"
    """Dataset split (`test`, `train`); arithmetic has `train` and `eval`. Ignored for a
    `.jsonl` file; for a `.json` file holding `{split: [rows]}` it picks the list."""
    n: int | None = None
    """Use the first n usable rows (in source order); None = all (arithmetic: its default)."""
    question_field: str | None = None
    """Column with the question text. None = `question`."""
    answer_field: str | None = None
    """Column with the reference. None = `answer` (math: a GSM8K solution ending in `#### 72`
    is cut to `72`) or `answer_letter` (mcq: a letter, 0-based index or choice text)."""
    choices_field: str | None = None
    """Column with the list of options (mcq only). None = `options`."""
    id_field: str | None = None
    """Column with a stable question id; None = the source row index (`"17"`)."""
    prompt_template: str | None = None
    """Prompt text with `{question}` (and for mcq `{choices}`); None = the task's default."""
    seed: int = 0
    """Seed for generated tasks (arithmetic); file/hub rows are taken in order, unshuffled."""
    answer_extraction: list[str] | None = None
    """Math tasks: how the final answer is read from a completion, methods tried in order, the
    first that finds one wins: `boxed` (last `\\boxed{}`), `hash` (last `####`), `marked` (the
    later of those two; the default), `last_number` (the last number anywhere, lenient: a chat
    model answering "9 + 9 = 18") or `regex:<pattern>` (last match; group 1 if it has one).
    None = [marked]. Responses with no extractable answer are counted in reports."""


def organism_task_leaks(model_name: str, settings: dict[str, object]) -> list[str]:
    """`key=value` of the settings that are still the organism's defaults while `model_name` is
    a real model (empty for the organism). `settings` maps a setting's name to a pair
    (value, organism default) or to a TaskConfig (which leaks when it is the arithmetic task)."""
    from ..models import is_builtin_organism

    if is_builtin_organism(model_name):
        return []
    out = []
    for key, val in settings.items():
        if isinstance(val, TaskConfig):
            if val.name == "arithmetic":
                out.append(f"{key}.name=arithmetic")
        elif val[0] == val[1]:
            out.append(f"{key}={val[0]}")
    return out


def warn_organism_defaults(model_name: str, command: str, leaks: list[str], fix: str) -> list[str]:
    """Say on stderr (and in the log) that a model other than the organism runs with the
    organism's defaults `leaks`; returns `leaks` for the report (`organism_defaults`)."""
    if leaks:
        import sys

        msg = (f"{command}: warning: model {model_name!r} is not the organism, but runs with the organism's "
               f"{', '.join(leaks)}; {fix}")
        log.warning(msg)
        print(msg, file=sys.stderr)
    return leaks


def require_real_task(model_name: str, command: str, **tasks: TaskConfig) -> list[str]:
    """Warn when a model other than the organism runs on the organism's arithmetic task
    (a model trained on it, a test model, may do so on purpose); returns the leaks."""
    return warn_organism_defaults(model_name, command, organism_task_leaks(model_name, dict(tasks)),
                                  "choose a task for your model (e.g. task=addition, or task.name=math task.source=<file>)")


def _field(cfg: TaskConfig, which: str) -> str:
    explicit = getattr(cfg, f"{which}_field")
    if explicit is not None:
        return explicit
    mcq = cfg.name in MCQ_NAMES
    return {"question": "question", "answer": "answer_letter" if mcq else "answer", "choices": "options"}[which]


def _is_local(source: str) -> bool:
    """A file path (by suffix, by existing, or by an explicit `/`, `./`, `~` start), else an HF id."""
    return (
        source.lower().endswith(LOCAL_SUFFIXES)
        or source.startswith((".", "~", os.path.sep))
        or Path(source).expanduser().exists()
    )


def _read_local(path: Path, split: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"task data file not found: {path}")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"task data file {path} must be .jsonl or .json, got {path.suffix!r}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            if split not in data or not isinstance(data[split], list):
                raise DataError(
                    f"{path} holds an object with keys {sorted(data)[:10]}; expected a list of rows "
                    f"or a list under the split key {split!r}"
                )
            data = data[split]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of row objects, got {type(data).__name__}")
        rows = data
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"{path}: row {bad[0]} is a {type(rows[bad[0]]).__name__}, not a JSON object")
    return rows


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_hub(cfg: TaskConfig):
    """The split as a `datasets.Dataset` (indexable, iterates dict rows)."""
    from huggingface_hub import constants

    hint = (
        f"To run offline, save it on a machine with network, e.g. "
        f"`datasets.load_dataset({cfg.source!r}, {cfg.subset!r}, split={cfg.split!r})"
        f".to_json('{cfg.source.replace('/', '_')}_{cfg.split}.jsonl')`, "
        f"and pass task.source=/path/to/that.jsonl"
    )
    # Without network the hub client retries for ~30 s before failing: check once, quickly.
    # Offline mode (HF_HUB_OFFLINE=1) goes straight to the local datasets cache.
    if not constants.HF_HUB_OFFLINE and not _hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to load dataset {cfg.source!r}. "
            f"Set HF_HUB_OFFLINE=1 to use a cached copy. {hint}"
        )
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "not loadable"
        raise DataError(
            f"cannot load dataset {cfg.source!r} (subset={cfg.subset!r}, split={cfg.split!r}): "
            f"{type(e).__name__}: {e}. {hint}"
        ) from None
    return ds


def _usable(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def load_task(cfg: TaskConfig) -> Task:
    """Build the task a config describes. Raises ConfigError/DataError naming the bad value."""
    name = cfg.name.lower()
    if name not in TASK_NAMES:
        raise ConfigError(f"unknown task name {cfg.name!r}; expected one of {TASK_NAMES}")
    if cfg.n is not None and cfg.n < 1:
        raise ConfigError(f"task.n must be >= 1 or null, got {cfg.n}")

    if name in ("arithmetic", "planted"):
        if cfg.source is not None:
            raise ConfigError(f"the {name} task generates its questions; got source={cfg.source!r}")
        from .arithmetic import ArithmeticTask
        from .planted import PlantedTask

        kwargs = {"split": cfg.split, "seed": cfg.seed}
        if cfg.n is not None:
            kwargs["n"] = cfg.n
        return (ArithmeticTask if name == "arithmetic" else PlantedTask)(**kwargs)
    if name == "addition":
        if cfg.source is not None:
            raise ConfigError(f"the addition task generates its questions; got source={cfg.source!r}")
        from .addition import addition_task

        return addition_task(cfg.split, cfg.n, cfg.seed, cfg.subset, cfg.prompt_template, cfg.answer_extraction)
    if name == "lookup":
        if cfg.source is not None:
            raise ConfigError(f"the lookup task generates its questions; got source={cfg.source!r}")
        from .lookup import lookup_task

        return lookup_task(cfg.split, cfg.n, cfg.seed, cfg.subset, cfg.prompt_template, cfg.answer_extraction)

    if not cfg.source:
        raise ConfigError(f"task {cfg.name!r} needs task.source (a .jsonl/.json file or an HF dataset id)")
    where = cfg.source
    if _is_local(cfg.source):
        path = Path(cfg.source).expanduser()
        rows = _read_local(path, cfg.split)
        where = str(path)
    else:
        rows = _read_hub(cfg)

    mcq = name in MCQ_NAMES
    qf, af = _field(cfg, "question"), _field(cfg, "answer")
    cf = _field(cfg, "choices") if mcq else None
    need = [f for f in (qf, af, cf, cfg.id_field) if f is not None]

    from .math import DEFAULT_PROMPT as MATH_PROMPT, MathTask
    from .mcq import DEFAULT_PROMPT as MCQ_PROMPT, MCQTask, reference_letter

    questions: list[Question] = []
    skipped: dict[str, int] = {}
    seen_ids: set[str] = set()
    for idx, row in enumerate(rows):
        missing = [f for f in need if not _usable(row.get(f))]
        if missing:
            skipped[f"missing {missing}"] = skipped.get(f"missing {missing}", 0) + 1
            continue
        qid = str(row[cfg.id_field]) if cfg.id_field else str(idx)
        if qid in seen_ids:
            raise DataError(f"{where}: duplicate question id {qid!r} in column {cfg.id_field!r}")
        seen_ids.add(qid)
        question = str(row[qf]).strip()
        meta = {"row": idx}
        if mcq:
            choices = row[cf]
            if isinstance(choices, dict):  # {"A": "...", "B": "..."} in letter order
                choices = [choices[k] for k in sorted(choices)]
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                skipped["choices not a list of >= 2"] = skipped.get("choices not a list of >= 2", 0) + 1
                continue
            choices = [str(c) for c in choices]
            try:
                answer = reference_letter(row[af], choices)
            except DataError as e:
                raise DataError(f"{where} row {idx}, field {af!r}: {e}") from None
            prompt = MCQTask.format_prompt(question, choices, cfg.prompt_template or MCQ_PROMPT)
            meta["choices"] = choices
        else:
            answer = MathTask.reference_from_solution(str(row[af]))
            prompt = MathTask.format_prompt(question, cfg.prompt_template or MATH_PROMPT)
            meta["solution"] = str(row[af])
        questions.append(Question(id=qid, prompt=prompt, answer=answer, meta=meta))
        if cfg.n is not None and len(questions) == cfg.n:
            break

    if skipped:
        log.warning("%s: skipped %d unusable row(s): %s", where, sum(skipped.values()), skipped)
    if not questions:
        cols = sorted(rows[0]) if rows else []
        raise DataError(
            f"{where}: no usable rows for task {cfg.name!r} (read {len(rows)} row(s); need fields "
            f"{need}; first row has {cols}; skipped: {skipped or 'none'})"
        )
    if cfg.n is not None and len(questions) < cfg.n:
        log.warning("%s: asked for n=%d questions, only %d usable", where, cfg.n, len(questions))
    if mcq and cfg.answer_extraction:
        raise ConfigError(f"task.answer_extraction={cfg.answer_extraction!r} applies to math tasks only; "
                          f"task {cfg.name!r} reads a letter")
    task: Task = MCQTask(questions) if mcq else MathTask(questions, extraction=cfg.answer_extraction)
    task.name = name
    return task
