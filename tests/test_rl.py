"""G3 launcher: GRPOConfig pass-through by TRL names (typos are errors naming the key), the published
preset composes to the published values, and a tiny run trains per-token, monitors, checkpoints and resumes."""

import json

import pytest

from mechreward.errors import ConfigError
from mechreward.grpo import grpo_config



def test_grpo_overrides_are_trl_field_names_and_a_typo_names_the_key(tmp_path):
    args = grpo_config({"output_dir": str(tmp_path), "use_cpu": True, "bf16": False},
                       {"num_iterations": 2, "vllm_mode": "server", "learning_rate": 3e-6})
    assert (args.num_iterations, args.vllm_mode, args.learning_rate) == (2, "server", 3e-6)
    with pytest.raises(ConfigError, match=r"grpo\.num_iteration .*num_iterations"):
        grpo_config({"output_dir": str(tmp_path)}, {"num_iteration": 2})


def test_published_g3_preset_composes_to_the_published_settings():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mechreward.cli import CONF_DIR, register
    from mechreward.rl import RLConfig, build_grpo_args

    register("rl", RLConfig)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("rl", overrides=["+recipe=g3_qwen35_4b_gsm8k", "dry_run=true"]))
    assert cfg.model.name_or_path == "Qwen/Qwen3.5-4B" and cfg.task.name == "gsm8k"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lam, cfg.per_token, cfg.reward) == (32, 64, 0.1, True, "sae")
    args = build_grpo_args(cfg, "/tmp/unused")
    assert (args.learning_rate, args.beta, args.num_generations) == (3e-6, 0.05, 4)
    # 4 questions x 4 rollouts per optimizer step
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    assert args.use_vllm and args.vllm_mode == "colocate"


def _tiny_rl_setup(tmp_path, organism=False, **pack_kw):
    """A model dir (a tiny random Qwen3, or with `organism` the built-in organism, which answers some held-out
    questions right and others wrong whatever the CPU's floating-point path) and a pack on a random SAE at layer 2."""
    from mechreward.probe import FeaturePack
    from mechreward.prompts import PromptFormat
    from mechreward.rollouts import sae_reference
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae
    from tests.tiny import save_tiny

    model_dir = "organism" if organism else str(save_tiny(tmp_path / "m", "qwen3"))
    d_in = 128 if organism else 64
    sae = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(d_in, 128, 8, metadata={"layer": 2}), seed=4),
                            tmp_path / "sae"))
    kw = dict(model=model_dir, layer=2, hook="model.layers.2", sae=sae_reference(sae),
              features=[{"index": i, "weight": (-1.0) ** i} for i in range(0, 80, 4)],
              normalisation={"mean": 0.0, "std": 1.0}, validation={"verdict": "PASS", "flags": []},
              provenance={"prompt_format": PromptFormat(chat_template=False).to_dict(), "discovery": [], "validation": []})
    kw.update(pack_kw)
    return model_dir, FeaturePack(**kw).save(tmp_path / "pack.json")


def _tiny_cfg(model_dir, pack_path, out, steps, resume, **kw):
    from mechreward.models import ModelConfig
    from mechreward.rl import LoraSettings, RLConfig
    from mechreward.tasks import TaskConfig

    base = dict(model=ModelConfig(model_dir, device="cpu"), task=TaskConfig(split="train", n=8),
                eval_task=TaskConfig(split="eval", n=4), n_canaries=1, pack=str(pack_path), per_token=True,
                lam=0.2, lam_end=0.0, beta_end=0.01, lora=LoraSettings(r=4, alpha=8), eval_every=1,
                eval_max_new_tokens=3, output_dir=str(out), resume=resume,
                grpo={"max_steps": steps, "per_device_train_batch_size": 4, "num_generations": 2,
                      "max_completion_length": 4, "save_steps": 1, "learning_rate": 1e-3})
    base.update(kw)
    return RLConfig(**base)


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from mechreward import grpo
from mechreward.run import Run
from tests.test_rl import _resume_cfg
from mechreward.rl import run_rl
orig = grpo.MechGRPOTrainer._save_checkpoint
def save_then_die(self, model, trial):
    orig(self, model, trial)
    if self.state.global_step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a crash or a pre-empted job
