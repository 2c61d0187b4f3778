"""SAETrainer: learning a ground-truth dictionary, schedule, dead latents in tokens, bitwise resume."""

import io

import pytest
import torch

from mechreward.sae import SAEConfig, SAETrainer, SparseAutoencoder, TrainerConfig
from mechreward.sae.model import geometric_median



def sparse_data(n_true=48, d_in=32, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)

    def batch(B):
        idx = torch.rand(B, n_true, generator=g).argsort(1)[:, :k]
        z = torch.zeros(B, n_true).scatter_(1, idx, torch.rand(B, k, generator=g) * 2 + 0.5)
        return z @ D + 0.3

    return D, batch


def test_training_recovers_a_ground_truth_dictionary():
    D, batch = sparse_data()
    sae = SparseAutoencoder.from_config(SAEConfig(32, 128, 3))
    tr = SAETrainer(sae, TrainerConfig(lr=3e-3, warmup_steps=20), total_steps=300)
    for _ in range(300):
        out = tr.step(batch(512))
    assert out.l0.item() == 3.0
    from mechreward.sae.evaluate import activation_metrics
    m = activation_metrics(sae, batch(4096))
    assert m["variance_explained"] > 0.94
    # every true feature has a decoder row within cos 0.99
    assert (sae.W_dec @ D.T).max(0).values.min() > 0.99


def test_initialize_scales_to_unit_mean_squared_norm_and_centres_at_geometric_median():
    x = torch.randn(256, 16) * 7 + 3
    sae = SparseAutoencoder.from_config(SAEConfig(16, 64, 4))
    tr = SAETrainer(sae, TrainerConfig(), total_steps=10)
    tr.initialize(x)
    xs = x * sae.act_scale
    assert xs.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    # geometric median: minimises the sum of distances (beats the mean and small perturbations)
    cost = lambda m: (xs - m).norm(dim=1).sum()
    b = sae.b_dec.detach()
    assert cost(b) < cost(xs.mean(0))
    for d in torch.eye(16)[:4] * 1e-2:
        assert cost(b) <= cost(b + d) and cost(b) <= cost(b - d)
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_lr_schedule_warms_up_then_decays_linearly_to_zero():
    sae = SparseAutoencoder.from_config(SAEConfig(8, 2**14, 4))
    tr = SAETrainer(sae, TrainerConfig(warmup_steps=1000, decay_fraction=0.2), total_steps=100)
    assert tr.base_lr == pytest.approx(2e-4)
    lrs = [tr.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4 / 10)  # warm-up capped at 10% of 100 steps
    assert lrs[9] == lrs[50] == lrs[79] == pytest.approx(2e-4)
    assert lrs[80] == pytest.approx(2e-4) and lrs[90] == pytest.approx(1e-4) and lrs[99] == pytest.approx(1e-5)
    assert SAETrainer(SparseAutoencoder.from_config(SAEConfig(8, 2**16, 4)), total_steps=5).base_lr == pytest.approx(1e-4)


def test_dead_latents_are_counted_in_tokens_and_switch_on_auxk():
    _, batch = sparse_data(d_in=16, n_true=32)
    sae = SparseAutoencoder.from_config(SAEConfig(16, 64, 3))
    tr = SAETrainer(sae, TrainerConfig(dead_tokens=300, warmup_steps=0, lr=1e-4), total_steps=10)
    tr.initialize(batch(64))
    with torch.no_grad():
        sae.b_enc[:10] = -1e4  # these latents can never be selected with a positive value
    out = tr.step(batch(150))
    assert out.auxk_loss.item() == 0.0  # 150 tokens seen: nothing can be dead yet
    assert (tr.tokens_since_fired[:10] == 150).all()
    out = tr.step(batch(150))  # 300 tokens, 2 steps: dead after 300 tokens, not after N steps
    assert (tr.tokens_since_fired[:10] == 300).all()
    assert out.dead_fraction.item() >= 10 / 64
    fired = tr.tokens_since_fired == 0
    assert fired.any()
    out = tr.step(batch(150))
    assert out.auxk_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.fvu.item() + out.auxk_loss.item() / 32, rel=1e-6)


def test_state_dict_round_trip_gives_bitwise_identical_training():
    _, batch = sparse_data(d_in=16, n_true=32, seed=1)
    data = [batch(128) for _ in range(12)]
    cfg = TrainerConfig(dead_tokens=256, warmup_steps=3, seed=5)

    def fresh(seed):
        sae = SparseAutoencoder.from_config(SAEConfig(16, 64, 3), seed=seed)
        return SAETrainer(sae, cfg, total_steps=12)

    a = fresh(0)
    for x in data[:6]:
        a.step(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    for x in data[6:]:
        a.step(x)

    b = fresh(123)  # different initial weights: everything must come from the state
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.step_count == 6 and b.tokens_seen == 6 * 128
    outs = [b.step(x) for x in data[6:]]
    assert outs[-1].auxk_loss.item() > 0 or outs[-1].dead_fraction.item() == 0
    for (name, pa), pb in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key])


def test_geometric_median_of_collinear_points_is_the_median():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    torch.testing.assert_close(geometric_median(x, iters=500).float(), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
