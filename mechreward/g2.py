"""`python -m mechreward.g2`: gate G2, GRPO arms R0 outcome, R1 + λ·SAE pack, R2 + λ·direction (+ optional LP).

With no arguments: the organism with its G1 pack (the latest `runs/g1/*/feature_pack.json` of
the organism, or a G1 run made now into `<run dir>/g1`), arithmetic train questions for RL and
held-out eval questions not used by G1, 3 seeds, on a CPU. conf/g2.yaml holds the organism's
settings (its comments say which differ from the published ones: 30 steps, 2 questions × 2
rollouts, LoRA r=32/α=64, λ=0.1, β=0.05, lr 1e-6…3e-6, 50–100 held-out questions) and refuses
them for another model (`protocol_for`). `pack=<file>` picks a pack; the SAE is the pack's
(`sae_path=` to relocate it). Held-out accuracy is sampled at the training temperature (the
verdict's metric) and greedy, every `protocol.eval_every` steps into metrics.jsonl
(`kind: curve`) and `learning_curves.png`. Protocol, statistics and verdict: `mechreward.gates.g2`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cli import hydra_command
from .errors import ConfigError, DataError
from .gates.g2 import ARMS, EXTRA_ARMS, G2Protocol, summarise
from .models import ModelConfig, load_model, resolve_device
from .run import Run, markdown_table
from .tasks import TaskConfig, load_task
from .vllm_backend import VLLMSettings, close_vllm, synced_llm


@dataclass
class G2Config:
    """Config of `python -m mechreward.g2` (conf/g2.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="eval", n=700))
    """Held-out questions: the first `protocol.n_eval` not used by the pack's G1 split."""
    train_task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", n=400))
    """RL training questions (taken in order, `steps × questions_per_step` of them)."""
    pack: str | None = None
    """Feature pack (G1 output); null = the latest G1 run of this model, or run G1 now."""
    sae_path: str | None = None
    """Override the pack's recorded SAE path."""
    protocol: G2Protocol = field(default_factory=G2Protocol)
    allow_failed_pack: bool = False
    """Run on a pack whose G1 verdict is FAIL or that G1 never validated (refused otherwise; reported)."""
    protocol_for: str | None = None
    """The model `protocol` was chosen for. conf/g2.yaml sets `organism` (its protocol is tuned for the
    built-in organism: full fine-tuning, a high lr); a run on another model is refused until this names
    that model (after choosing `protocol.*`; the G2Protocol defaults are the published settings). null = any."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """The compared arms: always R0, R1, R2 (add arms with `protocol.extra_arms`)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings when `protocol.grpo.use_vllm=true` (dtype, CPU KV cache); TRL's vllm_* fields stay in protocol.grpo."""
    mis_specify: str | None = None
    """`sign_flipped`: R1 trains with the pack's weights negated — a deliberately wrong mech reward, to check
    that G2 catches one (R1_BELOW_R0, HACKED_VS_R0); null = the pack as G1 built it."""
    seed: int = 0
    organism_defaults_ok: bool = False
    """With a model other than the organism, G2 warns while the organism's task or train_task (arithmetic) or its
    task.n (700) are still in place (the protocol itself is guarded by `protocol_for`); true silences it."""


ORGANISM_TASK_N = 700
"""conf/g2.yaml's organism task.n, which must not carry over to a real model unnoticed."""


def check_real_model_settings(cfg: G2Config) -> list[str]:
    """Warn when a real model runs with the organism's task, train_task or task.n; returns those settings
    (the report's `organism_defaults`)."""
    from .tasks.loading import organism_task_leaks, warn_organism_defaults

    if cfg.organism_defaults_ok:
        return []
    return warn_organism_defaults(cfg.model.name_or_path, "g2", organism_task_leaks(
        cfg.model.name_or_path, {"task": cfg.task, "train_task": cfg.train_task, "task.n": (cfg.task.n, ORGANISM_TASK_N)}),
        "set task, train_task and task.n for your model (e.g. task=addition train_task.name=addition task.n=null)")


def organism_protocol() -> G2Protocol:
    """The organism's G2 protocol as conf/g2.yaml sets it (for callers that build a G2Config in code, e.g. the demo)."""
    from omegaconf import OmegaConf

    from .cli import CONF_DIR

    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "g2.yaml").protocol, resolve=True)
    return G2Protocol(**{**asdict(G2Protocol()), **raw})


