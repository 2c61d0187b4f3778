"""Contrastive feature probe and the one feature-pack schema (`FeaturePack`).

Per SAE latent, on pooled codes of the discovery responses: Cohen's d (correct − wrong,
ddof=1), AUROC, fire rate and mean activation per class, Mann–Whitney p with BH q. Latents
that fire fewer than `min_fire_count` times are dropped. Selection (GATES.md G1 step 2):
top-N positive d → weight +1 ("helpful"), top-N negative d → −1 ("harmful"); options:
weights = d, other N, minimum fire count, the within-question contrast (`contrast=within`) and
length-residualised codes (`residualise_length=true`).

A `FeaturePack` is one JSON file: model, layer, hook, SAE reference + sha256, encoding and
pooling, features with weights and statistics, score normalisation, provenance and the
validation block G1 fills in. `pack.scorer(sae)` scores hidden states with the SAE's exact
encoding and the pack's pooling over completion tokens: R = Σ_i w_i · pooled_i. That same
scorer is the RL reward.

`python -m mechreward.probe` builds a pack from a rollout directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import io, stats
from .cli import hydra_command
from .errors import ConfigError, DataError, MismatchError
from .rollouts import POOLINGS, pool_dense
from .run import Run, markdown_table

PACK_SCHEMA = "mechreward.feature_pack"
PACK_VERSION = 1
WEIGHTINGS = ("sign", "d")
CONTRASTS = ("pooled", "within")


# --------------------------------------------------------------------------- statistics and selection

@dataclass
class SelectionConfig:
    """Which features enter a pack."""

    n_positive: int = 10
    """Features with the largest positive d ("helpful")."""
    n_negative: int = 10
    """Features with the most negative d ("harmful")."""
    weights: str = "sign"
    """`sign` (+1 / −1, published) or `d` (the effect size itself)."""
    min_fire_count: int = 1
    """Drop features active (pooled value ≠ 0) in fewer discovery responses than this."""
    contrast: str = "pooled"
    """`pooled` (published: correct vs wrong over all discovery responses) or `within`: each feature's
    codes minus their question's mean, on questions with >= 1 correct and >= 1 wrong response only
    (the contrast GRPO's group normalisation sees; needs several rollouts per question)."""
    residualise_length: bool = False
    """Select on codes with response length regressed out (per feature, least squares with an
    intercept on discovery); the pack still scores the raw codes."""


@dataclass
class FeatureStats:
    """Per-feature statistics on discovery, one entry per kept feature (arrays `[F_kept]`)."""

    index: np.ndarray
    """SAE latent index."""
    d: np.ndarray
    auroc: np.ndarray
    fire_rate_pos: np.ndarray
    """Fraction of correct responses where the feature is active."""
    fire_rate_neg: np.ndarray
    mean_pos: np.ndarray
    """Mean pooled activation over correct responses."""
    mean_neg: np.ndarray
    p: np.ndarray
    """Two-sided Mann–Whitney p."""
    q: np.ndarray
    """Benjamini–Hochberg q over the kept features."""
    fire_count: np.ndarray
    n_features: int
    """Latents before dropping (d_sae)."""

    def row(self, j: int) -> dict:
        return {"index": int(self.index[j]), "d": float(self.d[j]), "auroc": float(self.auroc[j]),
                "fire_rate_pos": float(self.fire_rate_pos[j]), "fire_rate_neg": float(self.fire_rate_neg[j]),
                "mean_pos": float(self.mean_pos[j]), "mean_neg": float(self.mean_neg[j]), "p": float(self.p[j]),
                "q": float(self.q[j]), "fire_count": int(self.fire_count[j])}


def extraction_hint(n_no_answer: int | None, n: int) -> str:
    """The sentence that says when grading, not the model, made responses wrong ('' when none did)."""
    if not n_no_answer:
        return ""
    return (f"; {n_no_answer} of these {n} responses have no extractable answer, so the grader (not the model) "
            "made them wrong: check the prompt asks for the answer format the grader reads, or set "
            "task.answer_extraction (e.g. [marked,last_number] or ['regex:answer is (-?[0-9]+)'])")


def check_labels(labels, what: str, no_answer=None) -> np.ndarray:
    """0/1 labels with at least two of each class (a ddof=1 variance per class), else DataError.

    `no_answer` (bool per response, optional): responses with no extractable answer; the error
    says how many there were when they are why there are too few correct ones."""
    lab = np.asarray(labels).astype(int)
    n_pos, n_neg = int(lab.sum()), int((1 - lab).sum())
    hint = extraction_hint(int(np.sum(no_answer)) if no_answer is not None else None, len(lab))
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{what}: labels are all {'correct' if n_neg == 0 else 'wrong'} ({len(lab)} responses); "
                        "need both correct and wrong responses" + (hint if n_pos == 0 else ""))
    if min(n_pos, n_neg) < 2:
        raise DataError(f"{what}: {n_pos} correct and {n_neg} wrong responses; need at least 2 of each"
                        + (hint if n_pos < 2 else ""))
    return lab


