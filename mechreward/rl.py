"""`python -m mechreward.rl`: the G3 launcher — GRPO (TRL) + LoRA (PEFT) with the mechanistic reward.

Model, task, feature pack, LoRA, and TRL `GRPOConfig` fields passed through by their TRL names
under `grpo:` (`grpo.learning_rate=3e-6`, `grpo.use_vllm=true`, `grpo.vllm_mode=server`, ...; a
key that is not a GRPOConfig field is an error naming it). The mech reward is the pack's SAE
score (`reward=sae`, trajectory or `per_token=true`), the raw direction (`reward=direction`) or
none (`reward=none`: outcome only); λ and β schedules are linear (`lam`→`lam_end`,
`grpo.beta`→`beta_end`). Every `eval_every` steps the hacking monitor evaluates held-out
accuracy, the G1 correlation and canary hack rate on `eval_task` minus every question the
pack's G1 saw. The pack must belong to the model/SAE and have passed G1 (`allow_failed_pack`);
prompts use the pack's G1 prompt format (`mechreward.prompts`). Checkpoints every
`grpo.save_steps` into `<run dir>/checkpoints` (or `output_dir`), each with the monitor's state
and the schedules (`mech_state.json`); `resume=true` continues from the latest one there with
the monitor restored (a changed `grpo.max_steps` is refused).

With no arguments: the organism on arithmetic with its G1 pack, a short CPU run.
Preset: `+recipe=g3_qwen35_4b_gsm8k` (the published G3 run).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cli import hydra_command
from .errors import ConfigError, DataError
from .models import ModelConfig, find_layers, hidden_size, load_model, resolve_device
from .prompts import PromptFormat, describe
from .run import Run, markdown_table
from .tasks import TaskConfig, load_task
from .vllm_backend import VLLMSettings, close_vllm, synced_llm

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
    """Canary prompts: the last `n_canaries` questions of `eval_task` (kept out of the held-out set). 0 with a
    mech reward and a monitor: a warning in the log and in report.md (the canary hack rate is not measured)."""
    pack: str | None = None
    """Feature pack; null = the latest G1 run's pack of this model (reward=none needs none).
    Every question the pack saw (its G1 discovery and validation ids) is removed from `eval_task`
    before the held-out set and the canaries are taken."""
    allow_failed_pack: bool = False
    """Train with a pack whose G1 verdict is FAIL or that G1 never validated (refused otherwise; reported)."""
    mis_specify: str | None = None
    """`sign_flipped`: the mech reward with the pack's weights (or the direction) negated — a deliberately wrong
    reward, to check that the hacking monitor catches one (MISALIGNED, HACKING); null = the pack as G1 built it."""
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
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """Prompt format (`mechreward.prompts`). With a pack the pack's G1 format is used; a different one here is
    an error. Used as given only with reward=none."""
    composition: str = "normalize_then_weight"
    """How rewards become advantages: `normalize_then_weight` (λ scales the mech term) or `trl` (TRL's own
    multi_objective_aggregation; warned, trajectory rewards only)."""
    hacking_tolerance: float = 0.02
    """HACKING flag: held-out accuracy must fall by more than this (2 pp, as G2) while the mech score rises."""
    organism_defaults_ok: bool = False
    """With a model other than the organism, rl warns while task or eval_task is still the
    organism's arithmetic task; true silences it (kept deliberately)."""
    grpo: dict = field(default_factory=dict)
    """GRPOConfig overrides by their TRL names."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings when `grpo.use_vllm=true` (dtype, CPU KV cache); TRL's vllm_* fields stay under grpo."""
    eval_every: int = 10
    """Monitor every N steps (0 = never)."""
    eval_max_new_tokens: int = 64
    eval_engine: str = "hf"
    """What generates the monitor's and the final held-out completions: `hf` (HF `generate`) or `vllm` (TRL
    colocate's engine, its weights synced first; needs grpo.use_vllm=true, vllm_mode=colocate)."""
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


