"""`python -m mechreward.g2`: gate G2, three GRPO arms (R0 outcome, R1 + λ·SAE pack, R2 + λ·direction).

With no arguments: the organism with its G1 pack (the latest `runs/g1/*/feature_pack.json` of
the organism, or a G1 run made now into `<run dir>/g1`), arithmetic train questions for RL and
held-out eval questions not used by G1, 3 seeds, on a CPU in ≤ 15 minutes. conf/g2.yaml holds
the organism's settings (see its comments for which differ from the published ones: 30 steps,
2 questions × 2 rollouts, LoRA r=32/α=64, λ=0.1, β=0.05, lr 1e-6…3e-6, 50–100 held-out questions).
`pack=<file>` picks a pack; the SAE is the pack's (`sae_path=` to relocate it).
Protocol, statistics and verdict: `mechreward.gates.g2`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cli import hydra_command
from .errors import ConfigError, DataError
from .gates.g2 import ARMS, G2Protocol, summarise
from .models import ModelConfig, load_model, resolve_device
from .run import Run, markdown_table
from .tasks import TaskConfig, load_task
from .vllm_backend import VLLMSettings


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
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings when `protocol.grpo.use_vllm=true` (dtype, CPU KV cache); TRL's vllm_* fields stay in protocol.grpo."""
    seed: int = 0


# --------------------------------------------------------------------------- pack

def find_pack(model_name: str, root: Path = Path("runs") / "g1") -> Path | None:
    """The newest `feature_pack.json` under runs/g1 built for `model_name`."""
    from .probe import FeaturePack

    found = []
    for p in root.glob("*/feature_pack.json"):
        try:
            pack = FeaturePack.load(p)
        except Exception:  # noqa: BLE001 - a half-written or foreign file is skipped
            continue
        if pack.model == model_name and pack.validation:
            found.append((p.stat().st_mtime, p))
    return max(found)[1] if found else None


def resolve_pack(cfg: G2Config, run: Run) -> Path:
    if cfg.pack:
        return Path(cfg.pack)
    found = find_pack(cfg.model.name_or_path)
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


def run_arm(arm: str, seed: int, cfg: G2Config, task, train_qs, eval_qs, rewards: dict, out_dir: Path) -> dict:
    """Train one arm from fresh weights (base model reloaded, new LoRA) and evaluate it on held-out questions."""
    from peft import LoraConfig

    from .grpo import MechGRPOTrainer, evaluate_policy, grpo_config
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
        use_cpu=on_cpu, bf16=False, disable_dropout=True, shuffle_dataset=True), p.grpo)
    mech = rewards.get(arm)
    funcs = [OutcomeReward(task)] + ([mech] if mech is not None else [])
    lora = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=p.lora_target_modules, lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=_dataset(train_qs),
                              processing_class=tokenizer, peft_config=lora, mech_lambda=p.lam,
                              vllm_settings=cfg.vllm)
    init_sha = weights_sha(trainer.model)
    trainer.train()
    corr = [r[k] for r in trainer.state.log_history for k in r if k.endswith("_outcome_corr")]
    ev = evaluate_policy(trainer.model, tokenizer, eval_qs, task, rewards.get(arm) or rewards.get("R1"),
                         greedy=True, max_new_tokens=p.eval_max_new_tokens)
    return {"arm": arm, "seed": seed, "accuracy": ev["accuracy"], "correct": ev["correct"].tolist(),
            "score_mean": ev["score_mean"], "mech_outcome_corr": float(np.mean(corr)) if corr else None,
            "train_reward_outcome": [r.get("rewards/outcome/mean") for r in trainer.state.log_history
                                     if "rewards/outcome/mean" in r],
            "init_weights_sha": init_sha, "seconds": round(time.time() - t0, 1)}


