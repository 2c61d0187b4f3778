"""`python -m mechreward.g1`: gate G1 end to end (rollouts → pack on discovery → held-out statistics).

With no arguments: the organism, its SAE (layer 2), arithmetic eval questions, four sampled
rollouts per question (so that within-question statistics exist: GRPO ranks completions of the
same question), 200 discovery / 250 validation questions, on a CPU in minutes.
`sae.path=<dir>` picks another SAE; `rollouts=<dir>` reuses a rollout directory (checked against the model and SAE).
Presets: `+recipe=g1_qwen36_35b_a3b_l23_supergpqa`, `+recipe=g1_qwen35_4b_l18_gsm8k`.
The protocol and the verdict live in `mechreward.gates.g1`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np

from .cli import hydra_command
from .errors import ShapeError
from .gates.g1 import G1Protocol, G1Result, run_gate
from .models import ModelConfig, load_model, normalize_layer
from .probe import SelectionConfig
from .rollouts import (RolloutsConfig, RolloutSet, SAERef, SamplingConfig, generate_rollouts, layers_sae, load_sae_for,
                       resolve_sae_path, sae_reference)
from .run import Run, markdown_table
from .tasks import TaskConfig


@dataclass
class G1Config:
    """Config of `python -m mechreward.g1` (conf/g1.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n=450))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))
    """`sampling.n`: rollouts per question (organism default 4; published G1 used 1, as the presets do).
    With one rollout per question there are no within-question statistics (flag UNINFORMATIVE_WITHIN)."""
    sae: SAERef = field(default_factory=SAERef)
    """`sae.path`: SAE directory, or `organism` (the organism's SAE). Its recorded layer is the one hooked."""
    rollouts: str | None = None
    """Reuse this rollout directory; null = sample into `<run dir>/rollouts`."""
    store_token_codes: bool = False
    """Keep per-token SAE codes in the rollouts too (G1 needs only pooled ones)."""
    questions_per_shard: int = 64
    n_discovery: int = 200
    n_validation: int | None = 250
    pooling: str = "mean"
    selection: SelectionConfig = field(default_factory=lambda: SelectionConfig(contrast="within",
                                                                                residualise_length=True))
    """Organism default: select on within-question contrasts of length-residualised codes (the only
    selection whose within-question AUROC CI excludes 0.5 on the organism, numbers in conf/g1.yaml);
    the presets and `SelectionConfig()` keep the published selection (pooled, raw codes)."""
    n_random_packs: int = 1000
    n_boot: int = 2000
    n_perm: int = 10000
    seed: int = 0

    def protocol(self) -> G1Protocol:
        """The protocol settings of this config (every G1Protocol field is also a field here)."""
        return G1Protocol(**{f.name: getattr(self, f.name) for f in fields(G1Protocol)})


