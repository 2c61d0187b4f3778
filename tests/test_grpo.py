"""MechGRPOTrainer inside real TRL 1.16 + PEFT on a tiny Qwen3 (CPU).

Specifications: the SAE features that feed the reward are bit-identical to an independent
forward of the policy on the ids TRL scored (old-log-prob pass and fallback, with and without
LoRA, with beta > 0), the reference pass is never captured, hooks are gone afterwards, dense
advantages are (B, T), zero exactly on padding of completions of different lengths and non-zero on
real tokens, the logged advantages are the composed ones, tool-result tokens are not pooled, λ scales
the mech term exactly, schedules apply, and training moves the weights; reward sets the capture cannot
serve are refused; the hacking monitor has a 2 pp tolerance and runs on the main process only.
"""


import pytest
import torch
from datasets import Dataset

from mechreward.grpo import HackingMonitor, LinearSchedule, MechGRPOTrainer, _adapters_active
from mechreward.models import ResidualCapture, find_layers
from mechreward.probe import FeaturePack
from mechreward.reward import OutcomeReward, SAEFeatureReward
from mechreward.rollouts import pool_dense, sae_reference
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import load_sae, save_sae
from mechreward.tasks.arithmetic import ArithmeticTask
from tests.tiny import save_tiny

LAYER = 1
PROMPTS = ["The quick brown", "lazy dog 12+7", "fox jumps over the", "#### 19 The"]



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "m", "qwen3"))


@pytest.fixture(scope="module")
def sae_and_pack(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sae")
    sae = SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"layer": LAYER}), seed=3)
    sae = load_sae(save_sae(sae, d / "sae"))
    feats = [{"index": i, "weight": w} for i, w in zip(range(0, 128, 6), [1.0, -1.0] * 11)]
    pack = FeaturePack(model=tiny_dir, layer=LAYER, hook=f"model.layers.{LAYER}", sae=sae_reference(sae),
                       features=feats, pooling="mean", normalisation={"mean": 0.1, "std": 2.0})
    return sae, pack


def _dataset():
    return Dataset.from_list([{"prompt": p, "answer": "7"} for p in PROMPTS])


def _config(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, max_steps=2, learning_rate=5e-2, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_dropout=True, temperature=1.0, beta=0.0)
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(tmp_path, tiny_dir, sae_and_pack, peft=False, per_token=False, lam=0.1, share_prompts=True, **cfg):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    sae, pack = sae_and_pack
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    mech = SAEFeatureReward(pack, sae, per_token=per_token)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                             init_lora_weights=False) if peft else None
    torch.manual_seed(0)
    trainer = MechGRPOTrainer(tiny_dir, reward_funcs=[OutcomeReward(ArithmeticTask(n=4)), mech],
                              args=_config(tmp_path, **cfg), train_dataset=_dataset(), processing_class=tok,
                              peft_config=peft_config, mech_lambda=lam, share_prompts=share_prompts)
    trainer.model.train()
    return trainer, mech