# --------------------------------------------------------------------------- pack

def find_pack(model_name: str, root: Path = Path("runs") / "g1", allow_fail: bool = False) -> Path | None:
    """The newest `feature_pack.json` under runs/g1 built for `model_name` (G1 verdict FAIL skipped unless `allow_fail`)."""
    from .probe import FeaturePack

    found = []
    for p in root.glob("*/feature_pack.json"):
        try:
            pack = FeaturePack.load(p)
        except Exception:  # noqa: BLE001 - a half-written or foreign file is skipped
            continue
        if pack.model == model_name and pack.validation and (allow_fail or pack.validation.get("verdict") != "FAIL"):
            found.append((p.stat().st_mtime, p))
    return max(found)[1] if found else None


def resolve_pack(cfg: G2Config, run: Run) -> Path:
    if cfg.pack:
        return Path(cfg.pack)
    found = find_pack(cfg.model.name_or_path, allow_fail=cfg.allow_failed_pack)
    if found is not None:
        print(f"G2: using the G1 pack {found}")
        return found
    from .g1 import G1Config, run_g1

    print("G2: no G1 pack for this model yet; running G1 first")
    sub = Run(run.path("g1"), "g1")
    report = run_g1(G1Config(model=cfg.model), sub)
    return Path(report["pack_path"])


# --------------------------------------------------------------------------- one arm

def _dataset(questions):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": q.prompt, "answer": q.answer, "question_id": q.id} for q in questions])


def evaluate_heldout(model, tokenizer, eval_qs, task, p: G2Protocol, reward=None, greedy: bool = True, *,
                     prompt_format, llm=None) -> dict:
    """Held-out accuracy as GRPO changes it: per question, the mean correct over `eval_samples` completions
    sampled at the training temperature (seed `eval_seed`, the same for every arm and seed), and, with
    `greedy`, greedy correctness. `score_mean`: `reward`'s mean score on the sampled completions; `n_no_answer`:
    sampled completions with no extractable answer. Prompts: `prompt_format` (the pack's G1 format; required, as a
    missing one once fed bare prompts to a chat model mid-run). `llm`: generate
    with that vLLM engine (holding `model`'s weights) instead of HF `generate`."""
    from .grpo import evaluate_policy

    k = p.eval_samples
    ev = evaluate_policy(model, tokenizer, eval_qs, task, reward, n=k, greedy=False, temperature=p.temperature,
                         max_new_tokens=p.eval_max_new_tokens, seed=p.eval_seed, batch_size=p.eval_batch_size,
                         prompt_format=prompt_format, llm=llm)
    out = {"sampled": ev["correct"].reshape(len(eval_qs), k).mean(1), "score_mean": ev["score_mean"],
           "n_no_answer": ev["n_no_answer"]}
    ids = [ev["prompt_ids"], ev["completion_ids"]]
    if greedy:
        gr = evaluate_policy(model, tokenizer, eval_qs, task, None, greedy=True, max_new_tokens=p.eval_max_new_tokens,
                             batch_size=p.eval_batch_size, prompt_format=prompt_format, llm=llm)
        out["greedy"] = gr["correct"]
        ids.append(gr["completion_ids"])
    out["digest"] = _digest(ids)
    return out


