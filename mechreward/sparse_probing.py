"""`python -m mechreward.sparse_probing`: k-sparse probes on SAE features vs dense probes on the raw residual.

For a labelled text set: pool each text's SAE codes and raw residual at the SAE's layer
(`last` token by default, or `mean` over the text's tokens), split into train / test
(stratified, seeded), rank features on train by |Cohen's d| between the classes, and fit an
L2-regularised logistic regression (scipy L-BFGS on standardised inputs) on:

- the top-k SAE features, for k in `ks` (published: 1, 2, 5, 10, 20);
- the top-k raw residual dimensions ranked the same way (same k);
- the whole raw residual (the dense baseline).

Reports held-out accuracy (and AUROC) of each, and the majority-class baseline.

Default labelled set, on the organism: arithmetic prompts (`"Q: 12+7-3=?\\nA:"`), label =
the answer is negative, read at the last prompt token, before the model writes anything: the
model must have computed the sign to know it. Other data: `texts=<file.jsonl>` with a text and
a 0/1 label per row (`text_field`, `label_field`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import optimize

from . import stats
from .cli import hydra_command
from .errors import ConfigError, DataError
from .models import ModelConfig, ResidualCapture, load_model, num_layers
from .rollouts import SAERef, layers_sae, load_sae_for, sae_reference
from .run import Run, markdown_table
from .tasks import TaskConfig, load_task


@dataclass
class SparseProbingConfig:
    """Config of `python -m mechreward.sparse_probing` (conf/sparse_probing.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAERef = field(default_factory=SAERef)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n=1200))
    """Default labelled set: this task's prompts, label = the reference answer is negative."""
    texts: str | None = None
    """A .jsonl file of labelled texts instead (one {text, label} object per line)."""
    text_field: str = "text"
    label_field: str = "label"
    pooling: str = "last"
    """`last` (the text's last token) or `mean` (over its tokens)."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    test_fraction: float = 0.3
    l2: float = 1e-3
    """L2 penalty on the (standardised) weights, per example."""
    batch_size: int = 64
    seed: int = 0


# --------------------------------------------------------------------------- logistic regression

class LogisticModel:
    """L2-regularised logistic regression on standardised inputs (scipy L-BFGS, exact gradient)."""

    def __init__(self, l2: float = 1e-3):
        self.l2 = l2

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LogisticModel":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.mu = x.mean(0)
        sd = x.std(0)
        self.sd = np.where(sd > 0, sd, 1.0)
        z = (x - self.mu) / self.sd
        n, d = z.shape

        def loss(theta):
            w, b = theta[:d], theta[d]
            m = z @ w + b
            # log(1 + e^m) − y·m, computed stably
            nll = np.mean(np.logaddexp(0.0, m) - y * m) + 0.5 * self.l2 * (w @ w)
            p = 1.0 / (1.0 + np.exp(-m))
            g = p - y
            return nll, np.concatenate([z.T @ g / n + self.l2 * w, [g.mean()]])

        res = optimize.minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                                options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-15})
        self.w, self.b = res.x[:d], res.x[d]
        self.converged = bool(res.success)
        return self

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mu) / self.sd) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision(x) > 0).astype(int)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays with each class split in the same proportion."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:max(1, int(round(test_fraction * idx.size)))])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(labels.size), test), test


def rank_by_effect(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Column indices by descending |Cohen's d| (class 1 − class 0); never-varying columns last."""
    d = np.abs(stats.cohens_d(x[labels == 1], x[labels == 0]))
    return np.argsort(-d, kind="stable")


def probe_accuracies(sae_x: np.ndarray, resid_x: np.ndarray, labels: np.ndarray, ks, test_fraction: float = 0.3,
                     l2: float = 1e-3, seed: int = 0) -> dict:
    """Held-out accuracy / AUROC of top-k SAE-feature probes, top-k residual-dimension probes and the full residual."""
    y = np.asarray(labels).astype(int)
    stats._as_labels(y)
    tr, te = stratified_split(y, test_fraction, seed)
    if min(y[tr].sum(), (1 - y[tr]).sum()) < 2 or min(y[te].sum(), (1 - y[te]).sum()) < 1:
        raise DataError(f"too few examples of a class for a train/test split: {int(y.sum())} positive, "
                        f"{int((1 - y).sum())} negative")

    def fit(x):
        m = LogisticModel(l2).fit(x[tr], y[tr])
        s = m.decision(x[te])
        return {"accuracy": float(np.mean((s > 0).astype(int) == y[te])), "auroc": float(stats.auroc(s, y[te])),
                "converged": m.converged}

    sae_rank = rank_by_effect(sae_x[tr], y[tr])
    res_rank = rank_by_effect(resid_x[tr], y[tr])
    rows = []
    for k in ks:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        s = fit(sae_x[:, sae_rank[:k]])
        r = fit(resid_x[:, res_rank[:min(k, resid_x.shape[1])]])
        rows.append({"k": int(k), "sae_accuracy": s["accuracy"], "sae_auroc": s["auroc"],
                     "resid_topk_accuracy": r["accuracy"], "resid_topk_auroc": r["auroc"],
                     "sae_features": sae_rank[:k].tolist()})
    full = fit(resid_x)
    majority = float(max(y[te].mean(), 1 - y[te].mean()))
    return {"per_k": rows, "resid_full_accuracy": full["accuracy"], "resid_full_auroc": full["auroc"],
            "majority_accuracy": majority, "n_train": int(tr.size), "n_test": int(te.size),
            "positive_fraction": float(y.mean())}