def residualise(x: np.ndarray, covariate) -> np.ndarray:
    """Columns of `x [n, F]` minus their least-squares fit on `covariate [n]` with an intercept."""
    z = np.asarray(covariate, dtype=np.float64)
    design = np.column_stack([np.ones(z.shape[0]), z])  # [n, 2]
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    return x - design @ coef


def feature_stats(pooled, labels, min_fire_count: int = 1, contrast: str = "pooled", groups=None,
                  lengths=None, residualise_length: bool = False) -> FeatureStats:
    """Statistics of every feature of `pooled [n, F]` against 0/1 `labels [n]`; never-firing ones dropped.

    Fire counts, fire rates and class means are of the raw pooled codes. d, AUROC, p and q are of
    the codes the selection contrasts: raw (`contrast="pooled"`), or centred on their question's
    mean over mixed questions (`contrast="within"`, needs `groups [n]`), after regressing out
    `lengths [n]` when `residualise_length`.
    """
    x = np.asarray(pooled, dtype=np.float64)
    lab = check_labels(labels, "feature statistics")
    if x.ndim != 2 or x.shape[0] != lab.shape[0]:
        raise DataError(f"pooled codes must be [n, F] with n = {lab.shape[0]} labels, got shape {x.shape}")
    if min_fire_count < 1:
        raise ConfigError(f"min_fire_count must be >= 1, got {min_fire_count}")
    if contrast not in CONTRASTS:
        raise ConfigError(f"unknown selection.contrast {contrast!r}; expected one of {CONTRASTS}")
    active = x != 0
    fire_count = active.sum(0)
    keep = np.flatnonzero(fire_count >= min_fire_count)
    if keep.size == 0:
        raise DataError(f"no feature fires in at least {min_fire_count} of {x.shape[0]} responses")
    xk = x[:, keep]
    pos, neg = xk[lab == 1], xk[lab == 0]
    xs, ls = xk, lab
    if residualise_length:
        if lengths is None:
            raise ConfigError("selection.residualise_length=true needs response lengths")
        xs = residualise(xs, lengths)
    if contrast == "within":
        if groups is None:
            raise ConfigError("selection.contrast=within needs the question id of every response")
        mixed = stats.mixed_questions(lab, groups)
        n_mixed = len(set(np.asarray(groups)[mixed].tolist()))
        if n_mixed < 2:
            raise DataError(f"selection.contrast=within: only {n_mixed} discovery question(s) have both a correct and "
                            "a wrong response; sample more rollouts per question (sampling.n) or use "
                            "selection.contrast=pooled")
        xs = stats.within_centre(xs[mixed], np.asarray(groups)[mixed])
        ls = check_labels(lab[mixed], "within-question feature statistics")
    spos, sneg = xs[ls == 1], xs[ls == 0]
    p = stats.mann_whitney_p(spos, sneg)
    return FeatureStats(
        index=keep, d=stats.cohens_d(spos, sneg), auroc=stats.auroc(xs, ls),
        fire_rate_pos=active[lab == 1][:, keep].mean(0), fire_rate_neg=active[lab == 0][:, keep].mean(0),
        mean_pos=pos.mean(0), mean_neg=neg.mean(0), p=p, q=stats.benjamini_hochberg(p),
        fire_count=fire_count[keep], n_features=x.shape[1])


