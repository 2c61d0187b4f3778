"""One SAE training step, and everything needed to resume it bitwise.

    sae = SparseAutoencoder.from_config(SAEConfig(d_in=2048, d_sae=32768, k=128))
    trainer = SAETrainer(sae, TrainerConfig(), total_steps=10_000)
    for x in batches:                      # x: [B, d_in]
        out = trainer.step(x)              # tensors stay on the device
        if step % 100 == 0: log(out.fvu.item(), ...)

No host sync happens inside `step`: the dead-latent mask is only switched on once the host-side
token count can make a latent dead, and AuxK is computed without counting dead latents.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, ShapeError
from .model import SparseAutoencoder, geometric_median, lr_for, pick_k_aux

WARMUP_MAX_FRACTION = 0.1
"""Short runs: warm-up is capped at this fraction of the total steps."""


@dataclass
class TrainerConfig:
    """Optimisation of one SAE (defaults from Gao et al. 2024 and EleutherAI sparsify)."""

    lr: float | None = None
    """Adam learning rate; None → 2e-4 / sqrt(d_sae / 2^14)."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.999
    """Adam β2."""
    warmup_steps: int = 1000
    """Linear warm-up from ~0 (capped at 10% of the total steps for short runs)."""
    decay_fraction: float = 0.2
    """Linear decay to 0 over this final fraction of the steps (0 disables)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 or less disables)."""
    auxk: bool = True
    """Train dead latents with the AuxK loss."""
    k_aux: int | None = None
    """Dead latents per token in AuxK; None → d_in // 2 (at most d_sae)."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead. None = scale with the run:
    a fifth of its training tokens, at most 10M (sparsify's fixed 10M), at least one batch
    (so a 600k-token run counts latents dead after 120k tokens instead of never)."""
    init_b_dec: str = "geometric_median"
    """`geometric_median` or `mean` of the first batch (or `zeros`)."""
    normalize_activations: bool = True
    """Scale inputs to unit mean squared norm (estimated on the first batch, kept in
    act_scale and folded into the weights at save)."""
    autocast: str = "auto"
    """`bfloat16`, `none`, or `auto` (bfloat16 on CUDA, none on CPU). Weights stay fp32."""
    seed: int = 0
    """Seed of the weight initialisation done by `initialize`."""

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def __post_init__(self) -> None:
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"init_b_dec={self.init_b_dec!r}; expected geometric_median, mean or zeros")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise ConfigError(f"autocast={self.autocast!r}; expected auto, bfloat16 or none")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise ConfigError(f"dead_tokens={self.dead_tokens} must be positive (or null: scale with the run)")


DEAD_TOKENS_MAX = 10_000_000
DEAD_TOKENS_RUN_FRACTION = 0.2


def resolve_dead_tokens(dead_tokens: int | None, run_tokens: int, batch_tokens: int) -> int:
    """`TrainerConfig.dead_tokens`, with None resolved for a run of `run_tokens` tokens."""
    if dead_tokens is not None:
        return int(dead_tokens)
    return max(int(batch_tokens), min(DEAD_TOKENS_MAX, int(DEAD_TOKENS_RUN_FRACTION * run_tokens)))