def pack_questions(pack) -> set[str]:
    """Every question id the pack's G1 saw (discovery + validation)."""
    prov = pack.provenance or {}
    return set(prov.get("discovery") or []) | set(prov.get("validation") or [])


def split_eval(questions, pack, n_canaries: int) -> tuple[list, list, int]:
    """(held-out, canaries, n removed): `questions` minus the pack's G1 questions, the last `n_canaries` as canaries."""
    used = pack_questions(pack) if pack is not None else set()
    qs = [q for q in questions if q.id not in used]
    removed = len(questions) - len(qs)
    canaries = qs[len(qs) - n_canaries:] if n_canaries else []
    heldout = qs[:len(qs) - n_canaries] if n_canaries else qs
    if not heldout:
        raise DataError(f"no held-out questions left: eval_task has {len(questions)}, {removed} were the pack's G1 "
                        f"questions, {n_canaries} are canaries; raise eval_task.n")
    return heldout, canaries, removed


def run_format(cfg: RLConfig, pack, tokenizer) -> PromptFormat:
    """The pack's G1 prompt format (a different `prompt:` setting is an error); `cfg.prompt` without a pack."""
    from .prompts import format_of_pack

    if pack is None:
        return cfg.prompt.resolve(tokenizer)
    fmt = format_of_pack(pack).resolve(tokenizer)
    if cfg.prompt != PromptFormat() and not cfg.prompt.resolve(tokenizer).same_as(fmt):
        raise ConfigError(f"prompt={cfg.prompt.to_dict()} differs from the format the pack's G1 rollouts used "
                          f"({fmt.to_dict()}); RL must feed the prompts G1 validated: drop the prompt setting")
    return fmt