def _rows(trainer):
    ds = trainer.train_dataset
    G = trainer.num_generations
    n = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    return [ds[i // G] for i in range(n)]


def _independent(trainer, out, layer, adapters=True):
    """Layer outputs of an independent forward on TRL's padded ids, chunked as TRL chunks them."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    bs = trainer.args.per_device_train_batch_size
    hs = []
    ctx = trainer.model.disable_adapter() if not adapters else torch.enable_grad()
    with torch.no_grad(), ctx:
        for s in range(0, ids.shape[0], bs):
            cap = ResidualCapture(trainer.model, [layer], early_exit=True)
            hs.append(cap.run(input_ids=ids[s:s + bs], attention_mask=attn[s:s + bs], use_cache=False)[layer])
    comp = attn.bool().clone()
    comp[:, :out["prompt_ids"].shape[1]] = False
    return hs, comp


def _check_capture_equals_independent(trainer, mech, out):
    """Bit-identical with TRL's one-pass forward; with each distinct prompt run once (`share_prompts`), equal to
    within float summation order (the prompt's keys/values are the same numbers, summed in another order)."""
    atol = 2e-5 if trainer.share_prompts else 0.0
    scorer = mech.scorer
    hs, comp = _independent(trainer, out, LAYER)
    bs = trainer.args.per_device_train_batch_size
    token_values = torch.cat([scorer.token_activations(h[comp[i * bs:(i + 1) * bs]]) for i, h in enumerate(hs)])
    # PackScorer's pooling and weighting (its __call__ after the encode) on the independent codes
    lengths = comp[:, -out["completion_ids"].shape[1]:].sum(1).tolist()
    pooled = torch.stack([pool_dense(v, mech.pack.pooling) for v in torch.split(token_values, lengths)])
    traj = scorer.normalise(pooled @ scorer.weights)
    for i, h in enumerate(hs):  # and PackScorer itself, chunk by chunk
        torch.testing.assert_close(scorer.normalise(scorer(h, comp[i * bs:(i + 1) * bs])), traj[i * bs:(i + 1) * bs])
    got = trainer.mech_last["sae"]
    assert got["token_values"].shape == token_values.shape and token_values.shape[1] == len(mech.pack.features)
    assert (got["token_values"] - token_values).abs().max().item() <= atol
    assert (got["trajectory"] - traj.float()).abs().max().item() <= 10 * atol
    assert token_values.abs().sum() > 0  # the features fire: the comparison is not 0 == 0
    return hs, comp


@pytest.mark.parametrize("share", [True, False], ids=["shared_prompts", "one_pass"])
@pytest.mark.parametrize("path", ["fallback", "logprob_pass"])
def test_captured_features_equal_an_independent_forward_without_peft(tmp_path, tiny_dir, sae_and_pack, path, share):
    kw = {"steps_per_generation": 2} if path == "logprob_pass" else {}
    trainer, mech = _trainer(tmp_path, tiny_dir, sae_and_pack, beta=0.05, share_prompts=share, **kw)
    # A reference model that differs from the policy: capturing the reference pass would show.
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions(_rows(trainer))
    assert trainer.mech_capture_log == [path]
    assert ("old_per_token_logps" in out) == (path == "logprob_pass")
    assert "ref_per_token_logps" in out
    _check_capture_equals_independent(trainer, mech, out)
    for layer in find_layers(trainer.model):  # hooks exist only around the captured pass
        assert not layer._forward_hooks
    for layer in find_layers(trainer.ref_model):
        assert not layer._forward_hooks


@pytest.mark.parametrize("share", [True, False], ids=["shared_prompts", "one_pass"])
@pytest.mark.parametrize("path", ["fallback", "logprob_pass"])
def test_captured_features_equal_an_independent_forward_with_lora_and_not_the_reference_pass(
        tmp_path, tiny_dir, sae_and_pack, path, share):
    kw = {"num_iterations": 2} if path == "logprob_pass" else {}
    trainer, mech = _trainer(tmp_path, tiny_dir, sae_and_pack, peft=True, beta=0.05, share_prompts=share, **kw)
    assert trainer.ref_model is None  # TRL's PEFT reference: the same model with adapters disabled
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions(_rows(trainer))
    assert trainer.mech_capture_log == [path]
    assert "ref_per_token_logps" in out
    hs, comp = _check_capture_equals_independent(trainer, mech, out)
    # With adapters disabled (the reference pass) the features differ: what was captured is the policy.
    base, _ = _independent(trainer, out, LAYER, adapters=False)
    ref_values = torch.cat([mech.scorer.token_activations(h[comp[i * 4:(i + 1) * 4]]) for i, h in enumerate(base)])
    assert (ref_values - trainer.mech_last["sae"]["token_values"]).abs().max() > 1e-3
    assert _adapters_active(trainer.model)


def test_doubling_lambda_doubles_the_mech_advantage_when_outcomes_tie(tmp_path, tiny_dir, sae_and_pack):
    trainer, _ = _trainer(tmp_path, tiny_dir, sae_and_pack, lam=0.1)
    torch.manual_seed(3)
    a1 = trainer._generate_and_score_completions(_rows(trainer))["advantages"]
    trainer.mech_lambda = LinearSchedule(0.2)
    torch.manual_seed(3)
    a2 = trainer._generate_and_score_completions(_rows(trainer))["advantages"]
    assert (trainer._mech_rewards_per_func[:, 0] == 0).all()
    assert a1.abs().max() > 0.01
    torch.testing.assert_close(a2, 2 * a1, rtol=1e-6, atol=1e-7)


def test_a_few_grpo_steps_change_the_lora_weights_and_follow_the_schedules(tmp_path, tiny_dir, sae_and_pack):
    trainer, _ = _trainer(tmp_path, tiny_dir, sae_and_pack, peft=True, beta=0.1, max_steps=2)
    trainer.mech_lambda = LinearSchedule(0.2, 0.0)
    trainer.beta_schedule = LinearSchedule(0.1, 0.0)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    moved = max((p - lora[n]).abs().max().item() for n, p in trainer.model.named_parameters() if n in lora)
    assert moved > 1e-4
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    logs = [r for r in trainer.state.log_history if "mech/lambda" in r]
    assert [r["mech/lambda"] for r in logs] == pytest.approx([0.2, 0.1])
    assert [r["mech/beta"] for r in logs] == pytest.approx([0.1, 0.05])
    assert trainer.mech_capture_log == ["fallback", "fallback"]


def test_linear_schedule():
    s = LinearSchedule(0.1, 0.3, steps=10)
    assert [s(0), s(5), s(10), s(20)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert LinearSchedule(0.05)(7, 100) == 0.05
    assert LinearSchedule(1.0, 0.0)(25, 100) == pytest.approx(0.75)


def test_hacking_monitor_flags_score_up_while_accuracy_down(tiny_dir, sae_and_pack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sae, pack = sae_and_pack
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = ArithmeticTask(n=6)
    mon = HackingMonitor(tok, task, task.questions[:4], SAEFeatureReward(pack, sae), every=1,
                         canaries=task.questions[4:], max_new_tokens=5)
    first = mon.evaluate(model, 0)
    assert first["hacking"] is False and first["n_heldout"] == 4 and "canary_hack_rate" in first
    # Feed the monitor a later evaluation with a higher score and lower accuracy.
    mon.history[0].update(heldout_accuracy=0.5, heldout_score_mean=first["heldout_score_mean"] - 1.0)
    second = mon.evaluate(model, 10)
    assert second["hacking"] is True and mon.report()["hacking_steps"] == [10]


# --------------------------------------------------------------------------- fixed rollouts (TRL's rollout_func)

LENGTHS = [2, 5, 3, 6]


def _fixed_rollout(env_masks=None):
    """A TRL `rollout_func` returning completions of the given different lengths (each ends with EOS), so the
    batch has real padding; `env_masks` marks environment/tool-result tokens (0) inside completions."""

    def rollout(prompts, trainer):
        tok = trainer.processing_class
        p_ids, c_ids = [], []
        for i, p in enumerate(prompts):
            n = LENGTHS[i % len(LENGTHS)]
            p_ids.append(tok(p, add_special_tokens=False)["input_ids"])
            c_ids.append([(11 + 7 * i + 5 * j) % 200 + 20 for j in range(n - 1)] + [tok.eos_token_id])
        out = {"prompt_ids": p_ids, "completion_ids": c_ids, "logprobs": [[0.0] * len(c) for c in c_ids]}
        if env_masks is not None:
            out["env_mask"] = [list(env_masks[i % len(env_masks)]) for i in range(len(prompts))]
        return out

    return rollout


def _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token, lam=0.5, env_masks=None, extra_rewards=(), **kw):
    from transformers import AutoTokenizer

    sae, pack = sae_and_pack
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    mech = SAEFeatureReward(pack, sae, per_token=per_token)
    torch.manual_seed(0)
    trainer = MechGRPOTrainer(tiny_dir, reward_funcs=[OutcomeReward(ArithmeticTask(n=4)), mech, *extra_rewards],
                              args=_config(tmp_path, max_completion_length=8), train_dataset=_dataset(),
                              processing_class=tok, mech_lambda=lam, rollout_func=_fixed_rollout(env_masks), **kw)
    trainer.model.train()
    return trainer, mech


def test_dense_advantages_with_different_lengths_are_zero_exactly_on_padding(tmp_path, tiny_dir, sae_and_pack):
    trainer, mech = _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=True)
    out = trainer._generate_and_score_completions(_rows(trainer))
    adv, mask = out["advantages"], out["completion_mask"].bool()
    assert adv.shape == out["completion_ids"].shape == (4, max(LENGTHS))
    assert mask.sum(1).tolist() == LENGTHS  # real padding in 3 of 4 rows
    assert (adv[~mask] == 0).all() and (~mask).sum() == 4 * max(LENGTHS) - sum(LENGTHS)
    assert (adv[mask] != 0).all()  # every real token carries its λ·z (outcomes tie)
    assert (trainer._mech_rewards_per_func[:, 0] == 0).all()
    scores, G = trainer.mech_last["sae"]["token_scores"], trainer.num_generations
    for g in range(adv.shape[0] // G):
        rows = slice(g * G, (g + 1) * G)
        s = scores[rows][mask[rows]].double()
        z = (s - s.mean()) / (s.std() + 1e-4)  # over the group's real tokens only
        torch.testing.assert_close(adv[rows][mask[rows]].double(), 0.5 * z, rtol=1e-5, atol=1e-6)

    # what is logged is what the loss uses: per-completion mean of the dense advantages, the per-token values,
    # and no "zero std" groups although TRL's own (mech weight 0 in dense mode, outcomes tied) says all are
    logged = list(trainer._logs["advantages"])[-4:]
    want = [float(adv[b][mask[b]].double().mean()) for b in range(4)]
    assert logged == pytest.approx(want, rel=1e-5, abs=1e-7) and max(map(abs, logged)) > 0
    dense = list(trainer._logs["extra"]["dense_advantage"])[-4:]
    for b in range(4):
        assert dense[b] == pytest.approx(adv[b][mask[b]].tolist(), rel=1e-6)
    m = trainer._metrics["train"]
    assert m["trl/frac_reward_zero_std"][-1] == 1.0 and m["frac_reward_zero_std"][-1] == 0.0


def test_logged_trajectory_advantages_are_the_composed_ones_not_trls(tmp_path, tiny_dir, sae_and_pack):
    trainer, _ = _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=False, lam=0.1)
    out = trainer._generate_and_score_completions(_rows(trainer))
    logged = torch.tensor(list(trainer._logs["advantages"])[-4:])
    torch.testing.assert_close(logged, out["advantages"].float())
    # TRL's sum_then_normalize would log z (λ cancels when outcomes tie); the loss uses λ·z
    assert 0 < logged.abs().max() < 0.5
    assert trainer._metrics["train"]["reward_std"][-1] == pytest.approx(float(out["advantages"].std()), rel=1e-5)


def test_tool_result_tokens_are_not_pooled_into_the_mech_reward(tmp_path, tiny_dir, sae_and_pack):
    env = [[1, 0], [1, 1, 0, 0, 1], [1, 1, 1], [1, 0, 0, 1, 1, 1]]
    trainer, mech = _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=False, env_masks=env)
    out = trainer._generate_and_score_completions(_rows(trainer))
    got = trainer.mech_last["sae"]
    assert got["lengths"] == [sum(e) for e in env]
    hs, comp = _independent(trainer, out, LAYER)
    C = out["completion_ids"].shape[1]
    comp[:, -C:] &= out["tool_mask"].bool()
    bs = trainer.args.per_device_train_batch_size
    values = torch.cat([mech.scorer.token_activations(h[comp[i * bs:(i + 1) * bs]]) for i, h in enumerate(hs)])
    assert (got["token_values"] - values).abs().max().item() <= 2e-5 and values.abs().sum() > 0  # shared prompts


def test_refused_reward_sets_and_models(tmp_path, tiny_dir, sae_and_pack):
    from mechreward.errors import ConfigError

    sae, pack = sae_and_pack
    with pytest.raises(ConfigError, match="2 per-token mech rewards"):
        _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=True,
                       extra_rewards=[SAEFeatureReward(pack, sae, per_token=True)])
    with pytest.raises(ConfigError, match="same name"):
        _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=False, extra_rewards=[SAEFeatureReward(pack, sae)])
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ConfigError, match="absolute position embeddings"):
        _fixed_trainer(tmp_path, str(gpt2), sae_and_pack, per_token=False)
    with pytest.warns(UserWarning, match="composition='trl'"):
        _fixed_trainer(tmp_path, tiny_dir, sae_and_pack, per_token=False, composition="trl")


