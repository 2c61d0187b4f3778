"""Batched sampling with HF `generate` and left padding, keeping the exact sampled ids.

Later stages teacher-force over `Sample.prompt_ids + Sample.completion_ids`, so those ids are
the ones the model produced (never a re-tokenisation of the decoded text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ConfigError, DataError
from .prefix import generate_shared


@dataclass
class Sample:
    """One sampled completion of one prompt."""

    prompt_index: int
    """Index of the prompt in the list given to `sample`."""
    sample_index: int
    """0..n-1: which of the n completions of that prompt."""
    prompt_ids: list[int]
    """The prompt's token ids, unpadded."""
    completion_ids: list[int]
    """Generated ids exactly as sampled, up to and including EOS when it stopped there; no padding."""
    text: str
    """`completion_ids` decoded with special tokens skipped (so without the EOS)."""
    logprobs: list[float] = field(default_factory=list)
    """Per completion token: log-prob of the sampled token under the model's raw distribution
    (softmax of the untempered, unfiltered logits; not the temperature/top-p sampling distribution)."""
    finish_reason: str = "length"
    """`eos` when the completion ends with EOS, `length` when it hit `max_new_tokens`."""


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple)) else [v])
    if not ids:
        raise DataError("the tokenizer has no eos_token_id; cannot tell where a completion ends")
    return ids


class _ChosenLogprobs:
    """A logits processor that records the raw log-prob of each sampled token.

    It runs before temperature/top-p (transformers applies user processors before the
    sampling warpers) and keeps only the last step's [batch, vocab] log-softmax: the token
    chosen at step t is read from `input_ids` at step t + 1 (and from the final sequences for
    the last step), so memory stays O(batch · vocab) instead of O(steps · batch · vocab).
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None  # [batch, vocab] log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # per step: [batch] log-prob of the chosen token

    def _take(self, chosen: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).cpu())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, steps] log-probs of `new_tokens` [batch, steps]."""
        if self.prev is not None and len(self.steps) < new_tokens.shape[1]:
            self._take(new_tokens[:, len(self.steps)].to(self.prev.device))
        self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(new_tokens.shape[0], 0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` [batch, max_len], rows right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], n: int = 1,
           temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 96,
           batch_size: int = 64, seed: int = 0, greedy: bool = False) -> list[Sample]:
    """`n` completions per prompt, in order (prompt 0 sample 0, prompt 0 sample 1, ...).

    `prompts` are strings (tokenised without adding special tokens) or lists of token ids.
    Each batch is seeded with `seed + batch index`, so results are reproducible on CPU for a
    given `seed` and `batch_size`. `greedy=True` ignores temperature/top_p.
    """
    if n < 1:
        raise ConfigError(f"n (samples per prompt) must be >= 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 for sampling, got {temperature} (use greedy=True)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if len(prompts) == 0:
        raise DataError("no prompts to sample from")

    prompt_ids = [list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in prompts]
    for i, p in enumerate(prompt_ids):
        if not p:
            raise DataError(f"prompt {i} is empty after tokenisation: {prompts[i]!r}")
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = next(model.parameters()).device
    jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]

    was_training = model.training
    model.eval()
    out: list[Sample] = []
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start:start + batch_size]
        ids, mask = left_pad([prompt_ids[i] for i, _ in chunk], pad_id, device)
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=float(temperature),
                                                           top_p=float(top_p), top_k=0)
        torch.manual_seed(seed + b)
        recorder = _ChosenLogprobs()
        gen = generate_shared(model, ids, mask, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(eos), pad_token_id=pad_id, logits_processor=[recorder],
                             return_dict_in_generate=True, min_new_tokens=0, **kwargs)
        new = gen.sequences[:, ids.shape[1]:].cpu()  # [batch, steps]
        lp = recorder.finish(new)  # [batch, steps] raw log-probs of the sampled tokens
        for row, (i, j) in enumerate(chunk):
            toks = new[row].tolist()
            # generate pads finished rows after their first EOS; cut there.
            stop = next((t for t, tok in enumerate(toks) if tok in eos), None)
            end = len(toks) if stop is None else stop + 1
            comp = toks[:end]
            out.append(Sample(
                prompt_index=i, sample_index=j, prompt_ids=list(prompt_ids[i]), completion_ids=comp,
                text=tokenizer.decode(comp, skip_special_tokens=True),
                logprobs=[float(x) for x in lp[row, :end]],
                finish_reason="eos" if stop is not None else "length",
            ))
    if was_training:
        model.train()
    return out