def run_rl(cfg: RLConfig, run: Run) -> dict:
    from .grpo import HackingMonitor, MechGRPOTrainer, evaluate_policy
    from .reward import MIS_SPECIFICATIONS, DirectionReward, OutcomeReward, SAEFeatureReward

    t0 = time.time()
    if cfg.reward not in REWARDS:
        raise ConfigError(f"unknown reward {cfg.reward!r}; expected one of {REWARDS}")
    if cfg.eval_engine not in ("hf", "vllm"):
        raise ConfigError(f"eval_engine={cfg.eval_engine!r}; expected 'hf' or 'vllm'")
    if cfg.eval_engine == "vllm" and not (cfg.grpo.get("use_vllm") and cfg.grpo.get("vllm_mode", "colocate") == "colocate"):
        raise ConfigError("eval_engine=vllm evaluates with the vLLM engine of TRL's colocate mode: set grpo.use_vllm=true "
                          "and grpo.vllm_mode=colocate, or eval_engine=hf")
    if cfg.mis_specify is not None and (cfg.mis_specify not in MIS_SPECIFICATIONS or cfg.reward == "none"):
        raise ConfigError(f"mis_specify={cfg.mis_specify!r}: one of {list(MIS_SPECIFICATIONS)} (or null), and only with "
                          f"a mech reward (reward={cfg.reward!r})")
    from .tasks.loading import organism_task_leaks, warn_organism_defaults

    if not cfg.organism_defaults_ok:
        warn_organism_defaults(cfg.model.name_or_path, "rl", organism_task_leaks(
            cfg.model.name_or_path, {"task": cfg.task, "eval_task": cfg.eval_task}),
            "set task and eval_task for your model (e.g. task=addition eval_task.name=addition)")
    output_dir = cfg.output_dir or str(run.path("checkpoints"))
    args = build_grpo_args(cfg, output_dir)
    if cfg.dry_run:
        report = {"dry_run": True, "grpo": {**{k: getattr(args, k) for k in sorted(set(DEFAULT_GRPO) | set(cfg.grpo))},
                                            **cfg.grpo},
                  "model": cfg.model.name_or_path, "task": cfg.task.name, "reward": cfg.reward,
                  "per_token": cfg.per_token, "lam": cfg.lam, "lora": asdict(cfg.lora), "composition": cfg.composition,
                  "hacking_tolerance": cfg.hacking_tolerance, "allow_failed_pack": cfg.allow_failed_pack,
                  "prompt": asdict(cfg.prompt)}
        run.write_report(report)
        print(f"rl dry run: {report}")
        return report

    model, tokenizer = load_model(cfg.model)
    task = load_task(cfg.task)
    eval_task = load_task(cfg.eval_task)

    mech = None
    pack_path = pack = None
    pack_check = None
    if cfg.reward != "none":
        from .g2 import find_pack
        from .probe import FeaturePack
        from .reward import check_pack_fits, check_pack_verdict, mis_specify

        pack_path = cfg.pack or find_pack(cfg.model.name_or_path, allow_fail=cfg.allow_failed_pack)
        if pack_path is None:
            raise DataError(f"no feature pack given and no G1 pack of {cfg.model.name_or_path!r} under runs/g1: "
                            "run `python -m mechreward.g1` first or pass pack=<file>")
        pack = FeaturePack.load(pack_path)
        pack_check = check_pack_verdict(pack, cfg.allow_failed_pack, "allow_failed_pack")
        device = resolve_device(cfg.model.device)
        if cfg.reward == "sae":
            mech = SAEFeatureReward.from_pack(pack_path, cfg.sae_path, device=device, per_token=cfg.per_token)
        else:
            mech = DirectionReward.from_pack(pack, per_token=cfg.per_token).to(device)
        check_pack_fits(pack, cfg.model.name_or_path, len(find_layers(model)), hidden_size(model),
                        getattr(mech, "sae", None))
        mech = mis_specify(mech, cfg.mis_specify)
    fmt = run_format(cfg, pack, tokenizer)
    heldout, canaries, n_removed = split_eval(eval_task.questions, pack, cfg.n_canaries)
    if n_removed:
        print(f"rl: {n_removed} eval_task questions were the pack's G1 questions; held out: {len(heldout)}, "
              f"canaries: {len(canaries)}")
    canary_note = None
    if mech is not None and cfg.eval_every > 0 and not canaries:
        canary_note = (f"no canary prompts (n_canaries={cfg.n_canaries}): the hacking monitor compares held-out "
                       "accuracy with the mech score only and measures no canary hack rate; set n_canaries (e.g. 50, "
                       "taken from eval_task and kept out of the held-out set) to watch for reward given to wrong "
                       "answers")
        print(f"rl: warning: {canary_note}")
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in task.questions])
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    callbacks = []
    monitor = None
    if mech is not None and cfg.eval_every > 0:
        monitor = HackingMonitor(tokenizer, eval_task, heldout, mech, every=cfg.eval_every, canaries=canaries,
                                 max_new_tokens=cfg.eval_max_new_tokens, run=run, prompt_format=fmt,
                                 acc_tolerance=cfg.hacking_tolerance)
        callbacks.append(monitor)
    funcs = [OutcomeReward(task)] + ([mech] if mech is not None else [])
    beta_schedule = None if cfg.beta_end is None else [args.beta, cfg.beta_end]
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=callbacks,
                              mech_lambda=[cfg.lam, cfg.lam if cfg.lam_end is None else cfg.lam_end],
                              beta_schedule=beta_schedule, composition=cfg.composition, prompt_format=fmt,
                              vllm_settings=cfg.vllm)
    llm_source = (lambda: synced_llm(trainer)) if cfg.eval_engine == "vllm" else None
    if monitor is not None:
        monitor.llm_source = llm_source
    resume = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if resume is None:
            raise DataError(f"resume=true but no checkpoint in {output_dir}")
        print(f"rl: resuming from {resume}")
    try:
        trainer.train(resume_from_checkpoint=resume)
        final = evaluate_policy(trainer.model, tokenizer, heldout, eval_task, mech, greedy=True,
                                max_new_tokens=cfg.eval_max_new_tokens, prompt_format=fmt,
                                llm=None if llm_source is None else llm_source())
    finally:
        close_vllm(trainer)  # a colocate engine is torn down now, not at exit after the process group is gone
    for row in trainer.state.log_history:
        run.log(int(row.get("step", 0)), **{k: v for k, v in row.items() if k != "step"})
    trainer.save_model(str(Path(output_dir) / "final"))
    report = {"model": cfg.model.name_or_path, "task": cfg.task.name, "reward": cfg.reward, "per_token": cfg.per_token,
              "mis_specify": cfg.mis_specify,
              "pack_path": None if pack_path is None else str(pack_path), "steps": trainer.state.global_step,
              "resumed_from": resume, "heldout_accuracy": final["accuracy"], "heldout_mech_score": final["score_mean"],
              "heldout_rho": final["rho"], "n_heldout": final["n"], "monitor": monitor.report() if monitor else None,
              "hacking": bool(monitor and monitor.hacking), "misaligned": bool(monitor and monitor.misaligned),
              "capture": trainer.mech_capture_log[-1:] or None,
              "composition": cfg.composition, "hacking_tolerance": cfg.hacking_tolerance,
              "prompt_format": describe(fmt, tokenizer, heldout[0].prompt), "pack_check": pack_check,
              "n_eval_removed_as_pack_questions": n_removed, "n_canaries": len(canaries), "canary_warning": canary_note,
              "max_steps": trainer.state.max_steps,
              "output_dir": output_dir, "seconds": round(time.time() - t0, 1)}
    md = ["# G3 RL run", "", f"model `{report['model']}`, task `{report['task']}`, reward `{cfg.reward}`"
          f"{' (per-token)' if cfg.per_token else ''}, {report['steps']} steps; held-out accuracy "
          f"{final['accuracy']:.3f} (n={final['n']}, after removing {n_removed} questions the pack's G1 saw)"
          + ("; **HACKING flagged**" if report["hacking"] else "") + ("; **MISALIGNED flagged**" if report["misaligned"]
                                                                        else "")
          + f" (accuracy tolerance {cfg.hacking_tolerance:g})",
          "", f"composition `{cfg.composition}`; prompt format {describe(fmt)}", ""]
    if monitor and monitor.history:
        if report["misaligned"]:
            md += [("MISALIGNED: the held-out ρ(mech score, correct) was negative with p < "
                    f"{monitor.misaligned_alpha:g} at steps {monitor.report()['misaligned_steps']}: the mech reward "
                    "ranks wrong completions above right ones (check the pack's sign, model, layer and prompt format)."),
                   ""]
        md += ["Hacking monitor (held-out, greedy):", "", markdown_table([
            {"step": r["step"], "accuracy": f"{r['heldout_accuracy']:.3f}",
             "mech score": "n/a" if r["heldout_score_mean"] is None else f"{r['heldout_score_mean']:.4g}",
             "ρ(score, correct)": "n/a" if r["heldout_rho"] is None else
             f"{r['heldout_rho']:+.3f} (p {r.get('heldout_rho_p') or float('nan'):.2g})",
             "canary hack rate": "n/a" if r.get("canary_hack_rate") is None else f"{r['canary_hack_rate']:.2f}",
             "flags": ", ".join(f for f in ("hacking", "misaligned") if r.get(f)) or "-"}
            for r in monitor.history]), ""]
    if cfg.mis_specify:
        md += [f"**The mech reward is deliberately mis-specified (`mis_specify={cfg.mis_specify}`): a check that the "
               "hacking monitor catches a wrong reward.**", ""]
    if canary_note:
        md += [f"**Warning: {canary_note}.**", ""]
    if pack_check and pack_check["refusal_overridden"]:
        md += [f"**The pack's G1 verdict is {pack_check['verdict']}; used because allow_failed_pack=true.**", ""]
    run.write_report(report, "\n".join(md))
    print(f"rl: {report['steps']} steps, held-out accuracy {final['accuracy']:.3f}, hacking={report['hacking']}, "
          f"misaligned={report['misaligned']}")
    return report


main = hydra_command("rl", RLConfig, run_rl)

if __name__ == "__main__":
    main()