grpo.MechGRPOTrainer._save_checkpoint = save_then_die
run_rl(_resume_cfg({model!r}, {pack!r}, {out!r}, {steps}, False), Run({run!r}, "rl"))
"""


def _resume_cfg(model_dir, pack_path, out, steps, resume):
    """The resume test's run: on the organism, greedy held-out evaluation of 12 questions long enough to reach the
    answer (40 tokens), so held-out accuracy lies strictly between 0 and 1 and ρ is a number at every evaluation."""
    from mechreward.tasks import TaskConfig

    return _tiny_cfg(model_dir, pack_path, out, steps, resume, eval_task=TaskConfig(split="eval", n=13),
                     eval_max_new_tokens=40)


def _assert_same(got, want, key):
    """Equal, floats to 1e-5 relative; None (an undefined ρ) only equals None."""
    if want is None or got is None:
        assert got is None and want is None, (key, got, want)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key
    else:
        assert got == want, key


def test_tiny_run_sigkilled_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    """Monitor history (baseline, thresholds, flags), λ and β at every step and the final report of a run
    SIGKILLed after its step-2 checkpoint and resumed equal those of the same run uninterrupted."""
    import os
    import signal
    import subprocess
    import sys

    from mechreward.rl import run_rl
    from mechreward.run import Run

    model_dir, pack_path = _tiny_rl_setup(tmp_path, organism=True)
    full = run_rl(_resume_cfg(model_dir, pack_path, tmp_path / "full", 3, False), Run(tmp_path / "rf", "rl"))
    assert full["steps"] == 3 and full["capture"] == ["fallback"]
    evals = full["monitor"]["evaluations"]
    assert [e["step"] for e in evals] == [0, 1, 2, 3] and all("canary_hack_rate" in e for e in evals)
    assert all(e["n_heldout"] == 12 for e in evals)  # 13 eval questions, the last one is the canary
    # a comparison worth making: the monitor saw right and wrong answers, so ρ is a number at every evaluation
    assert all(0 < e["heldout_accuracy"] < 1 and e["heldout_rho"] is not None for e in evals), evals
    assert full["monitor"]["acc_tolerance"] == 0.02 and full["hacking_tolerance"] == 0.02

    out = tmp_path / "killed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _KILL_SCRIPT.format(root=root, kill_at=2, model=model_dir, pack=str(pack_path), out=str(out), steps=3,
                                 run=str(tmp_path / "rk"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "mech_state.json").is_file() and not (out / "checkpoint-3").exists()

    with pytest.raises(ConfigError, match="max_steps=4.*max_steps=3"):
        run_rl(_resume_cfg(model_dir, pack_path, out, 4, True), Run(tmp_path / "rbad", "rl"))
    res = run_rl(_resume_cfg(model_dir, pack_path, out, 3, True), Run(tmp_path / "rr", "rl"))
    assert res["resumed_from"].endswith("checkpoint-2") and res["steps"] == 3
    # the monitor was restored (its baseline is step 0's, not a fresh one at step 2) and continued
    got, want = res["monitor"]["evaluations"], evals
    assert [e["step"] for e in got] == [0, 1, 2, 3]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            _assert_same(g[k], w[k], k)
    for key in ("heldout_accuracy", "heldout_mech_score", "heldout_rho", "hacking", "n_heldout"):
        _assert_same(res[key], full[key], key)

    def per_step(run_dir, key):
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {int(r["step"]): r[key] for r in rows if key in r}

    lam_full, beta_full = per_step(tmp_path / "rf", "mech/lambda"), per_step(tmp_path / "rf", "mech/beta")
    lam_res, beta_res = per_step(tmp_path / "rr", "mech/lambda"), per_step(tmp_path / "rr", "mech/beta")
    # the schedules are linear over max_steps=3: λ 0.2 → 0 and β 0.05 → 0.01, sampled at steps 0, 1, 2
    assert [lam_full[s] for s in (1, 2, 3)] == pytest.approx([0.2, 0.2 * 2 / 3, 0.2 / 3])
    assert [beta_full[s] for s in (1, 2, 3)] == pytest.approx([0.05, 0.05 - 0.04 / 3, 0.05 - 0.08 / 3])
    assert lam_res[3] == pytest.approx(lam_full[3]) and beta_res[3] == pytest.approx(beta_full[3])


def test_no_checkpoint_to_resume_is_an_error(tmp_path):
    from mechreward.models import ModelConfig
    from mechreward.rl import RLConfig, run_rl
    from mechreward.run import Run
    from tests.tiny import save_tiny

    model_dir = str(save_tiny(tmp_path / "m", "qwen3"))
    with pytest.raises(Exception, match="no checkpoint"):
        run_rl(RLConfig(model=ModelConfig(model_dir, device="cpu"), reward="none", resume=True,
                        output_dir=str(tmp_path / "empty"), grpo={"max_steps": 1}), Run(tmp_path / "r3", "rl"))


def test_heldout_and_canaries_exclude_every_question_the_pack_saw():
    from mechreward.probe import FeaturePack
    from mechreward.rl import split_eval
    from mechreward.tasks.arithmetic import ArithmeticTask

    qs = ArithmeticTask(n=10).questions
    pack = FeaturePack(model="m", layer=0, hook="h", sae={}, features=[{"index": 0, "weight": 1.0}],
                       provenance={"discovery": [qs[0].id, qs[3].id], "validation": [qs[5].id, qs[9].id]})
    heldout, canaries, removed = split_eval(qs, pack, n_canaries=2)
    seen = {qs[i].id for i in (0, 3, 5, 9)}
    assert removed == 4 and len(heldout) == 4 and len(canaries) == 2
    assert not seen & {q.id for q in heldout + canaries}
    assert [q.id for q in canaries] == [qs[7].id, qs[8].id]
    with pytest.raises(Exception, match="no held-out questions left"):
        split_eval(qs[:5], pack, n_canaries=3)


def test_pack_of_another_model_layer_or_sae_and_failed_packs_are_refused(tmp_path):
    from mechreward.errors import DataError, MismatchError
    from mechreward.probe import FeaturePack
    from mechreward.reward import check_pack_fits, check_pack_verdict
    from mechreward.rl import run_rl
    from mechreward.run import Run
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae

    model_dir, pack_path = _tiny_rl_setup(tmp_path)
    pack = FeaturePack.load(pack_path)
    check_pack_fits(pack, model_dir, 4, 64)
    with pytest.raises(MismatchError, match="built for model .* this run loads 'other'"):
        check_pack_fits(pack, "other", 4, 64)
    with pytest.raises(MismatchError, match="hidden size 32"):
        check_pack_fits(pack, model_dir, 4, 32)
    with pytest.raises(MismatchError, match="reads layer 2, model .* has 2 layers"):
        check_pack_fits(pack, model_dir, 2, 64)
    other = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"layer": 2}), seed=9),
                              tmp_path / "sae2"))
    with pytest.raises(MismatchError, match="sha256"):
        check_pack_fits(pack, model_dir, 4, 64, other)
    assert check_pack_verdict(pack, False)["refusal_overridden"] is False

    failed = FeaturePack.load(pack_path)
    failed.validation = {"verdict": "FAIL", "flags": []}
    failed_path = failed.save(tmp_path / "failed.json")
    with pytest.raises(DataError, match="failed G1.*allow_failed_pack=true"):
        run_rl(_tiny_cfg(model_dir, failed_path, tmp_path / "f", 1, False), Run(tmp_path / "rf", "rl"))
    failed.validation = {}
    with pytest.raises(DataError, match="never validated"):
        check_pack_verdict(failed, False)
    with pytest.warns(UserWarning, match="allow_failed_pack=true"):
        rep = run_rl(_tiny_cfg(model_dir, failed_path, tmp_path / "f2", 1, False, allow_failed_pack=True,
                               eval_every=0, per_token=False), Run(tmp_path / "rf2", "rl"))
    assert rep["pack_check"] == {"verdict": "FAIL", "flags": [], "refusal_overridden": True,
                                 "allow_failed_pack": True}
    assert rep["composition"] == "normalize_then_weight" and rep["prompt_format"]["chat_template"] is False
    assert "allow_failed_pack=true" in (tmp_path / "rf2" / "report.md").read_text()


def test_trl_keys_under_grpo_need_no_plus_on_the_command_line():
    """`grpo.use_vllm=true` (a key conf/rl.yaml does not set) works as the README writes it; keys already set
    and `+`-prefixed ones keep working; keys outside the pass-through dicts are left to Hydra's checks."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mechreward.cli import CONF_DIR, add_passthrough_keys, passthrough_dicts, register
    from mechreward.g2 import G2Config
    from mechreward.rl import RLConfig

    assert passthrough_dicts(G2Config) == ["protocol.grpo"]
    assert set(passthrough_dicts(RLConfig)) == {"grpo", "prompt.chat_template_kwargs"}
    argv = ["grpo.use_vllm=true", "grpo.vllm_mode=colocate", "+grpo.num_iterations=2", "lam=0.2", "grpos.x=1"]
    assert add_passthrough_keys(argv, passthrough_dicts(RLConfig)) == [
        "++grpo.use_vllm=true", "++grpo.vllm_mode=colocate", "+grpo.num_iterations=2", "lam=0.2", "grpos.x=1"]
    register("rl", RLConfig)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("rl", overrides=add_passthrough_keys(
            ["grpo.use_vllm=true", "grpo.vllm_mode=colocate", "+grpo.num_iterations=2", "lam=0.2"],
            passthrough_dicts(RLConfig))))
    assert cfg.grpo["use_vllm"] is True and cfg.grpo["num_iterations"] == 2 and cfg.lam == 0.2
    assert (cfg.grpo["vllm_mode"], cfg.grpo["max_steps"]) == ("colocate", 40)  # conf/rl.yaml's keys stay
    register("g2", G2Config)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("g2", overrides=add_passthrough_keys(
            ["protocol.grpo.use_vllm=true", "protocol.grpo.gradient_checkpointing=true"], ["protocol.grpo"])))
    assert cfg.protocol.grpo == {"use_vllm": True, "gradient_checkpointing": True, "lr_scheduler_type": "constant"}


