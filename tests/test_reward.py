"""Rewards and their composition: the SAE reward is the pack's G1 function, λ scales the mech term,
per-token z-scores ignore padding and may span processes, the direction is a diff of means."""

import numpy as np
import pytest
import torch

from mechreward.errors import ConfigError, MismatchError
from mechreward.probe import FeaturePack
from mechreward.reward import (CapturedBatch, DirectionReward, OutcomeReward, SAEFeatureReward, compose_advantages,
                               dense_advantages, normalise_rewards, token_group_stats)
from mechreward.rollouts import sae_reference
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import load_sae, save_sae
from mechreward.tasks.arithmetic import ArithmeticTask



@pytest.fixture(scope="module")
def sae_pack(tmp_path_factory):
    sae = SparseAutoencoder.from_config(SAEConfig(16, 64, 4, metadata={"layer": 2}), seed=1)
    sae = load_sae(save_sae(sae, tmp_path_factory.mktemp("s") / "sae"))
    feats = [{"index": i, "weight": w} for i, w in [(1, 1.0), (5, -1.0), (9, 2.0), (33, 1.0)]]
    pack = FeaturePack(model="m", layer=2, hook="model.layers.2", sae=sae_reference(sae), features=feats,
                       pooling="max", normalisation={"mean": 0.5, "std": 4.0})
    return sae, pack


def test_outcome_reward_is_the_task_verifier():
    task = ArithmeticTask(n=2)
    r = OutcomeReward(task)
    q = task.questions[0]
    out = r(prompts=[q.prompt] * 3, completions=[f" x #### {q.answer}", " #### 99999", "no answer"],
            answer=[q.answer] * 3)
    assert out == [1.0, 0.0, 0.0]
    assert r(completions=[[{"role": "assistant", "content": f"#### {q.answer}"}]], answer=[q.answer]) == [1.0]


def test_sae_reward_equals_the_pack_scorer_and_needs_the_trainer(sae_pack):
    sae, pack = sae_pack
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16) * 3
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:] = mask[1, 4:6] = mask[2, 1:] = True
    reward = SAEFeatureReward(pack, sae)
    scorer = pack.scorer(sae)
    want = scorer.normalise(scorer(hidden, mask))
    assert torch.equal(reward.score(hidden, mask), want)
    # per-token: Σ w_i code_i(h_t) from the exact encode (not a ReLU shortcut)
    dense = sae.encode_dense(hidden[mask])
    torch.testing.assert_close(reward.token_scores(reward.token_values(hidden[mask])),
                               dense[:, pack.indices] @ torch.tensor(pack.weights))
    with pytest.raises(ConfigError, match="MechGRPOTrainer"):
        reward(prompts=["a"], completions=["b"], completion_ids=[[1]])
    ids = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13]]
    reward.set_batch(CapturedBatch(reward.token_values(hidden[mask]), mask.sum(1).tolist(), ids))
    assert reward(completion_ids=ids) == pytest.approx(want.tolist())
    with pytest.raises(MismatchError):
        reward(completion_ids=[[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 14]])