def _digest(ids) -> str:
    """Short sha256 of the prompt ids fed and the completion ids generated: two evaluations with equal digests
    saw the same prompts and produced the same completions."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _curve_callback(tokenizer, eval_qs, task, p: G2Protocol, curve: list, log, *, prompt_format, llm_source=None):
    """Held-out sampled and greedy accuracy every `eval_every` steps (appended to `curve`, logged), on the prompts
    of `prompt_format` (the pack's G1 format, as before and after training; required: without it the prompts
    would lose the chat template). `llm_source()`: the vLLM engine to generate with, its weights synced to the
    policy (`protocol.eval_engine=vllm`); None = HF `generate`."""
    from transformers import TrainerCallback

    class HeldoutCurve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if p.eval_every and state.global_step % p.eval_every == 0 and state.global_step < state.max_steps:
                llm = llm_source() if llm_source is not None else None
                ev = evaluate_heldout(model, tokenizer, eval_qs, task, p, prompt_format=prompt_format, llm=llm)
                pt = {"step": state.global_step, "sampled": float(ev["sampled"].mean()),
                      "greedy": float(ev["greedy"].mean()), "digest": ev["digest"]}
                curve.append(pt)
                log(pt)

    return HeldoutCurve()


def reward_record(f) -> dict:
    """What one reward function of an arm is: its class, TRL name and (mech rewards) layer / pack / SAE."""
    rec = {"class": type(f).__name__, "name": getattr(f, "__name__", type(f).__name__)}
    if getattr(f, "layer", None) is not None:
        rec["layer"] = int(f.layer)
    pack = getattr(f, "pack", None)
    if pack is not None:
        rec["n_features"] = len(pack.features)
        rec["sae"] = (pack.sae or {}).get("name") or (pack.sae or {}).get("path")
    direction = getattr(f, "direction", None)
    if direction is not None:
        rec["direction_norm"] = float(direction.norm())
    return rec


def run_arm(arm: str, seed: int, cfg: G2Config, task, train_qs, eval_qs, rewards: dict, out_dir: Path,
            log=None, prompt_format=None) -> dict:
    """Train one arm from fresh weights (base model reloaded, new LoRA or full fine-tuning) and evaluate it
    on held-out questions (sampled and greedy accuracy; every `eval_every` steps for the learning curve)."""
    from peft import LoraConfig

    from .grpo import MechGRPOTrainer, grpo_config
    from .reward import OutcomeReward

    p = cfg.protocol
    t0 = time.time()
    model, tokenizer = load_model(cfg.model)
    on_cpu = resolve_device(cfg.model.device).type == "cpu"
    bs = p.questions_per_step * p.rollouts_per_question
    args = grpo_config(dict(
        output_dir=str(out_dir), per_device_train_batch_size=bs, num_generations=p.rollouts_per_question,
        max_steps=p.steps, learning_rate=p.learning_rate, beta=p.beta, max_completion_length=p.max_completion_length,
        temperature=p.temperature, seed=seed, data_seed=seed, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=on_cpu, bf16=False, disable_dropout=True, shuffle_dataset=True,
        **({"reward_weights": [1.0, p.lam]} if rewards.get(arm) is not None else {})), p.grpo)
    mech = rewards.get(arm)
    funcs = [OutcomeReward(task)] + ([mech] if mech is not None else [])
    kw = {}
    if p.adapter == "lora":
        kw["peft_config"] = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=p.lora_target_modules,
                                       lora_dropout=0.0, task_type="CAUSAL_LM")
    curve: list[dict] = []
    held: dict = {}
    llm_source = (lambda: synced_llm(held["trainer"])) if p.eval_engine == "vllm" else None
    cb = _curve_callback(tokenizer, eval_qs, task, p, curve,
                         lambda pt: log and log(kind="curve", arm=arm, seed=seed, **pt), prompt_format=prompt_format,
                         llm_source=llm_source)
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=_dataset(train_qs),
                              processing_class=tokenizer, mech_lambda=p.lam, callbacks=[cb],
                              prompt_format=prompt_format, vllm_settings=cfg.vllm, **kw)
    held["trainer"] = trainer
    if hasattr(mech, "bind"):
        mech.bind(trainer)
    init_sha = weights_sha(trainer.model)
    score_reward = mech if hasattr(mech, "token_values") else (rewards.get("R1") if arm == "R0" else None)
    try:
        trainer.train()
        ev = evaluate_heldout(trainer.model, tokenizer, eval_qs, task, p, score_reward, prompt_format=prompt_format,
                              llm=None if llm_source is None else llm_source())
    finally:
        close_vllm(trainer)  # before the next arm starts its own engine (and with it, the same process group)
    history = trainer.state.log_history
    corr = [r[k] for r in history for k in r if k.endswith("_outcome_corr")]
    final = {"step": p.steps, "sampled": float(ev["sampled"].mean()), "greedy": float(ev["greedy"].mean()),
             "digest": ev["digest"]}
    curve.append(final)
    if log:
        log(kind="curve", arm=arm, seed=seed, **final)
    reward_metrics = sorted({k.split("/")[1] for r in history for k in r if k.startswith("rewards/") and
                             k.endswith("/mean")})
    return {"arm": arm, "seed": seed, "sampled": ev["sampled"].tolist(), "greedy": ev["greedy"].tolist(),
            "accuracy": final[p.verdict_metric], "score_mean": ev["score_mean"],
            "mech_outcome_corr": float(np.mean(corr)) if corr else None,
            "train_reward_outcome": [r.get("rewards/outcome/mean") for r in history if "rewards/outcome/mean" in r],
            "rewards": {"functions": [reward_record(f) for f in trainer.reward_funcs],
                        "logged": reward_metrics, "weights": [float(w) for w in trainer.reward_weights]},
            "curve": curve, "init_weights_sha": init_sha, "final_weights_sha": weights_sha(trainer.model),
            "seconds": round(time.time() - t0, 1)}


def weights_sha(model) -> str:
    """sha256 over every parameter (name, bytes) of a model: equal starting weights have equal digests."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- command