class StepOutput(NamedTuple):
    loss: Tensor
    """fvu + aux_coef · auxk_loss (scalar, on device)."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch."""
    auxk_loss: Tensor
    """Unweighted AuxK loss (0 while no latent can be dead)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    dead_fraction: Tensor
    """Fraction of latents not fired for `dead_tokens` tokens (after this step)."""
    lr: float
    """Learning rate used for this step."""


class SAETrainer:
    """Adam on a `SparseAutoencoder` with unit-norm decoder rows, AuxK and dead-latent tracking."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainerConfig | None = None, total_steps: int = 1,
                 device: torch.device | str | None = None, world=None):
        """`world` (a `mechreward.distributed.World` of several ranks) makes the step data parallel:
        each rank passes its slice of the global batch and all ranks follow the one-process run."""
        self.cfg = cfg = cfg or TrainerConfig()
        self.data_parallel = None
        if world is not None and world.enabled:
            from ..distributed import DataParallel

            self.data_parallel = DataParallel(world)
        if total_steps <= 0:
            raise ConfigError(f"total_steps={total_steps} must be positive")
        self.total_steps = int(total_steps)
        self.sae = sae.to(device) if device is not None else sae
        self.device = self.sae.device
        self.base_lr = cfg.lr if cfg.lr is not None else lr_for(sae.cfg.d_sae)
        self.k_aux = pick_k_aux(sae.cfg.d_in, sae.cfg.d_sae, cfg.k_aux)
        kw: dict[str, Any] = {}
        if self.device.type in ("cuda", "cpu"):  # one pass over each parameter instead of ~6
            kw["fused"] = True
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=cfg.betas, **kw)
        self.step_count = 0
        self.tokens_seen = 0
        self.initialized = False
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=self.device)
        self.dead_tokens: int | None = cfg.dead_tokens
        """Resolved at the first step from the global batch size when the config says None."""
        ac = cfg.autocast
        if ac == "auto":
            ac = "bfloat16" if self.device.type == "cuda" else "none"
        self.autocast_dtype = torch.bfloat16 if ac == "bfloat16" else None

    # ------------------------------------------------------------------ schedule

    def lr_at(self, step: int) -> float:
        """Warm-up, constant, then linear decay to 0 over the last `decay_fraction` of steps."""
        total = self.total_steps
        warmup = min(self.cfg.warmup_steps, int(WARMUP_MAX_FRACTION * total))
        factor = 1.0
        if warmup > 0 and step < warmup:
            factor = (step + 1) / warmup
        decay_steps = int(round(self.cfg.decay_fraction * total))
        decay_start = total - decay_steps
        if decay_steps > 0 and step >= decay_start:
            factor = min(factor, max(0.0, (total - step) / decay_steps))
        return self.base_lr * factor

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def initialize(self, x: Tensor, reinit_weights: bool = True) -> None:
        """Data-dependent initialisation from a first batch x [B, d_in].

        act_scale = 1 / sqrt(mean ‖x‖²) (when normalize_activations); b_dec = geometric median
        (or mean) of the scaled batch; W_dec random unit rows from `seed` and W_enc = W_decᵀ.
        """
        sae = self.sae
        x = self._check(x).to(sae.dtype)
        if reinit_weights:
            g = torch.Generator().manual_seed(self.cfg.seed)
            W = torch.randn(sae.cfg.d_sae, sae.cfg.d_in, generator=g, dtype=torch.float32)
            sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.t())
            sae.b_enc.zero_()
        if self.cfg.normalize_activations:
            msn = x.double().pow(2).sum(-1).mean()
            if not msn > 0:
                raise DataError("cannot normalise activations: the first batch has zero norm")
            sae.act_scale.fill_(float(msn.rsqrt()))
        xs = x * sae.act_scale
        if self.cfg.init_b_dec == "geometric_median":
            sae.b_dec.copy_(geometric_median(xs).to(sae.dtype))
        elif self.cfg.init_b_dec == "mean":
            sae.b_dec.copy_(xs.mean(0))
        else:
            sae.b_dec.zero_()
        self.initialized = True

    def _check(self, x: Tensor) -> Tensor:
        d_in = self.sae.cfg.d_in
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ShapeError(f"training batch has shape {tuple(x.shape)}, expected [batch, {d_in}]")
        if x.shape[0] == 0:
            raise DataError("empty training batch")
        return x.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ step

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= (self.dead_tokens if self.dead_tokens is not None else DEAD_TOKENS_MAX)

    def step(self, x: Tensor) -> StepOutput:
        """One optimiser step on x [B, d_in]. No host sync; outputs stay on the device."""
        x = self._check(x)
        dp = self.data_parallel
        if not self.initialized:
            self.initialize(dp.gather_batch(x) if dp else x)
        sae, cfg = self.sae, self.cfg
        sae.train()
        n_tokens = x.shape[0] * (dp.world.world_size if dp else 1)
        if self.dead_tokens is None:
            self.dead_tokens = resolve_dead_tokens(None, self.total_steps * n_tokens, n_tokens)

        # Host-side bound: no latent can be dead before dead_tokens tokens were seen.
        dead = self.dead_mask() if cfg.auxk and self.tokens_seen >= self.dead_tokens else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = sae(x, dead_mask=dead, k_aux=self.k_aux)
            loss = out.fvu + cfg.aux_coef * out.auxk_loss if dead is not None else out.fvu
        fvu, auxk_loss, fired = out.fvu, out.auxk_loss, out.fired
        if dp:  # this rank's share of the global-batch loss; gradients summed over ranks below
            share = dp.variance_share(x.to(sae.dtype) * sae.act_scale)
            loss, fvu, auxk_loss = loss * share, fvu * share, auxk_loss * share

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dp:
            dp.sum_grads(sae.parameters())
            fired = dp.any(fired)
            loss, fvu, auxk_loss = dp.sum(torch.stack([loss.detach(), fvu.detach(), auxk_loss.detach()])).unbind()
        sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip, foreach=True)
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

        with torch.no_grad():
            self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
            l0 = (out.values != 0).sum(-1).float().mean()
            if dp:
                l0 = dp.sum(l0) / dp.world.world_size
            dead_fraction = self.dead_mask().float().mean()
        self.tokens_seen += n_tokens
        self.step_count += 1
        return StepOutput(loss.detach(), fvu.detach(), auxk_loss.detach(), l0, dead_fraction, lr)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything a bitwise-identical resume needs (tensors cloned to CPU)."""
        return {
            "sae": {k: v.detach().cpu().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "initialized": self.initialized,
            "total_steps": self.total_steps,
            "tokens_since_fired": self.tokens_since_fired.detach().cpu().clone(),
            "trainer_config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("sae", "optimizer", "step", "tokens_seen", "tokens_since_fired") if k not in state]
        if missing:
            raise ConfigError(f"trainer state is missing {missing}")
        if state.get("total_steps", self.total_steps) != self.total_steps:
            raise ConfigError(f"trainer state was made for total_steps={state['total_steps']}, "
                              f"this trainer has total_steps={self.total_steps}")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.initialized = bool(state.get("initialized", True))
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def effective_warmup(cfg: TrainerConfig, total_steps: int) -> int:
    return min(cfg.warmup_steps, int(WARMUP_MAX_FRACTION * total_steps))


__all__ = ["TrainerConfig", "SAETrainer", "StepOutput", "effective_warmup", "resolve_dead_tokens"]