def weights_sha(model) -> str:
    """sha256 over every parameter (name, bytes) of a model: equal starting weights have equal digests."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- command

def heldout_questions(task, pack, n: int):
    used = set((pack.provenance or {}).get("discovery") or []) | set((pack.provenance or {}).get("validation") or [])
    qs = [q for q in task.questions if q.id not in used]
    if len(qs) < n:
        raise DataError(f"only {len(qs)} held-out questions left after removing the pack's {len(used)} G1 questions; "
                        f"need protocol.n_eval={n} (raise task.n)")
    return qs[:n]


def run_g2(cfg: G2Config, run: Run) -> dict:
    from .grpo import evaluate_policy
    from .probe import FeaturePack
    from .reward import DirectionReward, SAEFeatureReward

    t0 = time.time()
    p = cfg.protocol
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown or not cfg.arms:
        raise ConfigError(f"unknown arms {unknown}; expected a subset of {list(ARMS)}")
    if set(cfg.arms) != set(ARMS):
        raise ConfigError("the G2 verdict needs all three arms R0, R1, R2")
    pack_path = resolve_pack(cfg, run)
    pack = FeaturePack.load(pack_path)
    device = resolve_device(cfg.model.device)
    sae_reward = SAEFeatureReward.from_pack(pack_path, cfg.sae_path, device=device, per_token=p.per_token)
    dir_reward = DirectionReward.from_pack(pack, per_token=p.per_token).to(device)
    rewards = {"R1": sae_reward, "R2": dir_reward}
    task = load_task(cfg.task)
    eval_qs = heldout_questions(task, pack, p.n_eval)
    train_task = load_task(cfg.train_task)
    n_train = p.steps * p.questions_per_step
    if len(train_task.questions) < n_train:
        raise DataError(f"train_task has {len(train_task.questions)} questions; {p.steps} steps × "
                        f"{p.questions_per_step} need {n_train}")
    train_qs = train_task.questions[:n_train]

    # Before: every arm starts from the same weights (a fresh LoRA is the identity), so once.
    base, tok = load_model(cfg.model)
    before = {arm: evaluate_policy(base, tok, eval_qs, task, r, greedy=True, max_new_tokens=p.eval_max_new_tokens)
              for arm, r in rewards.items()}
    acc_before = before["R1"]["accuracy"]
    score_before = {arm: ev["score_mean"] for arm, ev in before.items()}
    del base
    print(f"G2: held-out accuracy before {acc_before:.3f} (n={len(eval_qs)}); pack {pack_path}")

    results: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in p.seeds:
        for arm in ARMS:
            res = run_arm(arm, seed, cfg, task, train_qs, eval_qs, rewards, run.path(f"arms/{arm}-seed{seed}"))
            results[arm].append(res)
            run.log(sum(len(v) for v in results.values()), arm=arm, seed=seed, accuracy=res["accuracy"],
                    init_weights_sha=res["init_weights_sha"],
                    mech_score=res["score_mean"], mech_outcome_corr=res["mech_outcome_corr"], seconds=res["seconds"])
            print(f"G2: {arm} seed {seed}: held-out accuracy {res['accuracy']:.3f} ({res['seconds']}s)")
    report = summarise(results, acc_before, score_before, p)
    report.update(pack_path=str(pack_path), model=cfg.model.name_or_path, layer=pack.layer,
                  pack_validation=pack.validation.get("verdict"), n_eval=len(eval_qs), n_train_questions=n_train,
                  protocol=asdict(p), seconds=round(time.time() - t0, 1))
    run.write_report(report, _markdown(report))
    print(f"G2: verdict {report['verdict']}; R1-R0 {report['delta_r1_r0']['mean']:+.3f}, "
          f"R1-R2 {report['delta_r1_r2']['mean']:+.3f}; hacked={report['hacked']} ({report['seconds']}s)")
    return report


def _markdown(r: dict) -> str:
    rows = [{"arm": a, "acc_mean": v["acc_mean"], "acc_ci95": f"[{v['acc_ci95'][0]:.3f}, {v['acc_ci95'][1]:.3f}]",
             "per_seed": ", ".join(f"{x:.3f}" for x in v["per_seed"]),
             "mech score before→after": f"{v['mech_score_before']} → {v['mech_score_after']}", "hacked": v["hacked"]}
            for a, v in r["arms"].items()]

    def d(x):
        ci = x["ci95"]
        return f"{x['mean']:+.4f} (seeds CI {ci}, questions CI {x['ci95_questions']})"

    p = r["protocol"]
    return "\n".join([
        "# Gate G2: tiny RL sanity (three arms)", "",
        f"model `{r['model']}`, layer {r['layer']}, pack `{r['pack_path']}` (G1 verdict {r['pack_validation']}); "
        f"{p['steps']} steps × {p['questions_per_step']} questions × {p['rollouts_per_question']} rollouts, "
        f"λ={p['lam']}, β={p['beta']}, lr={p['learning_rate']}, LoRA r={p['lora_r']}/α={p['lora_alpha']}, "
        f"seeds {p['seeds']}, {r['n_eval']} held-out questions (greedy); accuracy before {r['acc_before']:.3f}.", "",
        f"## Verdict: **{r['verdict']}**" + (f" — flags: {', '.join(r['flags'])}" if r["flags"] else ""), "",
        "Rule (published): R1 ≥ R0 + 2pp and R1 − R2 ≥ 5pp → PASS-EXCELLENT; first only → PASS-PARTIAL; else FAIL.", "",
        markdown_table(rows), "",
        f"R1 − R0: {d(r['delta_r1_r0'])}", "", f"R1 − R2: {d(r['delta_r1_r2'])}", ""])


main = hydra_command("g2", G2Config, run_g2)

if __name__ == "__main__":
    main()