def _figures(run: Run, res: G1Result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho = res.report["spearman_rho"]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    groups = [res.score[res.labels == 0], res.score[res.labels == 1]]
    ax.boxplot(groups, showfliers=False)
    ax.set_xticks([1, 2], [f"wrong (n={len(groups[0])})", f"correct (n={len(groups[1])})"])
    rng = np.random.default_rng(0)
    for i, g in enumerate(groups, 1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(g)), g, s=8, alpha=0.5)
    ax.set_ylabel("pack score R (validation)")
    ax.set_title(f"G1: Spearman rho = {rho:.3f} ({res.report['verdict']})")
    fig.tight_layout()
    run.save_figure(fig, "score_by_outcome.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if res.random_rhos.size:
        ax.hist(res.random_rhos, bins=40, color="C7", alpha=0.8, label=f"random packs (n={res.random_rhos.size})")
        ax.axvline(res.report["controls"]["random_pack_rho_p95"], color="C7", ls="--", label="null 95th pct")
    ax.axvline(rho, color="C3", lw=2, label=f"pack rho = {rho:.3f}")
    d = res.report["controls"]["direction_rho"]
    if d is not None:
        ax.axvline(d, color="C0", ls=":", label=f"diff-of-means direction = {d:.3f}")
    ax.set_xlabel("Spearman rho with correctness (validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "null_distribution.png")


def _markdown(cfg: G1Config, r: dict, res: G1Result) -> str:
    c = r["controls"]

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    rows = [{"statistic": k, "value": v} for k, v in [
        ("Spearman rho", f(r["spearman_rho"])), ("p (scipy)", f"{r['p_value']:.3g}"),
        ("bootstrap 95% CI (questions)", f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"),
        ("permutation p", f"{r['permutation_p']:.3g}"), ("AUROC", f(r["auroc"])), ("Pearson r", f(r["pearson_r"])),
        ("control: length rho", f(c["length_rho"])), ("control: mean log-prob rho", f(c["logprob_rho"])),
        ("control: diff-of-means direction rho", f(c["direction_rho"])),
        ("control: random packs rho, 95th pct", f(c["random_pack_rho_p95"])),
        ("control: partial rho given length", f(c["partial_rho_length"]))]]
    w, inc = r["within"], r["incremental"]

    def wrow(name, rho, d):
        ci = d.get("ci95")
        return {"signal": name, "across rho": f(rho), "within AUROC": f(d.get("auroc")),
                "within 95% CI": "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]",
                "within permutation p": "n/a" if d.get("permutation_p") is None else f"{d['permutation_p']:.3g}"}

    rp = w["controls"]["random_packs"]
    wrows = [wrow("pack", r["spearman_rho"], w["pack"]), wrow("length", c["length_rho"], w["controls"]["length"]),
             wrow("mean log-prob", c["logprob_rho"], w["controls"]["logprob"]),
             wrow("diff-of-means direction", c["direction_rho"], w["controls"]["direction"]),
             {"signal": f"random packs, 95th pct (n={c['n_random_packs']})", "across rho": f(c["random_pack_rho_p95"]),
              "within AUROC": f(rp["auroc_p95"]), "within 95% CI": "", "within permutation p": ""}]

    def lrt(d):
        return "n/a" if d is None else f"chi2 = {d['chi2']:.2f}, p = {d['p']:.3g} (coef {d['coef_per_sd']:+.3f}/SD, n = {d['n']})"

    pr = inc.get("partial_rho")
    inc_lines = [f"- across questions (logistic regression): {lrt(inc.get('across'))}",
                 f"- within questions (conditional logistic regression by question): {lrt(inc.get('within'))}",
                 f"- partial Spearman rho given {' and '.join(inc['covariates'])}: "
                 + ("n/a" if pr is None else f"{pr['rho']:.4f} (p = {pr['p']:.3g})")]
    return "\n".join([
        "# Gate G1: correlation gate", "",
        f"**{r['conclusion']}**", "",
        f"model `{r['model']}`, layer {r['layer']}, SAE sha256 `{r['sae_sha256']}`, {r['pooling']} pooling; "
        f"task `{cfg.task.name}`; {r['n_discovery']} discovery / {r['n_validation']} validation questions "
        f"({r['n_validation_responses']} validation responses, {r['n_correct_validation']} correct).", "",
        f"## Verdict: **{r['verdict']}**" + (f" — flags: {', '.join(r['flags'])}" if r["flags"] else " — no flags"), "",
        "Thresholds (published): rho >= 0.50 PASS-EXCELLENT, >= 0.30 PASS, >= 0.10 WEAK, else FAIL.", "",
        markdown_table(rows), "",
        "## Within questions (what GRPO's group normalisation uses)", "",
        f"{r['n_mixed_questions']} validation questions have both a correct and a wrong rollout; within-question "
        "AUROC = share of (correct, wrong) pairs of the same question the signal ranks right (ties 1/2), CI by "
        "resampling those questions, permutation p by shuffling labels within questions.", "",
        markdown_table(wrows), "",
        "Beaten by: " + ("; ".join(r["beaten_by"]) if r["beaten_by"] else "no control"), "",
        f"Incremental validity of the pack score beyond {' and '.join(inc['covariates'])} "
        "(nested likelihood-ratio tests, 1 df):", "", *inc_lines, "",
        *_truth_lines(r.get("ground_truth_mode")),
        f"Pack: {r['n_features']} features ({r['n_features_alive']} alive on discovery) → `{r['pack_path']}`", "",
        markdown_table(res.pack.features, ["index", "role", "weight", "d", "auroc", "fire_rate_pos", "fire_rate_neg",
                                           "q"]),
        "![score by outcome](score_by_outcome.png) ![null distribution](null_distribution.png)", ""])


def _truth_lines(t: dict | None) -> list[str]:
    """The G1 report's section on the task's recorded ground-truth mode (planted organism)."""
    if t is None:
        return []
    head = ["## Ground truth: the task's recorded solving mode", "",
            f"Validation responses by recorded mode: {t['counts']}."]
    if "undefined" in t:
        return head + [f"Not scored: {t['undefined']}.", ""]
    b = t["best_pack_latent"]
    lines = head + ["",
                    f"**Pack latent that best separates the modes: {b['index']} ({b['role']}), AUROC for the right mode "
                    f"{b['auroc_right_mode']:.3f} (separation {b['separation']:.3f})** over {t['n_determined']} "
                    f"responses whose mode is determined; pack score AUROC {t['pack_score_auroc_right_mode']:.3f}."]
    bw = t.get("best_pack_latent_within")
    if bw is not None:
        lines.append(f"Within questions (pairs of a right-mode and a wrong-mode completion of the same question): pack "
                     f"latent {bw['index']} ({bw['role']}), AUROC {bw['within_auroc_right_mode']:.3f}; pack score "
                     f"{t['pack_score_within_auroc_right_mode']:.3f}.")
    a = t.get("best_alive_latent")
    if a is not None:
        lines.append(f"Best of all {a['n_alive']} alive latents: {a['index']}, AUROC {a['auroc_right_mode']:.3f}.")
    return lines + [""]


def run_g1(cfg: G1Config, run: Run) -> dict:
    t0 = time.time()
    if not cfg.rollouts:
        from .tasks.loading import require_real_task

        require_real_task(cfg.model.name_or_path, "g1", task=cfg.task)
    from .sae.formats import load_sae

    if cfg.rollouts:
        sae = load_sae(resolve_sae_path(cfg.sae.path, run))
        rs = RolloutSet(cfg.rollouts)
        if sae.cfg.d_in != rs.header["d_model"]:
            raise ShapeError(f"SAE {cfg.sae.path!r} has d_in={sae.cfg.d_in}, the rollouts' model has hidden size "
                             f"{rs.header['d_model']}")
        layer = layers_sae(sae, rs.header["n_layers"])
    else:
        model, tokenizer = load_model(cfg.model)
        sae = load_sae_for(cfg.sae.path, model, run)
        rcfg = RolloutsConfig(model=cfg.model, task=cfg.task, sampling=cfg.sampling,
                              sae=SAERef(str(sae.cfg.metadata["path"])), layers=None, store_token_codes=cfg.store_token_codes,
                              questions_per_shard=cfg.questions_per_shard, seed=cfg.seed)
        rs = RolloutSet(generate_rollouts(rcfg, run, model, tokenizer))
        layer = normalize_layer(layers_sae(sae, rs.header["n_layers"]), rs.header["n_layers"])
        del model
    rs.check(model=cfg.model.name_or_path, sae_sha256=sae.cfg.metadata["sha256"], layer=layer)
    t_roll = time.time() - t0
    res = run_gate(rs, cfg.protocol(), sae_reference(sae), cfg.model.name_or_path, layer)
    pack_path = res.pack.save(run.path("feature_pack.json"))
    report = {**res.report, "pack_path": str(pack_path), "rollouts_dir": str(rs.dir),
              "accuracy_all": float(rs.labels.mean()), "seconds_rollouts": round(t_roll, 1),
              "seconds": round(time.time() - t0, 1)}
    _figures(run, res)
    run.write_report(report, _markdown(cfg, report, res))
    print(f"G1: rho = {report['spearman_rho']:.4f} (p = {report['p_value']:.3g}), CI {report['ci95']}, "
          f"verdict {report['verdict']} {report['flags']}\n{report['conclusion']}")
    return report


main = hydra_command("g1", G1Config, run_g1)

if __name__ == "__main__":
    main()
