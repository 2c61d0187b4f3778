"""`python -m mechreward.layermap`: S4-L0, which layer gets the SAE (GATES.md).

1. One response per question (greedy by default), graded; one teacher-forced pass hooking
   every layer, each layer's residual mean-pooled over response tokens (`mechreward.rollouts`).
2. Per layer: per-dimension Cohen's d (correct − wrong, ddof=1) and the published score, the
   sum of the top-10 |d|; plus a cross-validated diff-of-means probe AUROC (robust to the
   max-over-many-dimensions bias of the published score).
3. Logit-lens commit layer: final norm + LM head on each layer's pooled residual (the
   reference skipped the norm; we apply it), probability of the answer-marker tokens, commit
   layer = argmax of the layer-to-layer increase.
4. Recommended layer: hybrid models (linear + full attention, e.g. Qwen3.5/3.6) take the peak if
   it is a full-attention layer, else the next full-attention layer downstream; dense models
   take the peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import stats
from .cli import hydra_command
from .errors import ConfigError, DataError
from .models import ModelConfig, find_final_norm, layer_types, load_model, num_layers, unwrap
from .rollouts import RolloutsConfig, RolloutSet, SAERef, SamplingConfig, generate_rollouts, load_rollouts
from .run import Run, markdown_table
from .tasks import TaskConfig

PEAK_METRICS = ("d_top10", "probe_auroc")


@dataclass
class LayermapConfig:
    """Config of `python -m mechreward.layermap` (conf/layermap.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(greedy=True))
    rollouts: str | None = None
    """Reuse a rollout directory that captured every layer (no sampling then)."""
    top: int = 10
    """Layer score = sum of the `top` largest |d| (published: 10)."""
    folds: int = 5
    """Folds of the cross-validated diff-of-means probe."""
    peak_metric: str = "d_top10"
    """`d_top10` (published) or `probe_auroc`: which per-layer score picks the peak."""
    markers: list[str] = field(default_factory=lambda: ["####"])
    """Answer-marker strings for the logit lens (the first token of each, with and without a leading space)."""
    seed: int = 0


# --------------------------------------------------------------------------- per-layer separability

def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Test-index arrays of `folds` folds, each class spread evenly over them."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for j, i in enumerate(idx):
            out[j % folds].append(int(i))
    return [np.array(sorted(f)) for f in out]


