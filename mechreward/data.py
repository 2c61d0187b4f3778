"""Text corpora → token batches.

Sources: the built-in organism text (default), a local `.txt` (one document per non-empty
line) / `.jsonl` / `.json` file, or a Hugging Face dataset id (streamed). Real corpora are
packed (documents joined by EOS, cut into `context_length` rows). The organism follows its own
training distribution instead: one problem per row from position 0 (prompt + worked solution +
EOS, never cut, never packed), right-padded with the pad token, and the held-out rows know
which targets are the completion (what the organism was trained to predict).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from .errors import DataError

ORGANISM_TEXT = "organism"
PLANTED_TEXT = "organism_planted"
"""The planted organism's own text (`mechreward.tasks.planted`, mode drawn per sample as in training)."""
ORGANISM_SOURCES = (ORGANISM_TEXT, PLANTED_TEXT)


@dataclass
class DataConfig:
    """Where text comes from and how it is cut into model inputs."""

    source: str = ORGANISM_TEXT
    """`organism`, a built-in real-text corpus (`pydoc_topics`, `stdlib_docs`: mechreward.corpora),
    a local .txt/.jsonl/.json path, or a Hugging Face dataset id."""
    text_field: str = "text"
    """Field holding the text in jsonl/json rows and HF datasets."""
    name: str | None = None
    """HF dataset configuration name (e.g. `sample-10BT` for FineWeb-Edu)."""
    split: str = "train"
    """HF dataset split."""
    streaming: bool = True
    """Stream HF datasets instead of downloading them whole."""
    context_length: int = 64
    """Tokens per packed sequence (real corpora). The organism is not packed: one problem per
    row, padded to the longest row of its batch (at most 82 tokens)."""
    batch_size: int = 32
    """Sequences per model forward."""
    heldout_sequences: int = 256
    """Sequences reserved for held-out evaluation (never trained on); for the organism,
    problems of its evaluation split (one per row)."""
    seed: int = 0
    """Seed of generated corpora (the organism's text)."""


def _organism_pairs(split: str, seed: int, source: str = ORGANISM_TEXT) -> Iterator[tuple[str, str]]:
    """(prompt, worked solution) of one organism problem after another."""
    if source == PLANTED_TEXT:
        from .tasks import planted

        for p, mode in planted.iter_training_texts(split, seed):
            yield planted.prompt_text(p), planted.solution_text(p, mode)
        return
    from .tasks.arithmetic import iter_problems, prompt_text, solution_text

    for p in iter_problems(split, seed):
        yield prompt_text(p), solution_text(p)


def _organism_texts(split: str, seed: int, source: str = ORGANISM_TEXT) -> Iterator[str]:
    for prompt, solution in _organism_pairs(split, seed, source):
        yield prompt + solution


class HeldOut(NamedTuple):
    """Held-out rows for evaluation.

    input_ids [H, T]; attention_mask [H, T] (0 on right padding); completion_mask [H, T] or
    None: True on the tokens the model was trained to predict (the organism's worked solution
    and its EOS), None for packed corpora (every token is a target).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor | None


def organism_rows(tokenizer, split: str, seed: int, source: str = ORGANISM_TEXT) -> Iterator[tuple[list[int], int]]:
    """(prompt + completion + EOS token ids, prompt length) of one organism problem per row, as the
    organism was trained (`mechreward.organism.train.make_batch`)."""
    eos = tokenizer.eos_token_id
    for prompt_s, sol_s in _organism_pairs(split, seed, source):
        prompt = tokenizer(prompt_s, add_special_tokens=False)["input_ids"]
        comp = tokenizer(sol_s, add_special_tokens=False)["input_ids"]
        yield prompt + comp + ([eos] if eos is not None else []), len(prompt)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token to pad organism rows with")
    return pad


def _pad_rows(rows: list[tuple[list[int], int]], pad: int) -> HeldOut:
    """Right-pad one-problem rows to the longest; completion_mask marks the completion + EOS."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    comp = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        comp[i, n_prompt:len(r)] = True
    return HeldOut(ids, mask, comp)


def _file_texts(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        return
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"unsupported corpus file {str(path)!r}: expected .txt, .jsonl or .json")
    with open(path, encoding="utf-8") as f:
        rows: Iterable = json.load(f) if suffix == ".json" else (json.loads(l) for l in f if l.strip())
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"row {i} of {str(path)!r} has no field {field!r}")
            if isinstance(row[field], str) and row[field].strip():
                yield row[field]


