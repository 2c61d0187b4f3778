"""SAE metrics: activation metrics against a direct computation; splice metrics on a tiny Qwen3."""

import os

import pytest
import torch

from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.evaluate import activation_metrics, density_histogram_figure, splice_metrics
from tiny import identity_sae

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def test_activation_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder.from_config(SAEConfig(16, 64, 4), seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.5)
        sae.b_enc[:5] = -1e3  # never fire
        sae.b_dec.copy_(torch.randn(16, generator=g))
    acts = torch.randn(1000, 16, generator=g) * 2 + 1
    m = activation_metrics(sae, acts, batch_size=128)  # several batches
    with torch.no_grad():
        z = sae.encode_dense(acts)
        x_hat = z @ sae.W_dec + sae.b_dec
    fvu = ((acts - x_hat) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    assert m["variance_explained"] == pytest.approx(1 - fvu.item(), rel=1e-5)
    rates = (z != 0).float().mean(0)
    torch.testing.assert_close(m["fire_rates"], rates)
    assert m["l0"] == pytest.approx(4.0)
    assert m["dead_fraction"] == pytest.approx((rates == 0).float().mean().item()) and m["dead_fraction"] >= 5 / 64
    assert m["alive_fraction"] == pytest.approx(1 - m["dead_fraction"])
    healthy = ((rates >= 0.005) & (rates <= 0.30)).float().mean().item()
    assert m["healthy_fraction"] == pytest.approx(healthy) and 0 < healthy < 1
    fig = density_histogram_figure(m["fire_rates"])
    assert "never fired" in fig.axes[0].get_title()


@pytest.fixture(scope="module")
def tiny_qwen3():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=128, vocab_size=300)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()




def test_splice_metrics_identity_sae_recovers_all_and_zero_sae_none(tiny_qwen3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding on one row
    ident = splice_metrics(tiny_qwen3, 1, identity_sae(64), ids, mask)
    assert abs(ident["ce_zero"] - ident["ce_clean"]) > 0.01  # a random model: either sign
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert abs(ident["kl_sae"]) < 1e-6
    assert ident["n_tokens"] == 3 * 11 - 4

    zero = SparseAutoencoder.from_config(SAEConfig(64, 128, 8))
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    z = splice_metrics(tiny_qwen3, 1, zero, ids, mask)
    assert z["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert z["ce_sae"] == pytest.approx(z["ce_zero"], abs=1e-6)
    assert z["ce_clean"] == pytest.approx(ident["ce_clean"])
    assert z["kl_sae"] > 1e-3

    # a partial SAE sits in between, and padding is excluded (changing padded ids changes nothing)
    ids2 = ids.clone()
    ids2[2, :4] = 7
    half = identity_sae(64)
    half.cfg.k = 16
    mid = splice_metrics(tiny_qwen3, 1, half, ids, mask)
    mid2 = splice_metrics(tiny_qwen3, 1, half, ids2, mask)
    assert 0.0 < mid["loss_recovered"] < 1.0 or mid["kl_sae"] > 0
    assert mid["ce_clean"] == pytest.approx(mid2["ce_clean"], abs=1e-5)