def test_midrun_monitor_equals_an_independent_evaluation_of_the_checkpointed_adapter(tmp_path):
    """The hacking monitor's evaluation inside training (LoRA policy, TRL's training state) equals the same
    evaluation of a fresh base model loaded with the adapter saved at that step; a run without canaries says
    so in its log and report.md."""
    from peft import PeftModel

    from mechreward.grpo import evaluate_policy
    from mechreward.models import load_model
    from mechreward.prompts import PromptFormat
    from mechreward.reward import SAEFeatureReward
    from mechreward.rl import run_rl, split_eval
    from mechreward.run import Run
    from mechreward.tasks import TaskConfig, load_task

    model_dir, pack_path = _tiny_rl_setup(tmp_path)
    out = tmp_path / "ck"
    cfg = _tiny_cfg(model_dir, pack_path, out, 2, False, n_canaries=0, per_token=False, lam_end=None, beta_end=None,
                    eval_task=TaskConfig(split="eval", n=6), eval_max_new_tokens=6)
    rep = run_rl(cfg, Run(tmp_path / "r", "rl"))
    evals = {e["step"]: e for e in rep["monitor"]["evaluations"]}
    assert sorted(evals) == [0, 1, 2]
    assert rep["n_canaries"] == 0 and "n_canaries" in rep["canary_warning"]
    assert "no canary prompts" in (tmp_path / "r" / "report.md").read_text()

    task = load_task(cfg.eval_task)
    heldout, _, _ = split_eval(task.questions, None, 0)
    mech = SAEFeatureReward.from_pack(pack_path)
    for step in (1, 2):
        base, tok = load_model(model_dir, device="cpu")
        policy = PeftModel.from_pretrained(base, str(out / f"checkpoint-{step}")).eval()
        ev = evaluate_policy(policy, tok, heldout, task, mech, greedy=True, max_new_tokens=6,
                             prompt_format=PromptFormat(chat_template=False).resolve(tok))
        assert evals[step]["heldout_accuracy"] == ev["accuracy"]
        assert evals[step]["heldout_score_mean"] == pytest.approx(ev["score_mean"], rel=1e-5, abs=1e-6), step
