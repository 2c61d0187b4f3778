"""Reward functions for TRL's `GRPOTrainer`, and how they are composed into advantages.

- `OutcomeReward`: the task verifier, 1/0 per completion (a plain TRL reward function).
- `SAEFeatureReward`: a feature pack's score R = Σ_i w_i · pool_t(code_i(h_t)) over completion
  tokens, codes from the SAE's exact `encode` (`PackScorer.token_activations`, the function G1
  validated); trajectory-level (the pack's pooling) or per-token (Σ_i w_i · code_i(h_t)).
- `DirectionReward`: the G2 R2 baseline, the raw diff-of-means direction (correct − wrong
  mean-pooled residuals at the same layer); trajectory (mean-pooled h · dir) or per-token (h_t · dir).

Rewards that read hidden states (`HiddenStateReward`) never re-tokenise text: `MechGRPOTrainer`
(mechreward.grpo) captures their per-token values on the exact ids TRL scores, during the
forward TRL already runs, and hands them over before TRL calls the reward functions. Each call
checks that the `completion_ids` TRL passes are the ones captured.

Composition (`compose_advantages`): each reward is normalised within its group
((r − mean_group) / (std_group + eps)) *before* the weighted sum, and the sum is not
re-normalised, so the mech weight λ scales the mech term exactly: where outcomes tie within a
group the advantage is λ · z_mech, and doubling λ doubles it. (TRL's `normalize_then_sum`
re-normalises the sum by the batch std, which cancels λ when every group ties.) Per-token mode
(`dense_advantages`): trajectory advantage + λ · per-token mech score z-scored over the group's
real completion tokens (padding excluded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError, DataError, MismatchError, ShapeError


# --------------------------------------------------------------------------- outcome

def _completion_text(c: Any) -> str:
    """A completion as text: a string, or the content of the last message of a conversation."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        content = c[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return str(c)


class OutcomeReward:
    """1.0 when the task verifier accepts the completion, else 0.0 (reads the dataset column `answer_field`)."""

    def __init__(self, task, answer_field: str = "answer"):
        self.task = task
        self.answer_field = answer_field
        self.__name__ = "outcome"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if self.answer_field not in kwargs:
            raise DataError(f"OutcomeReward needs the dataset column {self.answer_field!r}; the batch has "
                            f"{sorted(k for k in kwargs if k not in ('trainer_state', 'log_metric', 'log_extra'))}")
        refs = kwargs[self.answer_field]
        return [1.0 if self.task.verify(_completion_text(c), str(a)) else 0.0 for c, a in zip(completions, refs)]


# --------------------------------------------------------------------------- hidden-state rewards

@dataclass
class CapturedBatch:
    """Per-token values of one reward on one batch, captured on the exact ids TRL scores."""

    token_values: torch.Tensor
    """`[N, m]`: the reward's m per-token quantities for the N real completion tokens, rows in
    order, positions in order (SAE: the pack's features' codes; direction: h_t · dir)."""
    lengths: list[int]
    """Real completion tokens of each of the B completions (sums to N)."""
    completion_ids: list[list[int]]
    """The ids the values were captured on (checked against what TRL passes the reward)."""


