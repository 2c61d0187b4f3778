"""SAE quality: activation metrics (variance explained, L0, dead/healthy latents) and splice
metrics (CE loss recovered and KL when the SAE reconstruction replaces the residual stream).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import DataError, ShapeError
from ..models import find_layers, normalize_layer
from .model import SparseAutoencoder

HEALTHY_RANGE = (0.005, 0.30)
"""A latent is healthy when its fire rate (fraction of tokens) lies in this closed range."""


@torch.no_grad()
def activation_metrics(sae: SparseAutoencoder, acts: Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity of `sae` on held-out activations acts [N, d_in].

    variance_explained = 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (sums over all N tokens, float64);
    l0 = mean number of non-zero codes per token; fire_rates [d_sae] = fraction of tokens on
    which each latent is non-zero; dead_fraction = latents that never fire here; healthy_fraction
    = fire rate within HEALTHY_RANGE.
    """
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise ShapeError(f"activations have shape {tuple(acts.shape)}, expected [N, {sae.cfg.d_in}]")
    n = acts.shape[0]
    if n == 0:
        raise DataError("no activations to evaluate")
    if not torch.isfinite(acts).all():
        raise DataError("activations contain NaN or infinite values")
    was_training = sae.training
    sae.eval()
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=sae.device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=sae.device)
    sse = torch.zeros((), dtype=torch.float64, device=sae.device)
    counts = torch.zeros(d_sae, dtype=torch.float64, device=sae.device)
    active = torch.zeros((), dtype=torch.float64, device=sae.device)
    try:
        for start in range(0, n, batch_size):
            x = acts[start:start + batch_size].to(sae.device, sae.dtype)
            values, indices = sae.encode(x)
            x_hat = sae.decode(values, indices)
            x64 = x.double()
            sum_x += x64.sum(0)
            sum_x2 += x64.pow(2).sum()
            sse += (x64 - x_hat.double()).pow(2).sum()
            on = values != 0
            counts += torch.bincount(indices[on], minlength=d_sae).double()
            active += on.sum()
    finally:
        sae.train(was_training)
    total_var = sum_x2 - sum_x.pow(2).sum() / n
    fvu = (sse / total_var).item() if total_var > 0 else float("nan")
    fire_rates = (counts / n).float().cpu()
    lo, hi = HEALTHY_RANGE
    return {
        "variance_explained": 1.0 - fvu,
        "fvu": fvu,
        "l0": (active / n).item(),
        "dead_fraction": (fire_rates == 0).float().mean().item(),
        "alive_fraction": (fire_rates > 0).float().mean().item(),
        "healthy_fraction": ((fire_rates >= lo) & (fire_rates <= hi)).float().mean().item(),
        "fire_rates": fire_rates,
        "n_tokens": n,
    }


def density_histogram_figure(fire_rates: Tensor, bins: int = 60):
    """Histogram of log10 fire rate per latent (dead latents counted in a separate note)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rates = torch.as_tensor(fire_rates).float().cpu()
    alive = rates[rates > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=bins, color="tab:blue")
    lo, hi = HEALTHY_RANGE
    for r in (lo, hi):
        ax.axvline(torch.tensor(r).log10().item(), color="tab:green", linestyle="--", linewidth=1)
    dead = int((rates == 0).sum())
    ax.set_xlabel("log10 fire rate")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density ({dead} of {rates.numel()} latents never fired)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- splice

@contextlib.contextmanager
def _replace_output(layer_module: nn.Module, fn) -> Iterator[None]:
    """Replace the hidden states a decoder layer outputs by fn(hidden) (tensor or tuple output)."""

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            return type(output)((fn(output[0]), *output[1:]))
        return fn(output)

    handle = layer_module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]


@torch.no_grad()
def splice_metrics(model: nn.Module, layer: int, sae: SparseAutoencoder, input_ids: Tensor,
                   attention_mask: Tensor | None = None) -> dict[str, float]:
    """Next-token CE with layer `layer`'s output clean, replaced by the SAE reconstruction, and
    replaced by zeros; loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean); kl_sae = mean
    over tokens of KL(clean ‖ spliced). Positions whose token or target is padding are excluded.
    Every position (BOS included) is spliced.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ShapeError(f"input_ids must be [batch, seq >= 2], got {tuple(input_ids.shape)}")
    layers = find_layers(model)
    module = layers[normalize_layer(layer, len(layers))]
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    valid = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)  # [B, T-1]
    if not valid.any():
        raise DataError("no unpadded next-token positions to evaluate")
    targets = input_ids[:, 1:]
    was_training = sae.training
    sae.eval()

    def ce(logp: Tensor) -> Tensor:
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
        return nll[valid].mean()

    def reconstruct(h: Tensor) -> Tensor:
        values, indices = sae.encode(h.to(sae.device))
        return sae.decode(values, indices).to(h.dtype).to(h.device)

    try:
        clean = _next_token_logprobs(model, input_ids, attention_mask)
        with _replace_output(module, reconstruct):
            spliced = _next_token_logprobs(model, input_ids, attention_mask)
        with _replace_output(module, torch.zeros_like):
            zero = _next_token_logprobs(model, input_ids, attention_mask)
    finally:
        sae.train(was_training)
    ce_clean, ce_sae, ce_zero = ce(clean).item(), ce(spliced).item(), ce(zero).item()
    kl = (clean.exp() * (clean - spliced)).sum(-1)[valid].mean().item()
    denom = ce_zero - ce_clean
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "loss_recovered": (ce_zero - ce_sae) / denom if denom != 0 else float("nan"),
        "kl_sae": kl,
        "n_tokens": int(valid.sum()),
    }
