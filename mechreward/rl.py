"""`python -m mechreward.rl`: the G3 launcher — GRPO (TRL) + LoRA (PEFT) with the mechanistic reward.

Model, task, feature pack, LoRA, and TRL `GRPOConfig` fields passed through by their TRL names
under `grpo:` (`grpo.learning_rate=3e-6`, `grpo.use_vllm=true`, `grpo.vllm_mode=server`, ...; a
key that is not a GRPOConfig field is an error naming it). The mech reward is the pack's SAE
score (`reward=sae`, trajectory or `per_token=true`), the raw direction (`reward=direction`) or
none (`reward=none`: outcome only); λ and β schedules are linear (`lam`→`lam_end`,
`grpo.beta`→`beta_end`). Every `eval_every` steps the hacking monitor evaluates held-out
accuracy, the G1 correlation and canary hack rate. Checkpoints every `grpo.save_steps` into
`<run dir>/checkpoints` (or `output_dir`); `resume=true` continues from the latest one there.

With no arguments: the organism on arithmetic with its G1 pack, a short CPU run.
Preset: `+recipe=g3_qwen35_4b_gsm8k` (the published G3 run).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cli import hydra_command
from .errors import ConfigError, DataError
from .models import ModelConfig, load_model, resolve_device
from .run import Run
from .tasks import TaskConfig, load_task
from .vllm_backend import VLLMSettings

REWARDS = ("sae", "direction", "none")


@dataclass
class LoraSettings:
    """PEFT LoRA (a fresh adapter on the loaded model)."""

    enabled: bool = True
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class RLConfig:
    """Config of `python -m mechreward.rl` (conf/rl.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", n=400))
    """RL training questions."""
    eval_task: TaskConfig = field(default_factory=lambda: TaskConfig(split="eval", n=100, seed=1))
    """Held-out questions for the monitor (accuracy, G1 correlation)."""
    n_canaries: int = 0
    """Canary prompts: the last `n_canaries` questions of `eval_task` (kept out of the held-out set)."""
    pack: str | None = None
    """Feature pack; null = the latest G1 run's pack of this model (reward=none needs none)."""
    sae_path: str | None = None
    reward: str = "sae"
    """`sae` (the pack's SAE score), `direction` (raw diff-of-means baseline) or `none` (outcome only)."""
    per_token: bool = False
    """Dense per-token mech advantages (G3 published) instead of a trajectory reward."""
    lam: float = 0.1
    lam_end: float | None = None
    """λ at the last step (linear schedule); null = constant."""
    beta_end: float | None = None
    """β at the last step (linear from grpo.beta); null = constant."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    chat_template: bool | None = None
    """Conversational prompts through the tokenizer's chat template; null = when it has one."""
    grpo: dict = field(default_factory=dict)
    """GRPOConfig overrides by their TRL names."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings when `grpo.use_vllm=true` (dtype, CPU KV cache); TRL's vllm_* fields stay under grpo."""
    eval_every: int = 10
    """Monitor every N steps (0 = never)."""
    eval_max_new_tokens: int = 64
    output_dir: str | None = None
    """Checkpoints; null = `<run dir>/checkpoints`."""
    resume: bool = False
    """Resume from the latest checkpoint in the output dir."""
    dry_run: bool = False
    """Resolve and validate the config (GRPOConfig included), load nothing, train nothing."""
    seed: int = 0


DEFAULT_GRPO = dict(learning_rate=1e-5, per_device_train_batch_size=8, num_generations=4, max_steps=40,
                    beta=0.05, max_completion_length=64, temperature=1.0, logging_steps=1, save_steps=20,
                    save_strategy="steps", report_to="none", disable_dropout=True, bf16=False)
"""Organism defaults; everything here is a GRPOConfig field and can be overridden under `grpo:`."""


def build_grpo_args(cfg: RLConfig, output_dir: str):
    from .grpo import grpo_config

    import torch

    base = {**DEFAULT_GRPO, "output_dir": output_dir, "seed": cfg.seed}
    overrides = dict(cfg.grpo)
    if resolve_device(cfg.model.device).type == "cpu":
        base["use_cpu"] = True
        if cfg.dry_run and not torch.cuda.is_available():
            # a dry run of a GPU preset on a CPU-only machine: validate everything but the precision
            overrides.update(bf16=False, fp16=False)
    return grpo_config(base, overrides)


def _prompt(q, chat: bool):
    return [{"role": "user", "content": q.prompt}] if chat else q.prompt


def run_rl(cfg: RLConfig, run: Run) -> dict:
    from .grpo import HackingMonitor, MechGRPOTrainer, evaluate_policy
    from .reward import DirectionReward, OutcomeReward, SAEFeatureReward

    t0 = time.time()
    if cfg.reward not in REWARDS:
        raise ConfigError(f"unknown reward {cfg.reward!r}; expected one of {REWARDS}")
    output_dir = cfg.output_dir or str(run.path("checkpoints"))
    args = build_grpo_args(cfg, output_dir)
    if cfg.dry_run:
        report = {"dry_run": True, "grpo": {**{k: getattr(args, k) for k in sorted(set(DEFAULT_GRPO) | set(cfg.grpo))},
                                            **cfg.grpo},
                  "model": cfg.model.name_or_path, "task": cfg.task.name, "reward": cfg.reward,
                  "per_token": cfg.per_token, "lam": cfg.lam, "lora": asdict(cfg.lora)}
        run.write_report(report)
        print(f"rl dry run: {report}")
        return report

    model, tokenizer = load_model(cfg.model)
    from .rollouts import use_chat_template

    chat = use_chat_template(tokenizer, cfg.chat_template)
    task = load_task(cfg.task)
    eval_task = load_task(cfg.eval_task)
    eval_qs = eval_task.questions
    canaries = eval_qs[len(eval_qs) - cfg.n_canaries:] if cfg.n_canaries else []
    heldout = eval_qs[:len(eval_qs) - cfg.n_canaries] if cfg.n_canaries else eval_qs
    if not heldout:
        raise DataError("no held-out questions left after taking the canaries")

    mech = None
    pack_path = None
    if cfg.reward != "none":
        from .g2 import find_pack
        from .probe import FeaturePack

        pack_path = cfg.pack or find_pack(cfg.model.name_or_path)
        if pack_path is None:
            raise DataError(f"no feature pack given and no G1 pack of {cfg.model.name_or_path!r} under runs/g1: "
                            "run `python -m mechreward.g1` first or pass pack=<file>")
        device = resolve_device(cfg.model.device)
        if cfg.reward == "sae":
            mech = SAEFeatureReward.from_pack(pack_path, cfg.sae_path, device=device, per_token=cfg.per_token)
        else:
            mech = DirectionReward.from_pack(FeaturePack.load(pack_path), per_token=cfg.per_token).to(device)
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": _prompt(q, chat), "answer": q.answer} for q in task.questions])
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    callbacks = []
    monitor = None
    if mech is not None and cfg.eval_every > 0:
        monitor = HackingMonitor(tokenizer, eval_task, heldout, mech, every=cfg.eval_every, canaries=canaries,
                                 max_new_tokens=cfg.eval_max_new_tokens, run=run, chat=chat)
        callbacks.append(monitor)
    funcs = [OutcomeReward(task)] + ([mech] if mech is not None else [])
    beta_schedule = None if cfg.beta_end is None else [args.beta, cfg.beta_end]
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=callbacks,
                              mech_lambda=[cfg.lam, cfg.lam if cfg.lam_end is None else cfg.lam_end],
                              beta_schedule=beta_schedule, vllm_settings=cfg.vllm)
    resume = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if resume is None:
            raise DataError(f"resume=true but no checkpoint in {output_dir}")
        print(f"rl: resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    for row in trainer.state.log_history:
        run.log(int(row.get("step", 0)), **{k: v for k, v in row.items() if k != "step"})
    final = evaluate_policy(trainer.model, tokenizer, heldout, eval_task, mech, greedy=True,
                            max_new_tokens=cfg.eval_max_new_tokens, chat=chat)
    trainer.save_model(str(Path(output_dir) / "final"))
    report = {"model": cfg.model.name_or_path, "task": cfg.task.name, "reward": cfg.reward, "per_token": cfg.per_token,
              "pack_path": None if pack_path is None else str(pack_path), "steps": trainer.state.global_step,
              "resumed_from": resume, "heldout_accuracy": final["accuracy"], "heldout_mech_score": final["score_mean"],
              "heldout_rho": final["rho"], "n_heldout": final["n"], "monitor": monitor.report() if monitor else None,
              "hacking": bool(monitor and monitor.hacking), "capture": trainer.mech_capture_log[-1:] or None,
              "output_dir": output_dir, "seconds": round(time.time() - t0, 1)}
    md = ["# G3 RL run", "", f"model `{report['model']}`, task `{report['task']}`, reward `{cfg.reward}`"
          f"{' (per-token)' if cfg.per_token else ''}, {report['steps']} steps; held-out accuracy "
          f"{final['accuracy']:.3f} (n={final['n']})" + ("; **HACKING flagged**" if report["hacking"] else ""), ""]
    run.write_report(report, "\n".join(md))
    print(f"rl: {report['steps']} steps, held-out accuracy {final['accuracy']:.3f}, hacking={report['hacking']}")
    return report


main = hydra_command("rl", RLConfig, run_rl)

if __name__ == "__main__":
    main()