def select_features(fs: FeatureStats, sel: SelectionConfig) -> list[dict]:
    """The pack's features: top positive d (+1) and top negative d (−1), with their statistics."""
    if sel.weights not in WEIGHTINGS:
        raise ConfigError(f"unknown selection.weights {sel.weights!r}; expected one of {WEIGHTINGS}")
    if sel.n_positive < 0 or sel.n_negative < 0 or sel.n_positive + sel.n_negative == 0:
        raise ConfigError(f"need n_positive, n_negative >= 0 and not both 0; got {sel.n_positive}, {sel.n_negative}")
    order = np.argsort(-fs.d, kind="stable")
    pos = [j for j in order if fs.d[j] > 0][:sel.n_positive]
    neg = [j for j in order[::-1] if fs.d[j] < 0][:sel.n_negative]
    out = []
    for j, role in [(j, "helpful") for j in pos] + [(j, "harmful") for j in neg]:
        w = float(np.sign(fs.d[j])) if sel.weights == "sign" else float(fs.d[j])
        out.append({**fs.row(j), "weight": w, "role": role})
    if not out:
        raise DataError("no feature has a non-zero effect size on discovery: the pack would be empty")
    return out


# --------------------------------------------------------------------------- the pack

@dataclass
class FeaturePack:
    """One versioned JSON schema for a feature pack (see module docstring)."""

    model: str
    """`name_or_path` of the model the SAE reads."""
    layer: int
    """Decoder layer whose output the SAE encodes (`hidden_states[layer + 1]`)."""
    hook: str
    sae: dict
    """SAE reference: path, sha256 (of the weights file), format, d_in, d_sae, k, architecture."""
    features: list[dict]
    """Each: index, weight, role, and its discovery statistics (d, auroc, fire rates, means, p, q)."""
    pooling: str = "mean"
    """How codes are pooled over completion tokens: mean, max, last, sum."""
    encoding: str = "sae.encode"
    """The SAE's exact encoding (TopK etc.), as `SparseAutoencoder.encode` computes it."""
    normalisation: dict = field(default_factory=dict)
    """`{"mean": μ, "std": σ}` of R on discovery; the normalised reward is (R − μ) / σ."""
    provenance: dict = field(default_factory=dict)
    """Data (rollouts, task), splits (question ids), seeds, selection settings, created."""
    validation: dict = field(default_factory=dict)
    """Filled in by G1 (rho, CI, verdict, ...); empty until validated."""
    schema: str = PACK_SCHEMA
    version: int = PACK_VERSION

    def __post_init__(self) -> None:
        if not self.features:
            raise DataError("a feature pack needs at least one feature (got 0)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        for f in self.features:
            if "index" not in f or "weight" not in f:
                raise DataError(f"pack feature {f!r} lacks an index or weight")

    @property
    def indices(self) -> list[int]:
        return [int(f["index"]) for f in self.features]

    @property
    def weights(self) -> list[float]:
        return [float(f["weight"]) for f in self.features]

    def score_pooled(self, pooled) -> np.ndarray:
        """R = Σ w_i · pooled_i for pooled codes `[n, d_sae]` (the pack's pooling) → `[n]`."""
        x = torch.as_tensor(pooled)
        if x.shape[-1] != self.sae["d_sae"]:
            raise MismatchError(f"pooled codes have {x.shape[-1]} latents, the pack's SAE has {self.sae['d_sae']}")
        w = torch.tensor(self.weights, dtype=torch.float64)
        return (x[:, self.indices].double() @ w).numpy()

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        if not self.features:
            raise DataError("refusing to save a feature pack with 0 features")
        io.write_json(path, self.to_dict())
        return Path(path)

    def sign_flipped(self) -> "FeaturePack":
        """A deliberately mis-specified copy: every weight negated (helpful ↔ harmful), so the score rewards
        what G1 found to go with wrong answers. Its provenance says so (`mis_specified`); the validation
        block is the original's. For checking that G2 and `rl`'s monitor catch a wrong reward."""
        import copy

        flip = {"helpful": "harmful", "harmful": "helpful"}
        out = copy.deepcopy(self)
        for f in out.features:
            f["weight"] = -float(f["weight"])
            if f.get("role") in flip:
                f["role"] = flip[f["role"]]
        out.provenance = {**out.provenance, "mis_specified": "sign_flipped"}
        return out

    @classmethod
    def load(cls, path: str | Path) -> "FeaturePack":
        import json

        path = Path(path)
        if not path.is_file():
            raise DataError(f"feature pack not found: {path}")
        try:
            obj = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("schema") != PACK_SCHEMA:
            raise DataError(f"{path}: not a feature pack (schema {obj.get('schema') if isinstance(obj, dict) else None!r},"
                            f" expected {PACK_SCHEMA!r})")
        if obj.get("version") != PACK_VERSION:
            raise DataError(f"{path}: feature pack version {obj.get('version')!r}; this mechreward reads {PACK_VERSION}")
        if not obj.get("features"):
            raise DataError(f"{path}: feature pack has 0 features")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise DataError(f"{path}: unknown feature-pack keys {unknown}")
        return cls(**obj)

    def check(self, sae=None, model: str | None = None, layer: int | None = None) -> None:
        """MismatchError unless `sae` has this pack's sha256 and `model`/`layer` are the pack's."""
        if sae is not None:
            sha = sae.cfg.metadata.get("sha256")
            if sha is None:
                raise MismatchError("the SAE records no sha256 (it was not loaded from disk); cannot check it is "
                                    f"the pack's SAE {self.sae.get('sha256')}: save and load it with mechreward.sae")
            if sha != self.sae.get("sha256"):
                raise MismatchError(f"this pack was built for the SAE with sha256 {self.sae.get('sha256')} "
                                    f"({self.sae.get('path')}), not for the SAE with sha256 {sha} "
                                    f"({sae.cfg.metadata.get('path')})")
            if sae.cfg.d_sae != self.sae.get("d_sae"):
                raise MismatchError(f"pack SAE d_sae {self.sae.get('d_sae')} != SAE d_sae {sae.cfg.d_sae}")
        if model is not None and model != self.model:
            raise MismatchError(f"this pack was built for model {self.model!r}, not {model!r}")
        if layer is not None and layer != self.layer:
            raise MismatchError(f"this pack reads layer {self.layer}, not layer {layer}")

    def scorer(self, sae, model: str | None = None) -> "PackScorer":
        self.check(sae, model)
        return PackScorer(self, sae)


class PackScorer:
    """R = Σ w_i · pool_t(code_i(h_t)) over completion tokens, codes from `sae.encode` (the RL reward)."""

    def __init__(self, pack: FeaturePack, sae):
        self.pack, self.sae = pack, sae
        device = sae.W_enc.device
        self.indices = torch.tensor(pack.indices, dtype=torch.long, device=device)  # [m]
        self.weights = torch.tensor(pack.weights, dtype=torch.float32, device=device)  # [m]
        # latent → column in the selection, or m (a discard column) when not selected
        self.lookup = torch.full((sae.cfg.d_sae,), len(pack.indices), dtype=torch.long, device=device)
        self.lookup[self.indices] = torch.arange(len(pack.indices), device=device)

    def token_activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """Selected features' codes per token: hidden `[N, d_in]` → `[N, m]` (exact `sae.encode`)."""
        enc = self.sae.encode(hidden)
        cols = self.lookup[enc.indices]  # [N, w]
        out = torch.zeros(hidden.shape[0], len(self.pack.indices) + 1, device=hidden.device)
        out.scatter_add_(1, cols, enc.values.float())
        return out[:, :-1]

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw score R per response: hidden `[B, T, d_in]` (layer output), mask `[B, T]` (completion tokens) → `[B]`."""
        if mask.shape != hidden.shape[:2]:
            raise DataError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
        mask = mask.bool()
        acts = self.token_activations(hidden[mask])  # [N, m]
        lengths = mask.sum(1).tolist()
        if min(lengths) == 0:
            raise DataError("a response has no completion tokens to score")
        pooled = torch.stack([pool_dense(a, self.pack.pooling) for a in torch.split(acts, lengths)])  # [B, m]
        return pooled @ self.weights

    def normalise(self, r: torch.Tensor) -> torch.Tensor:
        """(R − μ) / σ with the pack's discovery statistics."""
        n = self.pack.normalisation
        if not n:
            raise DataError("this pack has no score normalisation")
        return (r - n["mean"]) / n["std"]


def build_pack(pooled, labels, sae_ref: dict, model: str, layer: int, pooling: str,
               selection: SelectionConfig, provenance: dict | None = None, groups=None,
               lengths=None) -> tuple[FeaturePack, FeatureStats]:
    """Statistics, selection and normalisation on discovery pooled codes `[n, d_sae]` → a pack.

    `groups [n]` (question ids) and `lengths [n]` are needed by `selection.contrast=within` and
    `selection.residualise_length=true`.
    """
    fs = feature_stats(pooled, labels, selection.min_fire_count, selection.contrast, groups, lengths,
                       selection.residualise_length)
    feats = select_features(fs, selection)
    hook = sae_ref.get("hook") or f"model.layers.{layer}"
    pack = FeaturePack(model=model, layer=int(layer), hook=hook, sae=dict(sae_ref), features=feats, pooling=pooling,
                       provenance={**(provenance or {}), "selection": asdict(selection),
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "n_features_alive": int(fs.index.size), "n_features_total": fs.n_features})
    r = pack.score_pooled(pooled)
    sd = float(np.std(r, ddof=1)) if r.shape[0] > 1 else 0.0
    pack.normalisation = {"mean": float(np.mean(r)), "std": sd if sd > 0 else 1.0, "on": "discovery"}
    return pack, fs


# --------------------------------------------------------------------------- command

@dataclass
class ProbeConfig:
    """Config of `python -m mechreward.probe` (conf/probe.yaml): a pack from a rollout directory."""

    rollouts: str | None = None
    """Rollout directory with SAE codes (`python -m mechreward.rollouts`); null = sample the organism's
    default rollouts (`RolloutsConfig()`: arithmetic, its SAE) into the run dir first."""
    questions: list[str] | None = None
    """Question ids to build on (the discovery split); null = all."""
    pooling: str = "mean"
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    output: str | None = None
    """Pack path; null = `<run dir>/feature_pack.json`."""
    seed: int = 0


def run_probe(cfg: ProbeConfig, run: Run) -> dict:
    from .rollouts import RolloutsConfig, RolloutSet, generate_rollouts

    t0 = time.time()
    rs = RolloutSet(cfg.rollouts or generate_rollouts(RolloutsConfig(seed=cfg.seed), run))
    if not rs.header.get("sae"):
        raise DataError(f"rollouts at {rs.dir} hold no SAE codes (made with sae=null)")
    qids = rs.question_ids
    rows = np.arange(len(rs)) if cfg.questions is None else np.flatnonzero(np.isin(qids, cfg.questions))
    if cfg.questions is not None:
        missing = sorted(set(cfg.questions) - set(qids.tolist()))
        if missing:
            raise DataError(f"questions not in {rs.dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    pooled = rs.codes(cfg.pooling)[rows].numpy()
    labels = rs.labels[rows]
    pack, fs = build_pack(pooled, labels, rs.header["sae"], rs.model, rs.header["sae_layer"], cfg.pooling,
                          cfg.selection, provenance={"rollouts": str(rs.dir), "task": rs.header["task"],
                                                     "discovery": sorted(set(qids[rows].tolist())),
                                                     "sampling": rs.header["sampling"], "seed": cfg.seed},
                          groups=qids[rows], lengths=rs.lengths[rows])
    path = pack.save(cfg.output or run.path("feature_pack.json"))
    sig = int((fs.q < 0.05).sum())
    report = {"pack_path": str(path), "n_responses": int(len(rows)), "n_correct": int(labels.sum()),
              "n_features": len(pack.features), "n_features_alive": int(fs.index.size),
              "n_features_q_below_0_05": sig, "features": pack.features, "seconds": round(time.time() - t0, 1)}
    md = ["# Contrastive feature probe", "", f"rollouts `{rs.dir}`: {len(rows)} responses, {int(labels.sum())} correct; "
          f"{fs.index.size} of {fs.n_features} features fire at least {cfg.selection.min_fire_count}×; "
          f"{sig} with BH q < 0.05.", "", f"pack `{path}` ({cfg.pooling} pooling):", "",
          markdown_table(pack.features, ["index", "role", "weight", "d", "auroc", "fire_rate_pos", "fire_rate_neg",
                                         "mean_pos", "mean_neg", "q"])]
    run.write_report(report, "\n".join(md))
    return report


main = hydra_command("probe", ProbeConfig, run_probe)

if __name__ == "__main__":
    main()