def test_group_normalisation_then_weights_lambda_scales_the_mech_term_exactly():
    # two groups of 3; outcome ties in group 0, not in group 1
    outcome = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    mech = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1, -0.2])
    r = torch.stack([outcome, mech], 1)
    a1 = compose_advantages(r, [1.0, 0.1], 3)
    a2 = compose_advantages(r, [1.0, 0.2], 3)
    a0 = compose_advantages(r, [1.0, 0.0], 3)
    torch.testing.assert_close(a2 - a0, 2 * (a1 - a0))
    torch.testing.assert_close(a1[:3], 0.1 * (mech[:3] - mech[:3].mean()) / (mech[:3].std() + 1e-4))
    z = normalise_rewards(r, 3)
    torch.testing.assert_close(z[3:, 0], (outcome[3:] - outcome[3:].mean()) / (outcome[3:].std() + 1e-4))
    assert (z[:3, 0] == 0).all()
    # TRL's normalize_then_sum divides the sum by its batch std: with every group tied λ cancels.
    tied = torch.stack([torch.ones(6), mech], 1)

    def trl_normalize_then_sum(rw, w):
        s = (normalise_rewards(rw, 3) * torch.tensor(w)).sum(1)
        return (s - s.mean()) / (s.std() + 1e-4)

    torch.testing.assert_close(trl_normalize_then_sum(tied, [1, 0.1]), trl_normalize_then_sum(tied, [1, 0.2]),
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(compose_advantages(tied, [1, 0.2], 3), 2 * compose_advantages(tied, [1, 0.1], 3))


def test_dense_advantages_exclude_padding_and_match_across_a_process_split():
    torch.manual_seed(0)
    B, T, G = 4, 6, 2
    scores = torch.randn(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = mask[1, 2:] = mask[3, 5:] = False
    scores_padded = scores.clone()
    scores_padded[~mask] = 1e6  # padding values must not matter
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    out = dense_advantages(adv, scores_padded, mask, G, lam=0.3)
    assert out.shape == (B, T) and (out[~mask] == 0).all()
    for g in range(2):
        rows = slice(g * G, (g + 1) * G)
        s = scores[rows][mask[rows]].double()
        z = (s - s.mean()) / (s.std() + 1e-4)
        expect = (adv[rows][:, None].expand(G, T)[mask[rows]].double() + 0.3 * z).float()
        torch.testing.assert_close(out[rows][mask[rows]], expect)
    # groups spanning two "processes" of 3 rows each (G=3): gathered stats + offsets give the same result
    G3 = 3
    s6, m6 = torch.randn(6, T), torch.rand(6, T) > 0.3
    m6[:, 0] = True
    a6 = torch.randn(6)
    whole = dense_advantages(a6, s6, m6, G3, 0.2)
    stats = token_group_stats(s6, m6)
    parts = [dense_advantages(a6[i:i + 2], s6[i:i + 2], m6[i:i + 2], G3, 0.2, group_stats=stats, offset=i)
             for i in (0, 2, 4)]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_direction_reward_is_the_diff_of_means_of_mean_pooled_residuals(tmp_path):
    from mechreward.rollouts import write_shard, MANIFEST
    from mechreward import io

    rng = np.random.default_rng(0)
    R, d = 12, 8
    resid = torch.tensor(rng.normal(size=(R, d)), dtype=torch.float32)
    labels = [1, 0] * 6
    qids = [f"q{i // 2}" for i in range(R)]
    out = tmp_path / "roll"
    out.mkdir()
    io.write_json(out / MANIFEST, {"schema": "mechreward.rollouts", "version": 1, "model": "m", "d_model": d,
                                   "n_layers": 4, "layers": [2], "sae": None, "sae_layer": None,
                                   "poolings": ["mean"], "resid_poolings": ["mean", "last"]})
    records = [{"question_id": q, "sample_index": 0, "correct": bool(c), "length": 3, "logprobs": [-1.0] * 3}
               for q, c in zip(qids, labels)]
    write_shard(out / "shard-00000.safetensors", {"resid.mean.L2": resid, "resid.last.L2": resid.clone(),
                                                  "tokens.ptr": torch.arange(0, 3 * R + 1, 3)}, records)
    lab = torch.tensor(labels).bool()
    dr = DirectionReward.from_rollouts(out, 2, questions=[f"q{i}" for i in range(4)])
    keep = torch.tensor([q in {f"q{i}" for i in range(4)} for q in qids])
    want = resid[keep & lab].double().mean(0) - resid[keep & ~lab].double().mean(0)
    torch.testing.assert_close(dr.direction, want.float())
    h = torch.randn(2, 5, d)
    m = torch.ones(2, 5, dtype=torch.bool)
    m[1, :2] = False
    torch.testing.assert_close(dr.score(h, m), torch.stack([h[0].mean(0) @ dr.direction, h[1, 2:].mean(0) @ dr.direction]))
