"""The sparse autoencoder: one module for every TopK-family checkpoint we read or train.

Math (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
    encode: pre = (s·x − b_dec) @ W_enc + b_enc     (s = act_scale; "− b_dec" when apply_b_dec_to_input)
            keep the top-k of pre per token, ReLU the kept values
    decode: x̂ = (Σ_{i∈topk} z_i · W_dec[i] + b_dec) / s

The encode-convention flags (`apply_b_dec_to_input`, `relu`, `relu_before_topk`) let Qwen-Scope
(no b_dec subtraction, no ReLU), sparsify (ReLU then topk) and SAELens checkpoints all load into
this one module with identical codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from .kernels import LatentOrder, latent_order, selected_preacts, sparse_decode

ARCHITECTURES = ("topk", "batchtopk")


@dataclass
class SAEConfig:
    """Shape and encode convention of a sparse autoencoder."""

    d_in: int
    """Width of the activations (the model's hidden size)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    k: int
    """Active latents per token (for batchtopk: on average over a batch)."""
    architecture: str = "topk"
    """`topk` (exactly k per token) or `batchtopk` (top k·B over a batch of B tokens at train
    time; a learned threshold at inference)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens, sparsify, OpenAI). Qwen-Scope: False."""
    relu: bool = True
    """ReLU the kept values. Qwen-Scope keeps negative top-k values: False."""
    relu_before_topk: bool = False
    """ReLU the pre-activations before choosing the top k (sparsify). Codes equal topk-then-ReLU
    except that fewer than k may be non-zero and the indices of zero values may differ."""
    metadata: dict = field(default_factory=dict)
    """Free-form provenance: model_name, hook_name, layer, training tokens, ..."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"SAEConfig.{name} must be an integer, got {v!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"SAE sizes must be positive: d_in={self.d_in}, d_sae={self.d_sae}")
        if self.k <= 0 or self.k >= self.d_sae:
            raise ConfigError(f"k must satisfy 0 < k < d_sae, got k={self.k} with d_sae={self.d_sae}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.relu_before_topk and not self.relu:
            raise ConfigError("relu_before_topk=True requires relu=True")


class EncoderOutput(NamedTuple):
    values: Tensor
    """Activations of the selected latents, [..., width] (width = k for topk; see `encode`)."""
    indices: Tensor
    """Latent index of each value, [..., width], int64. Padding entries have value 0."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction in the input's units, [..., d_in]."""
    values: Tensor
    """Selected latent activations, [..., width] (as `EncoderOutput.values`)."""
    indices: Tensor
    """Their latent indices, [..., width]."""
    fvu: Tensor
    """Fraction of variance unexplained Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (scalar)."""
    auxk_loss: Tensor
    """AuxK loss (dead latents fitting the detached residual), same normalisation as fvu; 0
    without a dead mask. Unweighted: the trainer multiplies by its aux coefficient."""
    fired: Tensor
    """[d_sae] bool: latents with a non-zero activation on some token of this batch."""


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations on points x [N, d]; deterministic, starts from the mean."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


class SparseAutoencoder(nn.Module):
    """TopK / BatchTopK sparse autoencoder on [..., d_in] activations.

    Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    Buffers: act_scale (scalar; inputs are multiplied by it before encoding, 1.0 = none) and
    threshold (scalar; BatchTopK inference threshold, an EMA of the smallest kept value).
    """

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.W_dec = nn.Parameter(W_dec.to(**kw))
        self.W_enc = nn.Parameter(W_dec.t().contiguous().to(**kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.register_buffer("act_scale", torch.ones((), **kw))
        # < 0 means "not estimated yet": the first training batch sets it directly.
        self.register_buffer("threshold", torch.full((), -1.0, **kw))

    @classmethod
    def from_config(cls, cfg: SAEConfig, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> "SparseAutoencoder":
        return cls(cfg, device=device, dtype=dtype, seed=seed)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # ------------------------------------------------------------------ encode

    def _check(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeError(f"SAE input has last dimension {x.shape[-1]}, expected d_in={self.cfg.d_in} "
                             f"(shape {tuple(x.shape)})")
        return x.reshape(-1, self.cfg.d_in)

    def _centred(self, x: Tensor) -> Tensor:
        """s·x − b_dec (or s·x), in the SAE's parameter dtype: [N, d_in]."""
        x = x.to(self.dtype) * self.act_scale
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def _preacts(self, xc: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, xc, self.W_enc)

    def _activate(self, v: Tensor) -> Tensor:
        return v.relu() if self.cfg.relu else v

    def _topk_indices(self, pre: Tensor, k: int) -> Tensor:
        score = pre.relu() if self.cfg.relu_before_topk else pre
        return score.topk(k, dim=-1, sorted=False).indices

    def _batch_topk_mask(self, pre: Tensor) -> Tensor:
        """[N, d_sae] bool: the top k·N (activated) pre-activations over the whole batch."""
        act = self._activate(pre)
        n = pre.shape[0]
        flat = act.reshape(-1).topk(min(self.cfg.k * n, act.numel()), sorted=False).indices
        mask = torch.zeros(act.numel(), dtype=torch.bool, device=pre.device)
        return mask.index_fill_(0, flat, True).view_as(act)

    @staticmethod
    def _dense_to_sparse(z: Tensor, width: int) -> EncoderOutput:
        values, indices = z.topk(width, dim=-1, sorted=False)
        return EncoderOutput(values, indices)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Sparse codes of x [..., d_in] → values, indices [..., width].

        topk: width = k, always (values are 0 where fewer than k latents are positive).
        batchtopk in eval mode: latents whose activated pre-activation exceeds `threshold`;
        width = the largest number of active latents on any token in this call (at least 1),
        other tokens padded with value 0 (this needs one host sync). In train mode batchtopk
        selects the top k·N over the call, with the same width rule. `encode_dense` gives the
        [..., d_sae] codes when a fixed width matters.
        """
        lead = x.shape[:-1]
        x2 = self._check(x)
        if self.cfg.architecture == "topk":
            xc = self._centred(x2)
            with torch.no_grad():
                pre = self._preacts(xc)
                idx = self._topk_indices(pre, self.cfg.k)
            values = self._activate(selected_preacts(xc, self.W_enc, self.b_enc, idx, pre))
            return EncoderOutput(values.reshape(*lead, -1), idx.reshape(*lead, -1))
        z = self._encode_dense_2d(x2)
        width = max(int((z != 0).sum(-1).max().item()) if z.numel() else 1, 1)
        out = self._dense_to_sparse(z, width)
        return EncoderOutput(out.values.reshape(*lead, width), out.indices.reshape(*lead, width))

    def _encode_dense_2d(self, x2: Tensor) -> Tensor:
        pre = self._preacts(self._centred(x2))
        if self.cfg.architecture == "topk":
            idx = self._topk_indices(pre, self.cfg.k)
            return torch.zeros_like(pre).scatter(-1, idx, self._activate(pre.gather(-1, idx)))
        act = self._activate(pre)
        if self.training:
            return act * self._batch_topk_mask(pre)
        return act * (act > self.threshold)

    def encode_dense(self, x: Tensor) -> Tensor:
        """Dense codes [..., d_sae] (zeros off the selected latents)."""
        lead = x.shape[:-1]
        return self._encode_dense_2d(self._check(x)).reshape(*lead, self.cfg.d_sae)

    # ------------------------------------------------------------------ decode

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction [..., d_in] in the input's units from codes [..., width]."""
        lead = values.shape[:-1]
        v2 = values.reshape(-1, values.shape[-1])
        i2 = indices.reshape(-1, indices.shape[-1])
        out = sparse_decode(v2, i2, self.W_dec) + self.b_dec
        return (out / self.act_scale).reshape(*lead, self.cfg.d_in)

    def decode_dense(self, z: Tensor) -> Tensor:
        return (z.to(self.dtype) @ self.W_dec + self.b_dec) / self.act_scale

    # ------------------------------------------------------------------ forward (training)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None) -> ForwardOutput:
        """Encode, decode and the training losses on x [..., d_in].

        dead_mask [d_sae] bool enables AuxK: among dead latents the top `k_aux` (default d_in // 2,
        at most d_sae) pre-activations of each token are decoded WITHOUT b_dec and fitted to the
        detached residual s·x − x̂; with fewer dead latents than k_aux only the dead ones are used
        (non-dead picks are zeroed, so no host sync is needed to count them) and the loss is
        scaled by n_dead / k_aux.
        """
        lead = x.shape[:-1]
        x2 = self._check(x)
        xs = x2.to(self.dtype) * self.act_scale  # target in scaled units: [N, d_in]
        xc = xs - self.b_dec if self.cfg.apply_b_dec_to_input else xs
        with torch.no_grad():
            pre = self._preacts(xc)  # [N, d_sae]

        if self.cfg.architecture == "topk":
            with torch.no_grad():
                idx = self._topk_indices(pre, self.cfg.k)
            order = self._order(idx)  # one sort for both backwards
            values = self._activate(selected_preacts(xc, self.W_enc, self.b_enc, idx, pre, order=order))
            recon = sparse_decode(values, idx, self.W_dec, order=order) + self.b_dec
            fired = torch.zeros(self.cfg.d_sae, dtype=values.dtype, device=values.device)
            fired = fired.scatter_reduce(0, idx.reshape(-1), (values.detach() != 0).reshape(-1).to(values.dtype),
                                         "amax") > 0
        else:
            pre_g = torch.addmm(self.b_enc, xc, self.W_enc)
            mask = self._batch_topk_mask(pre.detach())
            z = self._activate(pre_g) * mask  # [N, d_sae]
            recon = z @ self.W_dec + self.b_dec
            if self.training:
                self._update_threshold(z.detach(), mask)
            fired = (z.detach() != 0).any(0)
            # Reported codes: the top 4k per token of z (x̂ above is exact regardless).
            values, idx = z.topk(min(4 * self.cfg.k, self.cfg.d_sae), dim=-1, sorted=False)

        err = xs - recon
        total_variance = (xs - xs.mean(0)).pow(2).sum().clamp_min(torch.finfo(xs.dtype).tiny)
        fvu = err.pow(2).sum() / total_variance

        if dead_mask is not None:
            k_aux = pick_k_aux(self.cfg.d_in, self.cfg.d_sae, k_aux)
            with torch.no_grad():
                masked = torch.where(dead_mask[None], pre, torch.full_like(pre, -torch.inf))
                aux_idx = masked.topk(k_aux, dim=-1, sorted=False).indices
                aux_is_dead = dead_mask[aux_idx]  # [N, k_aux]
            aux_order = self._order(aux_idx)
            aux_vals = self._activate(selected_preacts(xc, self.W_enc, self.b_enc, aux_idx, pre, order=aux_order))
            aux_vals = aux_vals * aux_is_dead
            e_hat = sparse_decode(aux_vals, aux_idx, self.W_dec, order=aux_order)  # no b_dec: it is in the residual
            # Fewer dead latents than k_aux: weigh the loss down (as sparsify and SAELens do);
            # with none dead it is exactly 0. A tensor, so no host sync.
            scale = (dead_mask.sum() / k_aux).clamp(max=1.0).to(err.dtype)
            auxk_loss = scale * (e_hat - err.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = fvu.new_zeros(())

        x_hat = (recon / self.act_scale).reshape(*lead, self.cfg.d_in)
        return ForwardOutput(x_hat, values.reshape(*lead, -1), idx.reshape(*lead, -1), fvu, auxk_loss, fired)

    def _order(self, idx: Tensor) -> LatentOrder | None:
        """The latent order of a selection when a backward will need it (else no sort)."""
        if torch.is_grad_enabled() and (self.W_enc.requires_grad or self.W_dec.requires_grad):
            with torch.no_grad():
                return latent_order(idx, self.cfg.d_sae)
        return None

    @torch.no_grad()
    def _update_threshold(self, z: Tensor, mask: Tensor, decay: float = 0.99) -> None:
        # Smallest positive kept value of this batch; EMA across batches (no host sync).
        kept = torch.where(mask & (z > 0), z, torch.full_like(z, torch.inf)).min()
        kept = torch.where(torch.isfinite(kept), kept, self.threshold.clamp_min(0))
        new = torch.where(self.threshold < 0, kept, decay * self.threshold + (1 - decay) * kept)
        self.threshold.copy_(new)

    # ------------------------------------------------------------------ weight maintenance

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each W_dec row's gradient onto the row's orthogonal complement (rows unit norm),
        so the step does not fight the norm constraint."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)  # [d_sae, 1]
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Fold act_scale s into the weights and set it to 1; codes and x̂ are unchanged.

        pre = (s·x − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc and
        x̂ = (z W_dec + b_dec)/s = z (W_dec/s) + b_dec/s.
        """
        s = self.act_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        # The BatchTopK threshold acts on codes, which do not change.
        self.act_scale.fill_(1.0)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, architecture={c.architecture!r}"


def pick_k_aux(d_in: int, d_sae: int, k_aux: int | None = None) -> int:
    """AuxK width: the given value or d_in // 2 (Gao et al. Appendix B.1), at most d_sae."""
    return max(1, min(k_aux if k_aux is not None else d_in // 2, d_sae))


def lr_for(d_sae: int) -> float:
    """Default learning rate 2e-4 / sqrt(d_sae / 2^14) (Gao et al.; used by sparsify)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
