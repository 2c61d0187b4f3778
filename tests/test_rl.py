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


def test_tiny_run_trains_per_token_monitors_checkpoints_and_resumes(tmp_path):
    from mechreward.models import ModelConfig
    from mechreward.probe import FeaturePack
    from mechreward.rl import LoraSettings, RLConfig, run_rl
    from mechreward.rollouts import sae_reference
    from mechreward.run import Run
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae
    from mechreward.tasks import TaskConfig
    from tests.tiny import save_tiny

    model_dir = str(save_tiny(tmp_path / "m", "qwen3"))
    sae = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"layer": 2}), seed=4),
                            tmp_path / "sae"))
    pack = FeaturePack(model=model_dir, layer=2, hook="model.layers.2", sae=sae_reference(sae),
                       features=[{"index": i, "weight": (-1.0) ** i} for i in range(0, 80, 4)],
                       normalisation={"mean": 0.0, "std": 1.0})
    pack_path = pack.save(tmp_path / "pack.json")
    out = tmp_path / "ckpt"

    def cfg(steps, resume):
        return RLConfig(model=ModelConfig(model_dir, device="cpu"), task=TaskConfig(split="train", n=8),
                        eval_task=TaskConfig(split="eval", n=4), n_canaries=1, pack=str(pack_path), per_token=True,
                        lam=0.2, lam_end=0.0, lora=LoraSettings(r=4, alpha=8), eval_every=1, eval_max_new_tokens=3,
                        output_dir=str(out), resume=resume,
                        grpo={"max_steps": steps, "per_device_train_batch_size": 4, "num_generations": 2,
                              "max_completion_length": 4, "save_steps": 1, "learning_rate": 1e-3})

    rep = run_rl(cfg(2, False), Run(tmp_path / "r1", "rl"))
    assert rep["steps"] == 2 and (out / "checkpoint-2").is_dir() and rep["capture"] == ["fallback"]
    evals = rep["monitor"]["evaluations"]
    assert [e["step"] for e in evals] == [0, 1, 2] and all("canary_hack_rate" in e for e in evals)
    assert all(e["n_heldout"] == 3 for e in evals)  # 4 eval questions, the last one is the canary
    metrics = [json.loads(l) for l in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert any("mech/lambda" in m for m in metrics)
    rep2 = run_rl(cfg(3, True), Run(tmp_path / "r2", "rl"))
    assert rep2["resumed_from"].endswith("checkpoint-2") and rep2["steps"] == 3
    with pytest.raises(Exception, match="no checkpoint"):
        run_rl(RLConfig(model=ModelConfig(model_dir, device="cpu"), reward="none", resume=True,
                        output_dir=str(tmp_path / "empty"), grpo={"max_steps": 1}), Run(tmp_path / "r3", "rl"))
