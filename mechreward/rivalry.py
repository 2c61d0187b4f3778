"""`python -m mechreward.rivalry`: the Feature Rivalry seed evaluation.

Hypothesis: when a question is ambiguous to the model, competing features are active together
and anti-correlate, so the lower tail of the pairwise feature correlations is heavier.

1. Per question, sample `n_samples` completions (published: 20, temperature 1.0, top_p 0.9).
2. Entropy (nats) of the empirical distribution over the samples of `entropy_of`:
   `first_token` (the first completion token, published), `first_content_token` (the first
   token that is not whitespace) or `answer` (the task's extracted final answer; a missing
   answer counts as one more outcome). The organism's completions all start by copying the
   question (" 12+7=..."), so its first tokens carry no ambiguity; its default is `answer`.
   The model's exact first-token entropy (softmax of the raw logits) is reported alongside.
3. Split: ambiguous = entropy above the `split_quantile` quantile of the entropies (at or
   above it when ties leave nothing above), unambiguous = the rest.
4. SAE codes (its exact encoding) at the last prompt token, one vector per question.
5. Within each group, the Pearson correlation of every pair of features across its questions
   (features that fire in at least `min_fire` questions of both groups, so both groups
   correlate the same features).
6. Compare the 5th percentiles of the two groups' pairwise correlations, and the two
   distributions with a two-sided Mann–Whitney U test. The pairs share features and
   questions, so they are not independent: the U-test p-value is descriptive (it is what the
   seed protocol reports); a permutation test over questions (shuffling group labels and
   recomputing the 5th-percentile difference) gives the honest p-value next to it.

Outputs: report.json, report.md, rivalry.png (entropy histogram with the split; the two
correlation distributions with their 5th percentiles).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sps

from .cli import hydra_command
from .errors import ConfigError, DataError
from .generate import sample
from .models import ModelConfig, ResidualCapture, load_model, num_layers
from .prompts import PromptFormat, describe, prompt_ids
from .rollouts import SAERef, layers_sae, load_sae_for, sae_reference
from .run import Run, markdown_table, progress
from .tasks import TaskConfig, load_task

ENTROPY_OF = ("first_token", "first_content_token", "answer")


@dataclass
class RivalryConfig:
    """Config of `python -m mechreward.rivalry` (conf/rivalry.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n=120))
    sae: SAERef = field(default_factory=SAERef)
    n_samples: int = 20
    """Completions per question (published 20)."""
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 48
    """Only `answer` needs whole completions; the first-token modes sample 1 (or a few) tokens."""
    entropy_of: str = "answer"
    """`first_token` (published), `first_content_token` or `answer` (see the module docstring)."""
    split_quantile: float = 0.5
    """Ambiguous = entropy above this quantile of the question entropies."""
    min_fire: int = 3
    """A feature is correlated only if it fires in at least this many questions of each group."""
    n_perm: int = 200
    """Question-label permutations for the p-value of the 5th-percentile difference (0 = off)."""
    batch_size: int = 160
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """Prompt format (chat template on/off/auto, system prompt, template): `mechreward.prompts`."""
    seed: int = 0


def empirical_entropy(outcomes) -> float:
    """Entropy (nats) of the empirical distribution of hashable outcomes."""
    counts = np.array(list(Counter(outcomes).values()), dtype=np.float64)
    if counts.size == 0:
        raise DataError("no outcomes to take the entropy of")
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def pairwise_correlations(x: np.ndarray) -> np.ndarray:
    """Pearson r of every pair of columns of x `[n, F]` (upper triangle, `F(F−1)/2` values)."""
    if x.shape[0] < 3 or x.shape[1] < 2:
        raise DataError(f"pairwise correlations need >= 3 rows and >= 2 features, got shape {x.shape}")
    c = np.corrcoef(x, rowvar=False)
    iu = np.triu_indices(x.shape[1], k=1)
    return c[iu]