class HiddenStateReward(ABC):
    """Base class of rewards computed from the layer-`layer` residual of completion tokens.

    Subclasses define `token_values(hidden [N, d]) -> [N, m]`, `pool(values [n, m]) -> [m]`
    (one completion), `combine(pooled [B, m]) -> [B]` and `token_scores(values [N, m]) -> [N]`. `per_token=True` asks
    `MechGRPOTrainer` to use the per-token scores as a dense advantage term instead of a
    trajectory reward (the trajectory score is still returned to TRL, which logs it).
    """

    layer: int
    per_token: bool = False
    name: str = "mech"

    def __init__(self) -> None:
        self._batch: CapturedBatch | None = None

    # -- the math (subclasses)
    @abstractmethod
    def token_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token values of completion hidden states `[n, d]` → `[n, m]`."""

    @abstractmethod
    def pool(self, values: torch.Tensor) -> torch.Tensor:
        """Pool one completion's token values `[n, m]` → `[m]`."""

    @abstractmethod
    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        """Trajectory scores from pooled values `[B, m]` → `[B]`."""

    @abstractmethod
    def token_scores(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token scores `[n, m]` → `[n]` (dense mode)."""

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw trajectory scores `[B]` to the returned reward (identity unless normalised)."""
        return raw

    # -- derived
    def trajectory_scores(self, values: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """`[B]` trajectory scores from the `[N, m]` token values of B completions (NaN for an empty one)."""
        if not len(lengths):
            return torch.zeros(0)
        pooled = torch.stack([self.pool(v) if v.shape[0] else torch.full(values.shape[1:], float("nan"),
                                                                         device=values.device)
                              for v in torch.split(values, list(lengths))])  # [B, m]
        return self.finish(self.combine(pooled).float())

    def score(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trajectory scores `[B]` of hidden `[B, T, d]` (layer output) over `mask [B, T]` tokens."""
        if mask.shape != hidden.shape[:2]:
            raise DataError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
        mask = mask.bool()
        return self.trajectory_scores(self.token_values(hidden[mask]), mask.sum(1).tolist())

    # -- the trainer hands captured values over
    def set_batch(self, batch: CapturedBatch | None) -> None:
        self._batch = batch

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        b = self._batch
        if b is None:
            raise ConfigError(f"{type(self).__name__} reads hidden states captured by mechreward.grpo.MechGRPOTrainer; "
                              "it cannot run inside a plain GRPOTrainer")
        if completion_ids is not None and [list(map(int, c)) for c in completion_ids] != b.completion_ids:
            raise MismatchError(f"{type(self).__name__}: the completion ids TRL passes differ from the ids the hidden "
                                "states were captured on")
        scores = self.trajectory_scores(b.token_values, b.lengths)
        log_metric = kwargs.get("log_metric")
        finite = scores[torch.isfinite(scores)]
        if log_metric is not None and finite.numel():
            log_metric(f"mech/{self.name}_raw_mean", float(finite.mean()))
        return [None if not torch.isfinite(s) else float(s) for s in scores]


class SAEFeatureReward(HiddenStateReward):
    """A feature pack's score with the SAE's exact encoding and the pack's pooling (the G1 function).

    `normalise=True` returns (R − μ) / σ with the pack's discovery statistics (an affine map:
    no effect on group-normalised advantages, but comparable across runs in logs).
    """

    def __init__(self, pack, sae, per_token: bool = False, normalise: bool = True, model: str | None = None):
        from .probe import FeaturePack, PackScorer

        super().__init__()
        if isinstance(pack, (str, Path)):
            pack = FeaturePack.load(pack)
        self.pack = pack
        self.scorer = PackScorer(pack, sae) if model is None else pack.scorer(sae, model)
        if model is None:
            pack.check(sae)
        self.sae = sae
        self.layer = int(pack.layer)
        self.per_token = per_token
        self.normalise = normalise and bool(pack.normalisation)
        self.name = "sae"
        self.__name__ = "sae_feature_per_token" if per_token else "sae_feature"

    @classmethod
    def from_pack(cls, pack_path: str | Path, sae_path: str | Path | None = None, device=None, **kwargs):
        """Load the pack and its SAE (`pack.sae["path"]` unless `sae_path` is given); sha256 checked."""
        from .probe import FeaturePack
        from .sae.formats import load_sae

        pack = FeaturePack.load(pack_path)
        path = sae_path or pack.sae.get("path")
        if not path:
            raise DataError(f"{pack_path}: the pack records no SAE path; pass sae_path")
        return cls(pack, load_sae(path, device=device), **kwargs)

    def to(self, device) -> "SAEFeatureReward":
        from .probe import PackScorer

        self.sae = self.sae.to(device)
        self.scorer = PackScorer(self.pack, self.sae)
        return self

    @torch.no_grad()
    def token_values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scorer.token_activations(hidden)  # [N, m], exact sae.encode

    def pool(self, values: torch.Tensor) -> torch.Tensor:
        from .rollouts import pool_dense

        return pool_dense(values, self.pack.pooling)

    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.scorer.weights  # as PackScorer.__call__

    def token_scores(self, values: torch.Tensor) -> torch.Tensor:
        return values @ self.scorer.weights  # [N]

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scorer.normalise(raw) if self.normalise else raw


class DirectionReward(HiddenStateReward):
    """Raw diff-of-means direction at `layer`: trajectory = mean_t(h_t) · dir, per-token = h_t · dir."""

    def __init__(self, direction: torch.Tensor, layer: int, per_token: bool = False):
        super().__init__()
        self.direction = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)  # [d_model]
        if not torch.isfinite(self.direction).all() or self.direction.abs().sum() == 0:
            raise DataError("the direction is zero or not finite")
        self.layer = int(layer)
        self.per_token = per_token
        self.name = "direction"
        self.__name__ = "direction_per_token" if per_token else "direction"

    @classmethod
    def from_rollouts(cls, rollouts: str | Path, layer: int, questions: Sequence[str] | None = None, **kw):
        """mean(correct) − mean(wrong) of mean-pooled residuals at `layer` over rollouts of `questions` (None = all)."""
        import numpy as np

        from .probe import check_labels
        from .rollouts import RolloutSet

        rs = RolloutSet(rollouts)
        resid = rs.resid(layer, "mean").double()  # [R, d_model]
        keep = np.ones(len(rs), dtype=bool) if questions is None else np.isin(rs.question_ids, list(questions))
        lab = check_labels(rs.labels[keep], f"direction from {rollouts}")
        r = resid[torch.from_numpy(np.flatnonzero(keep))]
        lab_t = torch.from_numpy(lab).bool()
        return cls((r[lab_t].mean(0) - r[~lab_t].mean(0)).float(), layer, **kw)

    @classmethod
    def from_pack(cls, pack, **kw):
        """The pack's stored direction (`provenance["direction"]`) or, as G1 computes its direction
        control, the diff of means over the pack's discovery rollouts."""
        from .probe import FeaturePack

        if isinstance(pack, (str, Path)):
            pack = FeaturePack.load(pack)
        prov = pack.provenance or {}
        if prov.get("direction") is not None:
            return cls(torch.tensor(prov["direction"]), pack.layer, **kw)
        if not prov.get("rollouts"):
            raise DataError("the pack stores no direction and names no rollouts to compute one from")
        return cls.from_rollouts(prov["rollouts"], pack.layer, prov.get("discovery"), **kw)

    def to(self, device) -> "DirectionReward":
        self.direction = self.direction.to(device)
        return self

    @torch.no_grad()
    def token_values(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() @ self.direction.to(hidden.device))[:, None]  # [N, 1]

    def pool(self, values: torch.Tensor) -> torch.Tensor:
        return values.mean(0)

    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled[:, 0]

    def token_scores(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, 0]


# --------------------------------------------------------------------------- composition

SCALES = ("group", "batch", "none")


def _nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaN (NaN where fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (n - 1).clamp(min=1)
    var = torch.where(n > 1, var, torch.full_like(var, float("nan")))
    out = var.sqrt()
    return out if keepdim or dim is None else out.squeeze(dim)


def normalise_rewards(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                      eps: float = 1e-4) -> torch.Tensor:
    """Each column of `rewards [B, K]` centred on its group mean and divided by its group (or batch) std + eps.

    Rows of a group are consecutive (TRL's layout). A group whose rewards tie gives 0; NaN stays NaN.
    """
    if isinstance(scale, bool):  # TRL accepts True/False for "group"/"none"
        scale = "group" if scale else "none"
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; expected one of {SCALES}")
    B, K = rewards.shape
    if B % num_generations:
        raise ShapeError(f"{B} rewards do not split into groups of num_generations={num_generations}")
    g = rewards.view(-1, num_generations, K)
    centred = (g - torch.nanmean(g, dim=1, keepdim=True)).view(B, K)
    if scale == "none":
        return centred
    if scale == "group":
        std = _nanstd(g, dim=1, keepdim=True).nan_to_num(0.0).expand_as(g).reshape(B, K)
    else:
        std = _nanstd(rewards, dim=0, keepdim=True).nan_to_num(0.0).expand(B, K)
    return centred / (std + eps)


def compose_advantages(rewards: torch.Tensor, weights: Sequence[float] | torch.Tensor, num_generations: int,
                       scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Σ_k w_k · normalised reward k → advantages `[B]` (no re-normalisation of the sum; NaN terms skipped)."""
    w = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (rewards.shape[1],):
        raise ConfigError(f"{w.numel()} weights for {rewards.shape[1]} rewards")
    z = normalise_rewards(rewards, num_generations, scale, eps)
    return torch.nansum(z * w, dim=1)


def token_group_stats(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per completion: (Σ s, Σ s², n) over its real tokens → `[B, 3]` float64 (summed per group later)."""
    m = mask.to(torch.float64)
    s = scores.to(torch.float64) * m
    return torch.stack([s.sum(1), (s * s).sum(1), m.sum(1)], dim=1)


def dense_advantages(advantages: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, num_generations: int,
                     lam: float, eps: float = 1e-4, group_stats: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """Per-token advantages `[B, T]` = advantages[:, None] + λ · z(scores), zero on padding.

    z = (s − μ_g) / (σ_g + eps), μ_g and σ_g (unbiased) over the real completion tokens (`mask`)
    of all completions of the group. `group_stats` `[B_all, 3]` (from `token_group_stats`, gathered
    over processes) and `offset` (this process's first row in it) let groups span processes;
    None = the local batch holds whole groups.
    """
    if scores.shape != mask.shape or advantages.shape != scores.shape[:1]:
        raise ShapeError(f"advantages {tuple(advantages.shape)}, scores {tuple(scores.shape)} and mask "
                         f"{tuple(mask.shape)} do not fit together")
    stats = token_group_stats(scores, mask) if group_stats is None else group_stats.to(torch.float64)
    if stats.shape[0] % num_generations:
        raise ShapeError(f"{stats.shape[0]} completions do not split into groups of num_generations={num_generations}")
    g = stats.view(-1, num_generations, 3).sum(1)  # [n_groups, 3]
    n = g[:, 2]
    mean = g[:, 0] / n.clamp(min=1)
    var = (g[:, 1] - n * mean * mean) / (n - 1).clamp(min=1)
    std = var.clamp(min=0).sqrt()
    rows = (torch.arange(scores.shape[0], device=scores.device) + offset) // num_generations
    mu, sd = mean.to(scores.device)[rows], std.to(scores.device)[rows]
    z = (scores.to(torch.float64) - mu[:, None]) / (sd[:, None] + eps)
    m = mask.to(torch.float64)
    out = (advantages.to(torch.float64)[:, None] + lam * z) * m
    return out.to(advantages.dtype)


# --------------------------------------------------------------------------- pack checks (every command taking a pack)

def check_pack_fits(pack, model_name: str, n_layers: int, d_model: int, sae=None) -> None:
    """MismatchError, naming both sides, unless the pack was built for this model, a layer it has, its hidden
    size, and (with `sae`) this SAE (sha256, width, recorded layer)."""
    from .models import normalize_layer

    if pack.model != model_name:
        raise MismatchError(f"the pack was built for model {pack.model!r}, this run loads {model_name!r} "
                            "(model.name_or_path); use the pack G1 made for this model")
    if not -n_layers <= int(pack.layer) < n_layers:
        raise MismatchError(f"the pack reads layer {pack.layer}, model {model_name!r} has {n_layers} layers")
    if pack.sae.get("d_in") is not None and int(pack.sae["d_in"]) != int(d_model):
        raise MismatchError(f"the pack's SAE reads d_in={pack.sae['d_in']}, model {model_name!r} has hidden size "
                            f"{d_model}")
    if sae is not None:
        pack.check(sae)  # sha256 and d_sae
        layer = sae.cfg.metadata.get("layer")
        if isinstance(layer, int) and normalize_layer(layer, n_layers) != normalize_layer(int(pack.layer), n_layers):
            raise MismatchError(f"the SAE {sae.cfg.metadata.get('path')} hooks layer {layer}, the pack reads layer "
                                f"{pack.layer}")


def check_pack_verdict(pack, allow: bool, flag: str = "allow_failed_pack") -> dict:
    """Refuse a pack G1 failed (verdict FAIL) or never validated unless `allow` (the setting `flag`);
    returns what the report records: verdict and whether the refusal was overridden."""
    verdict = (pack.validation or {}).get("verdict")
    bad = verdict is None or verdict == "FAIL"
    if bad and not allow:
        what = "never validated by G1" if verdict is None else "failed G1 (verdict FAIL)"
        raise DataError(f"the feature pack ({pack.model}, layer {pack.layer}) {what}; a reward from it is not "
                        f"validated. Set {flag}=true to use it anyway (the report will say so)")
    if bad:
        import warnings

        warnings.warn(f"using a feature pack with G1 verdict {verdict} because {flag}=true", stacklevel=2)
    return {"verdict": verdict, "flags": (pack.validation or {}).get("flags"), "refusal_overridden": bool(bad),
            flag: bool(allow)}


MIS_SPECIFICATIONS = ("sign_flipped",)
"""Deliberate mis-specifications of a mech reward (`mis_specify=` of g2 and rl)."""


def mis_specify(reward: "HiddenStateReward", how: str | None) -> "HiddenStateReward":
    """A deliberately mis-specified copy of a mech reward, for a positive control of the hacking checks:
    `sign_flipped` negates the pack's weights (`FeaturePack.sign_flipped`) or the raw direction, so the reward
    favours what G1 found to go with wrong answers. `None` returns `reward` unchanged."""
    if how is None:
        return reward
    if how not in MIS_SPECIFICATIONS:
        raise ConfigError(f"mis_specify={how!r}: one of {list(MIS_SPECIFICATIONS)} or null (an honest reward)")
    if isinstance(reward, SAEFeatureReward):
        return SAEFeatureReward(reward.pack.sign_flipped(), reward.sae, per_token=reward.per_token,
                                normalise=reward.normalise)
    if isinstance(reward, DirectionReward):
        return DirectionReward(-reward.direction, reward.layer, per_token=reward.per_token)
    raise ConfigError(f"mis_specify={how!r} applies to the SAE or direction reward, not {type(reward).__name__}")

