"""Offline corpora of real English text for real models, identical on every machine with the same Python.

Selected with `data.source=<name>`:

    pydoc_topics   the Python language reference topics that ship with Python
                   (`pydoc_data.topics`, what `help("assert")` shows): 79 topics, about 465k
                   characters (113k SmolLM2 tokens on Python 3.11.7), one document per paragraph.
    stdlib_docs    `pydoc_topics` followed by every docstring (module, class, function) of the
                   standard library's own `.py` sources, read with `ast` (nothing is imported),
                   modules in sorted path order, test suites, idlelib and site-packages left out;
                   several million characters of English technical prose.

Both depend only on the running Python's version (recorded as `corpus_python` in reports):
the same version gives the same documents, in the same order, on every machine.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

CORPORA = ("pydoc_topics", "stdlib_docs")
"""Names accepted by `data.source` for the built-in real-text corpora."""

REAL_DEFAULT = "stdlib_docs"
"""The corpus a real (non-organism) model uses when `data.source` is left at the organism's text."""

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip", "venv", "config-3"}


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _paragraphs(text: str, min_chars: int = 40) -> Iterator[str]:
    """Blank-line separated paragraphs; short ones (headings, rules) are joined to the next."""
    carry = ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        carry = f"{carry}\n\n{para}" if carry else para
        if len(carry) >= min_chars:
            yield carry
            carry = ""
    if carry.strip():
        yield carry


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _paragraphs(topics[name])


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel[:-1]):
            continue
        if rel[-1].startswith("test_"):
            continue
        out.append(p)
    return out


def stdlib_docstrings() -> Iterator[str]:
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                yield doc


def iter_corpus(name: str) -> Iterator[str]:
    """Documents of a built-in corpus (see the module docstring)."""
    if name == "pydoc_topics":
        return pydoc_topics()
    if name == "stdlib_docs":
        import itertools

        return itertools.chain(pydoc_topics(), stdlib_docstrings())
    from .errors import DataError

    raise DataError(f"unknown built-in corpus {name!r}; expected one of {CORPORA}")


def real_model_data_default(data, model_name: str, command: str) -> bool:
    """Never feed a real model the organism's arithmetic text silently.

    When `model_name` is not the built-in organism and `data.source` is still the organism's
    text (the default), switch `data.source` to `REAL_DEFAULT` in place, say so on stderr and
    return True (commands record it as `data_source_defaulted` in their report); else False.
    """
    import logging

    from .data import ORGANISM_TEXT, PLANTED_TEXT
    from .models import ORGANISM_PLANTED, is_builtin_organism

    if str(model_name) == ORGANISM_PLANTED and data.source == ORGANISM_TEXT:
        data.source = PLANTED_TEXT  # the planted organism's own text, as the organism's is for the organism
        return False
    if is_builtin_organism(model_name) or data.source != ORGANISM_TEXT:
        return False
    data.source = REAL_DEFAULT
    msg = (f"{command}: model {model_name!r} is not the organism, so data.source defaults to the real-text "
           f"corpus {REAL_DEFAULT!r} (Python {python_version()} docs), not the organism's arithmetic text; "
           f"set data.source=<corpus> to choose")
    logging.getLogger(__name__).warning(msg)
    print(msg, file=sys.stderr)
    return True