def compare_groups(codes: np.ndarray, ambiguous: np.ndarray, min_fire: int = 3, n_perm: int = 0,
                   seed: int = 0) -> dict:
    """Steps 5-6 on codes `[Q, d_sae]` and a boolean `ambiguous [Q]`."""
    amb = np.asarray(ambiguous, dtype=bool)
    if amb.sum() < 3 or (~amb).sum() < 3:
        raise DataError(f"each group needs >= 3 questions; got {int(amb.sum())} ambiguous, {int((~amb).sum())} "
                        "unambiguous (more questions, or another split_quantile)")
    fires = codes != 0
    keep = (fires[amb].sum(0) >= min_fire) & (fires[~amb].sum(0) >= min_fire)
    # A feature constant within a group has no correlation there.
    keep &= (codes[amb].std(0) > 0) & (codes[~amb].std(0) > 0)
    feats = np.flatnonzero(keep)
    if feats.size < 2:
        raise DataError(f"only {feats.size} features fire in >= {min_fire} questions of both groups; "
                        "lower min_fire or use more questions")
    x = codes[:, feats].astype(np.float64)
    r_amb, r_una = pairwise_correlations(x[amb]), pairwise_correlations(x[~amb])
    p5_amb, p5_una = float(np.percentile(r_amb, 5)), float(np.percentile(r_una, 5))
    u = sps.mannwhitneyu(r_amb, r_una, alternative="two-sided")
    out = {"n_features": int(feats.size), "n_pairs": int(r_amb.size), "features": feats.tolist(),
           "p5_ambiguous": p5_amb, "p5_unambiguous": p5_una, "p5_difference": p5_amb - p5_una,
           "median_ambiguous": float(np.median(r_amb)), "median_unambiguous": float(np.median(r_una)),
           "mannwhitney_u": float(u.statistic), "mannwhitney_p": float(u.pvalue),
           "r_ambiguous": r_amb, "r_unambiguous": r_una}
    if n_perm > 0:
        rng = np.random.default_rng(seed)
        obs = abs(p5_amb - p5_una)
        hits = 0
        for _ in range(n_perm):
            perm = rng.permutation(amb)
            with np.errstate(invalid="ignore", divide="ignore"):  # a feature constant in a shuffled group: no r
                d = (np.nanpercentile(pairwise_correlations(x[perm]), 5)
                     - np.nanpercentile(pairwise_correlations(x[~perm]), 5))
            hits += abs(d) >= obs
        out["permutation_p"] = (hits + 1) / (n_perm + 1)
    return out