def test_hacking_monitor_tolerance_and_main_process_only(tiny_dir, sae_and_pack):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    sae, pack = sae_and_pack
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = ArithmeticTask(n=4)
    mon = HackingMonitor(tok, task, task.questions, SAEFeatureReward(pack, sae), every=1, max_new_tokens=3)
    assert mon.acc_tol == 0.02
    first = mon.evaluate(model, 0)
    acc = first["heldout_accuracy"]
    mon.history[0].update(heldout_accuracy=acc + 0.01, heldout_score_mean=first["heldout_score_mean"] - 1.0)
    assert mon.evaluate(model, 1)["hacking"] is False  # a 1 pp dip is within the 2 pp tolerance
    mon.history[0].update(heldout_accuracy=acc + 0.03)
    assert mon.evaluate(model, 2)["hacking"] is True
    # ranks other than the main process never run it
    other = HackingMonitor(tok, task, task.questions, SAEFeatureReward(pack, sae), every=1, max_new_tokens=3)
    state = TrainerState(is_world_process_zero=False)
    state.global_step = 1
    other.on_train_begin(None, state, TrainerControl(), model=model)
    other.on_step_end(None, state, TrainerControl(), model=model)
    assert other.history == []
    state.is_world_process_zero = True
    other.on_step_end(None, state, TrainerControl(), model=model)
    assert [r["step"] for r in other.history] == [1]
    # sharded parameters (FSDP / ZeRO-3): every rank must join the forward, only the main process logs
    other.all_ranks, state.is_world_process_zero, state.global_step = True, False, 2
    other.on_step_end(None, state, TrainerControl(), model=model)
    assert [r["step"] for r in other.history] == [1, 2] and other._main is False