def _hf_texts(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.name, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(f"cannot load dataset {cfg.source!r} (config {cfg.name!r}, split {cfg.split!r}): {e}. "
                        "Offline, save it as a local .jsonl and pass its path as data.source") from None
    for row in ds:
        if cfg.text_field not in row:
            raise DataError(f"dataset {cfg.source!r} has no field {cfg.text_field!r} (fields: {sorted(row)})")
        if row[cfg.text_field]:
            yield row[cfg.text_field]


def iter_texts(cfg: DataConfig, heldout: bool = False) -> Iterator[str]:
    """Documents of the corpus. For the organism, `heldout` draws from its evaluation split."""
    from .corpora import CORPORA, iter_corpus

    if cfg.source in CORPORA:
        return iter_corpus(cfg.source)
    if cfg.source in ORGANISM_SOURCES:
        return _organism_texts("eval" if heldout else "train", cfg.seed, cfg.source)
    path = Path(cfg.source)
    if path.exists():
        return _file_texts(path, cfg.text_field)
    if cfg.source.startswith((".", "/", "~")) or cfg.source.endswith((".txt", ".jsonl", ".json")):
        raise DataError(f"corpus file not found: {cfg.source!r}")
    return _hf_texts(cfg)


def pack(tokenizer, texts: Iterable[str], context_length: int) -> Iterator[list[int]]:
    """Concatenate documents, separated by EOS, and cut into `context_length` token rows."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= context_length:
            yield buf[:context_length]
            buf = buf[context_length:]


def organism_heldout(tokenizer, cfg: DataConfig) -> HeldOut:
    """`heldout_sequences` problems of the organism's evaluation split, one per row from position 0."""
    rows = list(itertools.islice(organism_rows(tokenizer, "eval", cfg.seed, cfg.source), cfg.heldout_sequences))
    if not rows:
        empty = torch.empty(0, 1, dtype=torch.long)
        return HeldOut(empty, empty.clone(), empty.bool())
    return _pad_rows(rows, _pad_id(tokenizer))


def _organism_batches(tokenizer, cfg: DataConfig) -> Iterator[torch.Tensor]:
    """Endless training batches [B, T] of the organism: one train-split problem per row, right-padded
    with the pad token (= EOS for the organism; the special-token filter drops it)."""
    rows, pad = organism_rows(tokenizer, "train", cfg.seed, cfg.source), _pad_id(tokenizer)
    while True:
        yield _pad_rows(list(itertools.islice(rows, cfg.batch_size)), pad).input_ids


def heldout_set(tokenizer, cfg: DataConfig) -> HeldOut:
    """The held-out rows of `token_batches` with their attention and completion masks."""
    if cfg.source in ORGANISM_SOURCES:
        return organism_heldout(tokenizer, cfg)
    held = token_batches(tokenizer, cfg)[0]
    return HeldOut(held, torch.ones_like(held), None)


def token_batches(tokenizer, cfg: DataConfig) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """(held-out input_ids [H, T], endless-or-finite iterator of training input_ids [B, T]).

    For file and HF corpora the first `heldout_sequences` rows are held out and the training
    stream starts after them. The organism gives one problem per row from position 0 (no
    packing), right-padded with its pad token (= EOS): held-out rows from its evaluation split,
    training rows from its train split (`heldout_set` adds the padding and completion masks).
    """
    if cfg.context_length < 2 or cfg.batch_size < 1:
        raise DataError(f"context_length must be >= 2 and batch_size >= 1, got {cfg.context_length}, {cfg.batch_size}")
    if cfg.source in ORGANISM_SOURCES:
        return organism_heldout(tokenizer, cfg).input_ids, _organism_batches(tokenizer, cfg)
    rows = pack(tokenizer, iter_texts(cfg), cfg.context_length)
    held = list(itertools.islice(rows, cfg.heldout_sequences))
    first = list(itertools.islice(rows, cfg.batch_size))
    if not first or len(held) < min(1, cfg.heldout_sequences):
        raise DataError(f"corpus {cfg.source!r} is empty or too short: need at least "
                        f"{cfg.heldout_sequences + 1} sequences of {cfg.context_length} tokens")

    def batches() -> Iterator[torch.Tensor]:
        chunk = first
        while chunk:
            if len(chunk) == cfg.batch_size:
                yield torch.tensor(chunk, dtype=torch.long)
            chunk = list(itertools.islice(rows, cfg.batch_size))

    heldout = torch.tensor(held, dtype=torch.long) if held else torch.empty(0, cfg.context_length, dtype=torch.long)
    return heldout, batches()