@torch.no_grad()
def last_prompt_codes(model, sae, layer: int, prompts: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """SAE codes `[Q, d_sae]` at each prompt's last token (right padding; early exit at `layer`)."""
    device = next(model.parameters()).device
    cap = ResidualCapture(model, [layer], early_exit=True)
    out = []
    for s in range(0, len(prompts), batch_size):
        rows = prompts[s:s + batch_size]
        ids = _right_pad(rows, pad_id)
        h = cap.run(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False)[layer]
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        out.append(sae.encode_dense(h[torch.arange(len(rows), device=device), last].to(sae.dtype)).float().cpu())
    return torch.cat(out).numpy()


def _right_pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token rows right-padded to one width: [len(rows), max len] (position i of a row is its token i)."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    return ids


@torch.no_grad()
def model_first_token_entropy(model, prompts: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Exact entropy (nats) of the model's next-token distribution after each prompt (raw logits)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        rows = prompts[s:s + batch_size]
        ids = _right_pad(rows, pad_id)
        logits = model(input_ids=ids.to(device), use_cache=False).logits.float()
        last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        logp = torch.log_softmax(last, -1)
        out.append(-(logp.exp() * logp).sum(-1).cpu())
    return torch.cat(out).numpy()


def split_by_entropy(entropy: np.ndarray, quantile: float) -> tuple[float, np.ndarray]:
    """(threshold, ambiguous mask): entropy above the `quantile` quantile; when ties at the top leave
    nothing above it (many questions share the largest entropy), entropy at or above it."""
    threshold = float(np.quantile(entropy, quantile))
    ambiguous = entropy > threshold
    if not ambiguous.any():
        ambiguous = entropy >= threshold
    return threshold, ambiguous


def outcome_of(s, how: str, task, tokenizer):
    if how == "first_token":
        return s.completion_ids[0] if s.completion_ids else None
    if how == "first_content_token":
        for t in s.completion_ids:
            if tokenizer.decode([t]).strip():
                return t
        return None
    return task.extract(s.text)


def rivalry_figure(entropy: np.ndarray, threshold: float, res: dict, entropy_of: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.hist(entropy, bins=30, color="C7")
    a.axvline(threshold, color="C3", ls="--", label=f"split at {threshold:.3f}")
    a.set_xlabel(f"entropy of {entropy_of} over samples (nats)")
    a.set_ylabel("questions")
    a.legend(fontsize=8)
    bins = np.linspace(-1, 1, 81)
    b.hist(res["r_ambiguous"], bins=bins, alpha=0.55, density=True, color="C3", label="ambiguous")
    b.hist(res["r_unambiguous"], bins=bins, alpha=0.55, density=True, color="C0", label="unambiguous")
    b.axvline(res["p5_ambiguous"], color="C3", ls=":", label=f"p5 ambiguous {res['p5_ambiguous']:.3f}")
    b.axvline(res["p5_unambiguous"], color="C0", ls=":", label=f"p5 unambiguous {res['p5_unambiguous']:.3f}")
    b.set_xlabel("pairwise Pearson r of SAE features (last prompt token)")
    b.set_ylabel("density")
    b.set_title(f"Mann–Whitney p = {res['mannwhitney_p']:.3g}")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_rivalry(cfg: RivalryConfig, run: Run) -> dict:
    t0 = time.time()
    if cfg.entropy_of not in ENTROPY_OF:
        raise ConfigError(f"unknown entropy_of {cfg.entropy_of!r}; expected one of {ENTROPY_OF}")
    if not 0 < cfg.split_quantile < 1:
        raise ConfigError(f"split_quantile must be in (0, 1), got {cfg.split_quantile}")
    if cfg.n_samples < 2:
        raise ConfigError(f"n_samples must be >= 2 for an entropy, got {cfg.n_samples}")
    model, tokenizer = load_model(cfg.model)
    sae = load_sae_for(cfg.sae.path, model, run)
    layer = layers_sae(sae, num_layers(model))
    task = load_task(cfg.task)
    qs = list(task.questions)
    fmt = cfg.prompt.resolve(tokenizer)
    prompts = prompt_ids(tokenizer, qs, fmt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new_tokens = {"first_token": 1, "first_content_token": 4}.get(cfg.entropy_of, cfg.max_new_tokens)
    outcomes: list[list] = [[] for _ in qs]
    accuracy = []
    per = max(1, cfg.batch_size // cfg.n_samples)
    bar = progress(total=len(qs), desc="rivalry", unit="q")
    for s in range(0, len(qs), per):
        samples = sample(model, tokenizer, prompts[s:s + per], n=cfg.n_samples, temperature=cfg.temperature,
                         top_p=cfg.top_p, max_new_tokens=new_tokens, batch_size=cfg.batch_size, seed=cfg.seed + s)
        for smp in samples:
            q = qs[s + smp.prompt_index]
            outcomes[s + smp.prompt_index].append(outcome_of(smp, cfg.entropy_of, task, tokenizer))
            if cfg.entropy_of == "answer":
                accuracy.append(task.verify(smp.text, q.answer))
        bar.update(len(prompts[s:s + per]))
    bar.close()
    entropy = np.array([empirical_entropy(o) for o in outcomes])
    threshold, ambiguous = split_by_entropy(entropy, cfg.split_quantile)
    codes = last_prompt_codes(model, sae, layer, prompts, pad)
    exact = model_first_token_entropy(model, prompts, pad)
    res = compare_groups(codes, ambiguous, cfg.min_fire, cfg.n_perm, cfg.seed)
    run.save_figure(rivalry_figure(entropy, threshold, res, cfg.entropy_of), "rivalry.png")
    report = {k: v for k, v in res.items() if not k.startswith("r_")}
    report.update({
        "supports_rivalry": bool(res["p5_ambiguous"] < res["p5_unambiguous"] and res["mannwhitney_p"] < 0.05),
        "model": cfg.model.name_or_path, "layer": layer, "sae": sae_reference(sae), "n_questions": len(qs),
        "prompt_format": describe(fmt),
        "n_ambiguous": int(ambiguous.sum()), "n_unambiguous": int((~ambiguous).sum()),
        "entropy_of": cfg.entropy_of, "entropy_threshold": threshold,
        "entropy_mean_ambiguous": float(entropy[ambiguous].mean()),
        "entropy_mean_unambiguous": float(entropy[~ambiguous].mean()),
        "model_first_token_entropy_mean": float(exact.mean()),
        "sampled_accuracy": float(np.mean(accuracy)) if accuracy else None,
        "question_ids": [q.id for q in qs], "entropies": entropy.tolist(), "ambiguous": ambiguous.tolist(),
        "sampling": {"n": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_new_tokens": new_tokens},
        "seconds": round(time.time() - t0, 1)})
    rows = [{"group": g, "questions": n, "mean entropy": e, "p5 of pairwise r": p, "median r": m}
            for g, n, e, p, m in (("ambiguous", report["n_ambiguous"], report["entropy_mean_ambiguous"],
                                   res["p5_ambiguous"], res["median_ambiguous"]),
                                  ("unambiguous", report["n_unambiguous"], report["entropy_mean_unambiguous"],
                                   res["p5_unambiguous"], res["median_unambiguous"]))]
    perm = f"; permutation p (questions) of the p5 difference = {report['permutation_p']:.3g}" \
        if "permutation_p" in report else ""
    md = ["# Feature Rivalry", "",
          f"model `{cfg.model.name_or_path}`, SAE layer {layer} (`{(report['sae'] or {}).get('path')}`), "
          f"{len(qs)} questions × {cfg.n_samples} samples (T={cfg.temperature}, top_p={cfg.top_p}); "
          f"entropy of `{cfg.entropy_of}`; ambiguous = entropy > {threshold:.4f} "
          f"(quantile {cfg.split_quantile}). Model's exact first-token entropy, mean: {exact.mean():.4f} nats.", "",
          markdown_table(rows), "",
          f"{res['n_features']} features fire in ≥ {cfg.min_fire} questions of both groups → {res['n_pairs']:,} pairs. "
          f"Mann–Whitney U = {res['mannwhitney_u']:.4g}, p = {res['mannwhitney_p']:.3g} (pairs are not independent: "
          f"descriptive){perm}.", "",
          f"**{'Supports' if report['supports_rivalry'] else 'Does not support'} feature rivalry** "
          "(rule: p5 ambiguous < p5 unambiguous and Mann–Whitney p < 0.05).", "", "![rivalry](rivalry.png)", ""]
    run.write_report(report, "\n".join(md))
    print(f"rivalry: p5 ambiguous {res['p5_ambiguous']:.4f} vs unambiguous {res['p5_unambiguous']:.4f}, "
          f"MWU p {res['mannwhitney_p']:.3g}")
    return report


main = hydra_command("rivalry", RivalryConfig, run_rivalry)

if __name__ == "__main__":
    main()