# --------------------------------------------------------------------------- data

def labelled_texts(cfg: SparseProbingConfig) -> tuple[list[str], np.ndarray, str]:
    if cfg.texts:
        path = Path(cfg.texts)
        if not path.is_file():
            raise DataError(f"labelled text file not found: {cfg.texts!r}")
        texts, labels = [], []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if cfg.text_field not in row or cfg.label_field not in row:
                    raise DataError(f"row {i} of {cfg.texts!r} lacks {cfg.text_field!r} or {cfg.label_field!r}")
                texts.append(str(row[cfg.text_field]))
                labels.append(int(row[cfg.label_field]))
        return texts, np.array(labels), f"`{cfg.texts}` ({cfg.label_field})"
    task = load_task(cfg.task)
    texts, labels = [], []
    for q in task.questions:
        try:
            labels.append(int(float(q.answer.replace(",", "")) < 0))
        except ValueError:
            raise DataError(f"question {q.id!r}: answer {q.answer!r} is not a number; give texts=<file>") from None
        texts.append(q.prompt)
    return texts, np.array(labels), f"{cfg.task.name} prompts, label = answer is negative"


@torch.no_grad()
def pooled_features(model, tokenizer, sae, layer: int, texts: list[str], pooling: str,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(SAE codes [n, d_sae], raw residual [n, d_model]) pooled per text at `layer`."""
    if pooling not in ("last", "mean"):
        raise ConfigError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cap = ResidualCapture(model, [layer], early_exit=True)
    codes, resid = [], []
    for s in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[s:s + batch_size]]
        if any(not r for r in rows):
            raise DataError("a text is empty after tokenisation")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = True
        h = cap.run(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False)[layer]
        h = h.float()
        mask = mask.to(device)
        z = sae.encode_dense(h.to(sae.dtype)).float()  # [B, T, d_sae]
        if pooling == "last":
            last = mask.sum(1) - 1
            ar = torch.arange(len(rows), device=device)
            codes.append(z[ar, last].cpu())
            resid.append(h[ar, last].cpu())
        else:
            n = mask.sum(1, keepdim=True)
            codes.append(((z * mask[..., None]).sum(1) / n).cpu())
            resid.append(((h * mask[..., None]).sum(1) / n).cpu())
    return torch.cat(codes).numpy(), torch.cat(resid).numpy()


def probing_figure(res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in res["per_k"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(ks, [r["sae_accuracy"] for r in res["per_k"]], "o-", label="top-k SAE features")
    ax.plot(ks, [r["resid_topk_accuracy"] for r in res["per_k"]], "s--", label="top-k residual dims")
    ax.axhline(res["resid_full_accuracy"], color="C2", label="full residual")
    ax.axhline(res["majority_accuracy"], color="gray", ls=":", label="majority class")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_sparse_probing(cfg: SparseProbingConfig, run: Run) -> dict:
    t0 = time.time()
    model, tokenizer = load_model(cfg.model)
    sae = load_sae_for(cfg.sae.path, model, run)
    layer = layers_sae(sae, num_layers(model))
    texts, labels, what = labelled_texts(cfg)
    if len(texts) < 10:
        raise DataError(f"need at least 10 labelled texts, got {len(texts)}")
    sae_x, resid_x = pooled_features(model, tokenizer, sae, layer, texts, cfg.pooling, cfg.batch_size)
    res = probe_accuracies(sae_x, resid_x, labels, cfg.ks, cfg.test_fraction, cfg.l2, cfg.seed)
    run.save_figure(probing_figure(res), "sparse_probing.png")
    report = {**res, "model": cfg.model.name_or_path, "layer": layer, "sae": sae_reference(sae), "data": what,
              "pooling": cfg.pooling, "n_texts": len(texts), "seconds": round(time.time() - t0, 1)}
    md = ["# Sparse probing", "",
          f"model `{cfg.model.name_or_path}`, SAE layer {layer} (`{(report['sae'] or {}).get('path')}`); data: {what}; "
          f"{len(texts)} texts ({res['positive_fraction']:.1%} positive), {cfg.pooling}-token pooling; "
          f"train {res['n_train']} / test {res['n_test']} (stratified, seed {cfg.seed}); logistic regression, "
          f"L2 {cfg.l2} on standardised inputs; features ranked on train by |Cohen's d|.", "",
          markdown_table(res["per_k"], ["k", "sae_accuracy", "sae_auroc", "resid_topk_accuracy", "resid_topk_auroc"]),
          f"Full residual ({resid_x.shape[1]} dims): accuracy {res['resid_full_accuracy']:.4f}, AUROC "
          f"{res['resid_full_auroc']:.4f}. Majority class: {res['majority_accuracy']:.4f}.", "",
          "![sparse probing](sparse_probing.png)", ""]
    run.write_report(report, "\n".join(md))
    best = max(res["per_k"], key=lambda r: r["k"])
    print(f"sparse probing: k={best['k']} SAE {best['sae_accuracy']:.3f} vs full residual "
          f"{res['resid_full_accuracy']:.3f} (majority {res['majority_accuracy']:.3f})")
    return report


main = hydra_command("sparse_probing", SparseProbingConfig, run_sparse_probing)

if __name__ == "__main__":
    main()