def heldout_questions(task, pack, n: int, task_n: int | None = None):
    """The first `n` questions of `task` not in the pack's G1 split. `task_n`: the task.n the task
    was loaded with (the error says whether raising it can help)."""
    used = set((pack.provenance or {}).get("discovery") or []) | set((pack.provenance or {}).get("validation") or [])
    qs = [q for q in task.questions if q.id not in used]
    if len(qs) < n:
        capped = task_n is not None and len(task.questions) >= task_n
        fix = (f"raise task.n (now {task_n}) or lower protocol.n_eval" if capped else
               f"the task has no more rows ({len(task.questions)} in all): lower protocol.n_eval to "
               f"{len(qs)} or less, or use a larger task.source")
        raise DataError(f"only {len(qs)} held-out questions left after removing the pack's {len(used)} G1 questions; "
                        f"need protocol.n_eval={n}: {fix}")
    return qs[:n]


def run_g2(cfg: G2Config, run: Run) -> dict:
    from .confidence import MeanLogProbReward
    from .probe import FeaturePack
    from .models import find_layers, hidden_size
    from .prompts import describe, format_of_pack
    from .reward import DirectionReward, SAEFeatureReward, check_pack_fits, check_pack_verdict, mis_specify

    t0 = time.time()
    p = cfg.protocol
    organism_defaults = check_real_model_settings(cfg)
    p.check()
    from .reward import MIS_SPECIFICATIONS

    if cfg.mis_specify is not None and cfg.mis_specify not in MIS_SPECIFICATIONS:
        raise ConfigError(f"mis_specify={cfg.mis_specify!r}: one of {list(MIS_SPECIFICATIONS)} or null (the pack as G1 "
                          "built it)")
    if list(cfg.arms) != list(ARMS):
        raise ConfigError(f"arms={list(cfg.arms)}: the G2 verdict needs the three arms {list(ARMS)}; "
                          f"add arms with protocol.extra_arms (one of {sorted(EXTRA_ARMS)})")
    if cfg.protocol_for is not None and cfg.protocol_for != cfg.model.name_or_path:
        raise ConfigError(f"protocol_for={cfg.protocol_for!r} but model.name_or_path={cfg.model.name_or_path!r}: "
                          f"the protocol settings (adapter={p.adapter}, lr={p.learning_rate}, steps={p.steps}) were "
                          f"chosen for {cfg.protocol_for!r}; choose protocol.* for this model (published: adapter=lora, "
                          f"lora_r=32, learning_rate=3e-6, steps=30) and set protocol_for={cfg.model.name_or_path!r}")
    arm_names = list(ARMS) + list(p.extra_arms)
    pack_path = resolve_pack(cfg, run)
    pack = FeaturePack.load(pack_path)
    pack_check = check_pack_verdict(pack, cfg.allow_failed_pack, "allow_failed_pack")
    device = resolve_device(cfg.model.device)
    sae_reward = mis_specify(SAEFeatureReward.from_pack(pack_path, cfg.sae_path, device=device, per_token=p.per_token),
                             cfg.mis_specify)
    dir_reward = DirectionReward.from_pack(pack, per_token=p.per_token).to(device)
    rewards = {"R1": sae_reward, "R2": dir_reward}
    for a in p.extra_arms:
        rewards[a] = MeanLogProbReward()
    task = load_task(cfg.task)
    eval_qs = heldout_questions(task, pack, p.n_eval, cfg.task.n)
    train_task = load_task(cfg.train_task)
    n_train = p.steps * p.questions_per_step
    if len(train_task.questions) < n_train:
        raise DataError(f"train_task has {len(train_task.questions)} questions; {p.steps} steps × "
                        f"{p.questions_per_step} need {n_train}")
    train_qs = train_task.questions[:n_train]

    # Before: every arm starts from the same weights (a fresh LoRA is the identity), so once. The sampled
    # completions are the same for both scorings (same eval_seed).
    base, tok = load_model(cfg.model)
    check_pack_fits(pack, cfg.model.name_or_path, len(find_layers(base)), hidden_size(base), sae_reward.sae)
    fmt = format_of_pack(pack).resolve(tok)  # the prompts G1 validated, for training and evaluation
    ev1 = evaluate_heldout(base, tok, eval_qs, task, p, sae_reward, prompt_format=fmt)
    ev2 = evaluate_heldout(base, tok, eval_qs, task, p, dir_reward, greedy=False, prompt_format=fmt)
    before = {"sampled": ev1["sampled"], "greedy": ev1["greedy"],
              "score": {"R0": ev1["score_mean"], "R1": ev1["score_mean"], "R2": ev2["score_mean"]}}
    del base
    b0 = {"step": 0, "sampled": float(before["sampled"].mean()), "greedy": float(before["greedy"].mean()),
          "digest": ev1["digest"]}
    print(f"G2: held-out accuracy before: sampled {b0['sampled']:.3f} ({p.eval_samples} samples at "
          f"T={p.temperature}), greedy {b0['greedy']:.3f} (n={len(eval_qs)}); pack {pack_path}")
    no_answer_before = ev1["n_no_answer"]
    if no_answer_before:
        from .probe import extraction_hint

        print(f"G2: warning: held-out sampled accuracy before {b0['sampled']:.3f}"
              + extraction_hint(no_answer_before, len(eval_qs) * p.eval_samples))

    results: dict[str, list[dict]] = {a: [] for a in arm_names}
    for seed in p.seeds:
        for arm in arm_names:
            run.log(0, kind="curve", arm=arm, seed=seed, **{k: v for k, v in b0.items() if k != "step"})
            res = run_arm(arm, seed, cfg, task, train_qs, eval_qs, rewards, run.path(f"arms/{arm}-seed{seed}"),
                          log=lambda **m: run.log(m.pop("step"), **m), prompt_format=fmt)
            res["curve"].insert(0, dict(b0))
            results[arm].append(res)
            run.log(p.steps, kind="final", arm=arm, seed=seed, accuracy_sampled=float(np.mean(res["sampled"])),
                    accuracy_greedy=float(np.mean(res["greedy"])), init_weights_sha=res["init_weights_sha"],
                    rewards=[f["name"] for f in res["rewards"]["functions"]], mech_score=res["score_mean"],
                    mech_outcome_corr=res["mech_outcome_corr"], seconds=res["seconds"])
            print(f"G2: {arm} seed {seed}: held-out accuracy sampled {np.mean(res['sampled']):.3f}, "
                  f"greedy {np.mean(res['greedy']):.3f} ({res['seconds']}s)")
    from .io import write_json

    # every arm's and seed's per-question held-out results: `summarise(results, before, protocol)` rebuilds the
    # statistics from them without training again
    write_json(run.path("results.json"), {"results": results, "before": before, "protocol": asdict(p)})
    report = summarise(results, before, p)
    report.update(pack_path=str(pack_path), model=cfg.model.name_or_path, layer=pack.layer,
                  pack_validation=pack.validation.get("verdict"), n_eval=len(eval_qs), n_train_questions=n_train,
                  protocol=asdict(p), prompt_format=describe(fmt, tok, eval_qs[0].prompt), pack_check=pack_check,
                  n_no_answer_before=no_answer_before, organism_defaults=organism_defaults,
                  mis_specify=cfg.mis_specify, seconds=round(time.time() - t0, 1))
    report["plots"] = {"learning_curves": _curve_figure(run, report)}
    run.write_report(report, _markdown(report))
    print(f"G2: verdict {report['verdict']} (flags {report['flags']}); R0 gain {report['r0_gain']['mean']:+.3f} "
          f"CI {_ci(report['r0_gain']['ci95_two_level'])}; R1-R0 {report['delta_r1_r0']['mean']:+.3f}, "
          f"R1-R2 {report['delta_r1_r2']['mean']:+.3f}; MDE {_num(report['mde_r1_r0']['mde'])} "
          f"(R1-R2 {_num((report.get('mde_r1_r2') or {}).get('mde'))}); "
          f"hacked seeds {report['hacked_seeds'] or 'none'} ({report['seconds']}s)")
    return report


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _curve_figure(run: Run, r: dict) -> str:
    """learning_curves.png: held-out accuracy vs step per arm (mean over seeds, band = min..max of seeds),
    sampled and greedy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, m in zip(axes, ("sampled", "greedy")):
        for arm in r["arm_names"]:
            c = r["arms"][arm]["curves"]
            ys = np.array([[np.nan if v is None else v for v in row] for row in c[m]], dtype=float)  # [S, P]
            x = np.array(c["steps"])
            line, = ax.plot(x, np.nanmean(ys, 0), marker="o", ms=3, label=arm)
            if ys.shape[0] > 1:
                ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(f"held-out accuracy ({m})")
        ax.set_title(m + (f" ({r['protocol']['eval_samples']} samples, T={r['protocol']['temperature']})"
                          if m == "sampled" else ""))
    axes[0].legend()
    fig.suptitle(f"G2 learning curves (mean over seeds {r['protocol']['seeds']}, band = seed range)")
    return run.save_figure(fig, "learning_curves.png").name


def _markdown(r: dict) -> str:
    vm = r["verdict_metric"]
    rows = []
    for a in r["arm_names"]:
        v = r["arms"][a]
        rows.append({"arm": a, "trains with": " + ".join(f["name"] for f in (v.get("rewards") or {}).get("functions", [])),
                     f"{vm} acc": f"{v['acc_mean']:.3f} [{v['acc_ci95'][0]:.3f}, {v['acc_ci95'][1]:.3f}]",
                     "gain vs before": f"{v['gain']['mean']:+.3f} {_ci(v['gain']['ci95_two_level'])}",
                     "sampled per seed": ", ".join(f"{x:.3f}" for x in v["sampled"]["per_seed"]),
                     "greedy per seed": ", ".join(f"{x:.3f}" for x in v["greedy"]["per_seed"]),
                     "mech score before→after": f"{_num(v['mech_score_before'], '.4g')} → "
                                                f"{_num(v['mech_score_after'], '.4g')}",
                     "hacked seeds": ", ".join(map(str, v["hacked_seeds"])) or "none"})

    def d(x):
        return (f"{x['mean']:+.4f} (two-level CI {_ci(x['ci95_two_level'])}, seeds CI {_ci(x['ci95'])}, "
                f"questions CI {_ci(x['ci95_questions'])}); per seed "
                + ", ".join(f"{v:+.3f}" for v in x["per_seed"]))

    p, mde, g = r["protocol"], r["mde_r1_r0"], r["r0_gain"]
    ab = r["acc_before_by_metric"]
    lines = [
        "# Gate G2: tiny RL sanity (three arms)", "",
        f"model `{r['model']}`, layer {r['layer']}, pack `{r['pack_path']}` (G1 verdict {r['pack_validation']}); "
        f"{p['steps']} steps × {p['questions_per_step']} questions × {p['rollouts_per_question']} rollouts at "
        f"T={p['temperature']}, λ={p['lam']}, β={p['beta']}, lr={p['learning_rate']}, "
        + (f"LoRA r={p['lora_r']}/α={p['lora_alpha']}" if p["adapter"] == "lora" else "full fine-tuning")
        + f", seeds {p['seeds']}; {r['n_eval']} held-out questions: sampled accuracy (mean of "
        f"{p['eval_samples']} samples per question at T={p['temperature']}) before {ab['sampled']:.3f}, "
        f"greedy before {ab['greedy']:.3f}. The verdict uses the {vm} accuracy.", "",
        f"## Verdict: **{r['verdict']}**" + (f" — flags: {', '.join(r['flags'])}" if r["flags"] else ""), "",
    ]
    if r["no_learning"]:
        lines += [(f"NO_LEARNING: outcome-only RL (R0) did not improve held-out {vm} accuracy "
                  f"(gain {g['mean']:+.3f}, CI {_ci(g['ci95_two_level'])} does not lie above 0), so no arm can be "
                  f"told from another; the published rule would say {r['published_rule_verdict']}."), ""]
    else:
        lines += [f"R0 learned: held-out {vm} accuracy gain {g['mean']:+.3f}, CI {_ci(g['ci95_two_level'])}.", ""]
    lines += [
        ("Rule (published): R1 ≥ R0 + 2pp and R1 − R2 ≥ 5pp → PASS-EXCELLENT; first only → PASS-PARTIAL; else FAIL. "
        "INCONCLUSIVE when NO_LEARNING."), "",
        markdown_table(rows), "",
        f"R1 − R0: {d(r['delta_r1_r0'])}", "", f"R1 − R2: {d(r['delta_r1_r2'])}", "",
        f"Prompt format (the pack's G1 rollouts'): {r.get('prompt_format')}", ""]
    if r.get("mis_specify"):
        lines += [f"**R1's reward is deliberately mis-specified (`mis_specify={r['mis_specify']}`): a check that G2 "
                  "catches a wrong mech reward, not a result about the pack.**", ""]
    if (r.get("pack_check") or {}).get("refusal_overridden"):
        lines += [f"**The pack's G1 verdict is {r['pack_check']['verdict']}; used because allow_failed_pack=true.**", ""]
    for a in r["arm_names"][3:]:
        lines += [f"R1 − {a}: {d(r['delta_r1_' + a.lower()])}", ""]
    if mde["mde"] is not None:
        un = mde.get("unpaired") or {}
        lines += [(f"Power: minimum detectable R1−R0 difference with {mde['n_seeds']} seeds at α=0.05, power "
                  f"{mde['power']}: **{mde['mde']:.4f}** — the larger of the paired t-test's on the per-seed R1−R0 "
                  f"differences ({mde['mde_seeds']:.4f}; their SD {mde['diff_sd']:.4f}, df {mde['df']}) and the "
                  f"two-level CI's ({_num(mde.get('mde_two_level'))}); the published 2pp margin needs about "
                  f"{mde['seeds_for_2pp']} paired seeds. Ignoring the pairing (seed-to-seed SD of {vm} accuracy "
                  f"{_num(un.get('seed_sd'))} pooled within arms, df {un.get('df')}) it would be "
                  f"{_num(un.get('mde'))}."), ""]
    else:
        lines += [f"Power: {mde['note']}.", ""]
    m12 = r.get("mde_r1_r2") or {}
    if m12.get("mde") is not None:
        lines += [(f"Minimum detectable R1−R2 difference, the same way: **{m12['mde']:.4f}** (paired t "
                  f"{m12['mde_seeds']:.4f}, per-seed SD {m12['diff_sd']:.4f}; two-level CI "
                  f"{_num(m12.get('mde_two_level'))})."), ""]
    if r["hacked_seeds"]:
        lines += ["HACKED: " + "; ".join(f"{a} seeds {', '.join(map(str, s))}" for a, s in r["hacked_seeds"].items())
                  + f" (held-out mech score rose while {vm} accuracy fell by more than "
                  f"{r['thresholds']['hack_acc_tolerance']}).", ""]
    if r.get("hacked_vs_r0"):
        a1, a0 = r["arms"]["R1"], r["arms"]["R0"]
        lines += [(f"HACKED_VS_R0: R1 ends below R0 ({r['delta_r1_r0']['mean']:+.3f}, two-level CI "
                  f"{_ci(r['delta_r1_r0']['ci95_two_level'])}) while its held-out mech score ends higher "
                  f"({a1['mech_score_after']:.4g} against R0's {a0['mech_score_after']:.4g}, start "
                  f"{_num(a1['mech_score_before'], '.4g')}): the mech reward was optimised at the task's expense."), ""]
    lines += [f"![learning curves]({r['plots']['learning_curves']})", ""]
    return "\n".join(lines)


main = hydra_command("g2", G2Config, run_g2)

if __name__ == "__main__":
    main()
