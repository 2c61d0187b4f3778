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


NEAR_UNIFORM_GAP = 0.10
"""Flag a splice when CE_zero − CE_clean is below this fraction of CE_zero (the model barely beats
zero ablation on the scored tokens, so loss recovered divides by a near-zero gap)."""

LOSS_RECOVERED_TOLERANCE = 1e-4
"""A loss recovered within this of [0, 1] (float noise of an exact identity or zero SAE) is in range."""


def splice_flags(m: dict[str, float], suffix: str = "") -> dict[str, str]:
    """{code: sentence} for the splice numbers `m` (keys ce_clean, ce_sae, ce_zero, loss_recovered
    with `suffix`) that cannot be read as usual."""
    c, s, z, lr = (m[f"{k}{suffix}"] for k in ("ce_clean", "ce_sae", "ce_zero", "loss_recovered"))
    where = " (all tokens)" if suffix else ""
    flags = {}
    tol = LOSS_RECOVERED_TOLERANCE
    if not (lr == lr and -tol <= lr <= 1.0 + tol):
        if s < c:
            why = "the spliced model predicts these tokens better than the model itself"
        elif s > z:
            why = "the spliced model is worse than zero ablation"
        else:
            why = "zero ablation does not raise the CE above the clean CE"
        flags[f"loss_recovered_out_of_range{suffix}"] = (
            f"loss recovered{where} is {lr:.3f}, outside [0, 1]: {why} (CE clean {c:.4f}, SAE {s:.4f}, zero "
            f"{z:.4f} nats), so it is not the fraction of the model's loss the SAE keeps; read ce_increase "
            f"and kl_sae instead.")
    if z > 0 and z - c < NEAR_UNIFORM_GAP * z:
        flags[f"clean_near_zero_ablation{suffix}"] = (
            f"clean CE{where} {c:.4f} nats is within {NEAR_UNIFORM_GAP:.0%} of the zero-ablation CE {z:.4f}: the "
            f"model barely predicts these tokens, so loss recovered divides by a near-zero gap and says little "
            f"about the SAE; read ce_increase and kl_sae instead.")
    return flags


@torch.no_grad()
def splice_metrics(model: nn.Module, layer: int, sae: SparseAutoencoder, input_ids: Tensor,
                   attention_mask: Tensor | None = None, splice_mask: Tensor | None = None,
                   score_mask: Tensor | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Next-token CE with layer `layer`'s output clean, replaced by the SAE reconstruction, and
    replaced by zeros, on input_ids [B, T].

    splice_mask [B, T] (default: every unpadded position) says where the reconstruction (and the
    zeros) replace the layer output; elsewhere the clean output stays. A next-token target t
    counts when it and its predicting position t−1 are unpadded and t−1 was spliced. score_mask
    [B, T] (optional, over target tokens, e.g. the organism's completion) narrows the headline
    numbers to those targets; the `*_all` keys then give every counted target.

    loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean); ce_increase = CE_sae − CE_clean
    (nats) and ce_increase_relative = that over CE_clean; kl_sae / kl_zero = mean over the
    counted targets' predicting positions of KL(clean ‖ spliced) / KL(clean ‖ zero-ablated).
    `flags` ({code: sentence}, see `splice_flags`) says when loss recovered cannot be read as
    usual. Sums run in float64 over chunks of `batch_size` rows (default: all at once).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ShapeError(f"input_ids must be [batch, seq >= 2], got {tuple(input_ids.shape)}")
    layers = find_layers(model)
    module = layers[normalize_layer(layer, len(layers))]
    device = next(model.parameters()).device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    unpadded = attention_mask > 0
    spliced = unpadded if splice_mask is None else (splice_mask.to(unpadded.device).bool() & unpadded)
    counted = unpadded[:, 1:] & unpadded[:, :-1] & spliced[:, :-1]  # [B, T-1], by target
    scored = counted if score_mask is None else counted & score_mask.to(counted.device).bool()[:, 1:]
    if not scored.any():
        raise DataError("no next-token targets to score (every target is padding, unspliced or outside score_mask)")
    sets = {"": scored} if score_mask is None else {"": scored, "_all": counted}
    sums = {sfx: torch.zeros(6, dtype=torch.float64) for sfx in sets}  # nll clean, sae, zero; kl sae, zero; n
    was_training = sae.training
    sae.eval()
    step = batch_size or input_ids.shape[0]
    try:
        for i in range(0, input_ids.shape[0], step):
            ids = input_ids[i:i + step].to(device)
            am = attention_mask[i:i + step].to(device)
            where = spliced[i:i + step].to(device)[..., None]

            def reconstruct(h: Tensor, where: Tensor = where) -> Tensor:
                values, indices = sae.encode(h.to(sae.device))
                x_hat = sae.decode(values, indices).to(h.dtype).to(h.device)
                return torch.where(where, x_hat, h)

            def zeros(h: Tensor, where: Tensor = where) -> Tensor:
                return torch.where(where, torch.zeros_like(h), h)

            clean = _next_token_logprobs(model, ids, am)
            with _replace_output(module, reconstruct):
                spl = _next_token_logprobs(model, ids, am)
            with _replace_output(module, zeros):
                zero = _next_token_logprobs(model, ids, am)
            targets = ids[:, 1:, None]
            nll = [-lp.gather(-1, targets).squeeze(-1).double() for lp in (clean, spl, zero)]
            p_clean = clean.exp()
            kl = [(p_clean * (clean - lp)).sum(-1).double() for lp in (spl, zero)]
            for sfx, mask in sets.items():
                m = mask[i:i + step].to(device)
                sums[sfx] += torch.stack([v[m].sum() for v in (*nll, *kl)] + [m.sum().double()]).cpu()
    finally:
        sae.train(was_training)
    out: dict[str, Any] = {}
    for sfx, tot in sums.items():
        n = tot[5].item()
        c, s_, z, kl_s, kl_z = (tot[j].item() / n for j in range(5))
        denom = z - c
        out.update({f"ce_clean{sfx}": c, f"ce_sae{sfx}": s_, f"ce_zero{sfx}": z,
                    f"loss_recovered{sfx}": (z - s_) / denom if denom != 0 else float("nan"),
                    f"ce_increase{sfx}": s_ - c,
                    f"ce_increase_relative{sfx}": (s_ - c) / c if c > 0 else float("nan"),
                    f"kl_sae{sfx}": kl_s, f"kl_zero{sfx}": kl_z, f"n_tokens{sfx}": int(n)})
    flags = {}
    for sfx in sums:
        flags.update(splice_flags(out, sfx))
    out["spliced_positions"] = int(spliced.sum())
    out["flags"] = flags
    return out