def cv_probe_auroc(x: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out AUROC of a diff-of-means direction (mean_correct − mean_wrong of the training folds).

    x `[n, d]`, labels `[n]` 0/1. Each fold holds both classes (needs ≥ folds of each).
    """
    labels = np.asarray(labels).astype(int)
    n_min = int(min(labels.sum(), (1 - labels).sum()))
    if folds < 2 or n_min < folds:
        raise DataError(f"a {folds}-fold probe needs at least {max(folds, 2)} responses of each class; "
                        f"the smaller class has {n_min}")
    aurocs = []
    for test in stratified_folds(labels, folds, seed):
        train = np.setdiff1d(np.arange(len(labels)), test)
        w = x[train][labels[train] == 1].mean(0) - x[train][labels[train] == 0].mean(0)
        aurocs.append(stats.auroc(x[test] @ w, labels[test]))
    return float(np.mean(aurocs))


def layer_table(pooled: dict[int, np.ndarray], labels, top: int = 10, folds: int = 5, seed: int = 0) -> list[dict]:
    """One row per layer: `d_top10` (sum of the top |d|), `max_abs_d`, `probe_auroc`."""
    lab = np.asarray(labels).astype(int)
    stats._as_labels(lab)  # both classes present, else DataError
    rows = []
    for layer in sorted(pooled):
        x = np.asarray(pooled[layer], dtype=np.float64)  # [n, d]
        d = np.abs(stats.cohens_d(x[lab == 1], x[lab == 0]))  # [d]
        rows.append({"layer": int(layer), "d_top10": float(np.sort(d)[::-1][:top].sum()),
                     "max_abs_d": float(d.max()), "probe_auroc": cv_probe_auroc(x, lab, folds, seed)})
    return rows


def peak_layer(rows: Sequence[dict], metric: str = "d_top10") -> int:
    if metric not in PEAK_METRICS:
        raise ConfigError(f"unknown peak_metric {metric!r}; expected one of {PEAK_METRICS}")
    return int(max(rows, key=lambda r: r[metric])["layer"])


def is_hybrid(types: Sequence[str] | None) -> bool:
    return bool(types) and "full_attention" in types and any(t != "full_attention" for t in types)


def recommend_layer(peak: int, types: Sequence[str] | None) -> tuple[int, str]:
    """The SAE layer for a peak, and why (GATES.md S4-L0 step 5)."""
    if not is_hybrid(types):
        return peak, "dense model: the peak layer"
    if types[peak] == "full_attention":
        return peak, "hybrid model: the peak is a full-attention layer"
    down = [i for i in range(peak + 1, len(types)) if types[i] == "full_attention"]
    if down:
        return down[0], f"hybrid model: peak L{peak} is {types[peak]}; next full-attention layer downstream"
    up = [i for i in range(peak) if types[i] == "full_attention"]
    return up[-1], f"hybrid model: no full-attention layer after L{peak}; nearest one upstream"


# --------------------------------------------------------------------------- logit lens

def marker_token_ids(tokenizer, markers: Sequence[str]) -> list[int]:
    """First token of each marker, written with and without a leading space."""
    ids = set()
    for m in markers:
        for s in (m, " " + m):
            toks = tokenizer(s, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(int(toks[0]))
    if not ids:
        raise ConfigError(f"answer markers {list(markers)} tokenise to nothing")
    return sorted(ids)


@torch.no_grad()
def logit_lens_marker_prob(model, pooled: dict[int, torch.Tensor], marker_ids: Sequence[int]) -> dict[int, float]:
    """Mean over responses of P(marker tokens) from final norm + LM head on each layer's pooled residual."""
    norm = find_final_norm(model)
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no output embeddings for a logit lens")
    device = next(model.parameters()).device
    dtype = next(head.parameters()).dtype
    out = {}
    for layer, x in sorted(pooled.items()):
        h = x.to(device, dtype)
        if norm is not None:
            h = norm(h)
        probs = torch.softmax(head(h).float(), dim=-1)  # [n, vocab]
        out[layer] = float(probs[:, list(marker_ids)].sum(-1).mean())
    return out


def commit_layer(prob: dict[int, float]) -> int:
    """Layer with the largest increase of marker probability over the layer before it."""
    layers = sorted(prob)
    if len(layers) < 2:
        return layers[0]
    inc = {l: prob[l] - prob[p] for p, l in zip(layers, layers[1:])}
    return int(max(inc, key=inc.get))


# --------------------------------------------------------------------------- command

def layermap_figure(rows: list[dict], commit: int, peak: int, recommended: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(layers, [r["d_top10"] for r in rows], "o-", color="C0", label="sum of top-10 |d|")
    ax.set_xlabel("layer")
    ax.set_ylabel("sum of top-10 |Cohen's d|", color="C0")
    ax2 = ax.twinx()
    ax2.plot(layers, [r["probe_auroc"] for r in rows], "s--", color="C1", label="CV probe AUROC")
    ax2.set_ylabel("diff-of-means probe AUROC (CV)", color="C1")
    ax.axvline(commit, color="gray", ls=":", label=f"commit L{commit}")
    ax.axvline(recommended, color="C2", ls="-", alpha=0.5, label=f"recommended L{recommended}")
    ax.plot([peak], [next(r["d_top10"] for r in rows if r["layer"] == peak)], "*", ms=14, color="C3",
            label=f"peak L{peak}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def run_layermap(cfg: LayermapConfig, run: Run) -> dict:
    t0 = time.time()
    model, tokenizer = load_model(cfg.model)
    n_layers = num_layers(model)
    if cfg.rollouts:
        rs = load_rollouts(cfg.rollouts, model=cfg.model.name_or_path)
    else:
        rcfg = RolloutsConfig(model=cfg.model, task=cfg.task, sampling=cfg.sampling, sae=SAERef(path=None),
                              layers=list(range(n_layers)), store_token_codes=False, seed=cfg.seed)
        rs = RolloutSet(generate_rollouts(rcfg, run, model, tokenizer))
    missing = [l for l in range(n_layers) if l not in rs.layers]
    if missing:
        raise DataError(f"rollouts at {rs.dir} lack layers {missing}; the layer map needs every layer")
    labels = rs.labels
    if labels.min() == labels.max():
        raise DataError(f"all {len(labels)} responses in {rs.dir} are {'correct' if labels[0] else 'wrong'}: "
                        "the layer map needs both correct and wrong responses (more questions, or another task)")
    pooled = {l: rs.resid(l, "mean") for l in range(n_layers)}
    rows = layer_table({l: p.numpy() for l, p in pooled.items()}, labels, cfg.top, cfg.folds, cfg.seed)
    marker_ids = marker_token_ids(tokenizer, cfg.markers)
    prob = logit_lens_marker_prob(model, pooled, marker_ids)
    for r in rows:
        r["marker_prob"] = prob[r["layer"]]
        r["layer_type"] = (layer_types(model) or ["dense"] * n_layers)[r["layer"]]
    peak = peak_layer(rows, cfg.peak_metric)
    commit = commit_layer(prob)
    recommended, why = recommend_layer(peak, layer_types(model))
    fig = layermap_figure(rows, commit, peak, recommended)
    run.save_figure(fig, "layermap.png")
    report = {"layers": rows, "peak_layer": peak, "peak_metric": cfg.peak_metric, "commit_layer": commit,
              "recommended_layer": recommended, "recommendation": why, "marker_token_ids": marker_ids,
              "logit_lens": "final norm + LM head on the response-mean residual of each layer",
              "n_responses": len(rs), "n_correct": int(labels.sum()), "accuracy": float(labels.mean()),
              "model": cfg.model.name_or_path, "rollouts_dir": str(rs.dir), "prompt_format": rs.header.get("prompt_format"),
              "seconds": round(time.time() - t0, 1)}
    md = ["# S4-L0 layer map", "",
          f"model `{cfg.model.name_or_path}`, {len(rs)} responses ({int(labels.sum())} correct), "
          f"{'greedy' if cfg.sampling.greedy else 'sampled'} decoding", "",
          f"**peak L{peak}** (by {cfg.peak_metric}), **commit L{commit}**, **recommended SAE layer L{recommended}** "
          f"({why}).", "",
          "Layer score: sum of the top-10 |Cohen's d| of the response-mean residual (published), and the mean "
          f"held-out AUROC of a {cfg.folds}-fold diff-of-means probe. Logit lens: the final norm and LM head are "
          f"applied to each layer's pooled residual (the reference skipped the norm); marker tokens {marker_ids} "
          f"(first token of {cfg.markers}); commit = argmax of the layer-to-layer increase in their probability.", "",
          markdown_table(rows, ["layer", "layer_type", "d_top10", "max_abs_d", "probe_auroc", "marker_prob"]),
          "![layer map](layermap.png)", ""]
    run.write_report(report, "\n".join(md))
    return report


main = hydra_command("layermap", LayermapConfig, run_layermap)

if __name__ == "__main__":
    main()
