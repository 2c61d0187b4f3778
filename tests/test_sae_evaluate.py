"""SAE metrics: activation metrics against a direct computation; splice metrics on a tiny Qwen3."""

import math
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


# --------------------------------------------------------------------------- the organism's own distribution

@pytest.fixture(scope="module")
def organism():
    from mechreward.data import DataConfig, heldout_set
    from mechreward.models import load_model

    model, tok = load_model("organism", device="cpu")
    return model, tok, heldout_set(tok, DataConfig(heldout_sequences=24))


def test_organism_heldout_is_one_problem_per_row_from_position_0(organism):
    import itertools

    from mechreward.tasks.arithmetic import iter_problems, prompt_text, solution_text

    _, tok, held = organism
    for i, p in enumerate(itertools.islice(iter_problems("eval", 0), 24)):
        text = prompt_text(p) + solution_text(p)  # the character tokenizer: one token per character
        n_prompt, n = len(prompt_text(p)), len(text) + 1
        row = held.input_ids[i]
        assert tok.decode(row[:n - 1]) == text and row[n - 1] == tok.eos_token_id
        assert held.attention_mask[i].tolist() == [1] * n + [0] * (row.numel() - n)
        assert held.completion_mask[i].nonzero().flatten().tolist() == list(range(n_prompt, n))


def test_loss_recovered_on_the_organism_completion_is_1_for_identity_and_0_for_zero(organism):
    from mechreward.activations import FilterConfig
    from mechreward.sae_train import heldout_activations

    model, tok, held = organism
    _, keep, _ = heldout_activations(model, [2], held.input_ids, tok, FilterConfig(),
                                     attention_mask=held.attention_mask, return_mask=True)
    args = (held.input_ids, held.attention_mask)
    kw = dict(splice_mask=keep, score_mask=held.completion_mask, batch_size=10)
    ident = splice_metrics(model, 2, identity_sae(128), *args, **kw)
    # CE clean on the completion = the organism's own training loss on these rows (labels −100 on
    # prompt and padding), computed by transformers
    labels = held.input_ids.masked_fill(~held.completion_mask, -100)
    with torch.no_grad():
        hf_loss = model(input_ids=held.input_ids, attention_mask=held.attention_mask, labels=labels).loss.item()
    assert ident["ce_clean"] == pytest.approx(hf_loss, abs=1e-5)
    assert ident["n_tokens"] == int(held.completion_mask.sum())
    assert ident["ce_clean"] < 0.3 < 1.0 < ident["ce_clean_all"]  # the model predicts its completions, not operands
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and ident["ce_increase"] == pytest.approx(0, abs=1e-5)
    assert abs(ident["kl_sae"]) < 1e-6 and ident["loss_recovered_all"] == pytest.approx(1.0, abs=1e-4)
    assert ident["flags"] == {}

    zero = SparseAutoencoder.from_config(SAEConfig(128, 256, 8))
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    z = splice_metrics(model, 2, zero, *args, **kw)
    assert z["loss_recovered"] == pytest.approx(0.0, abs=1e-6) and z["ce_sae"] == pytest.approx(z["ce_zero"], abs=1e-9)
    assert z["ce_clean"] == pytest.approx(ident["ce_clean"], abs=1e-9) and z["kl_sae"] == pytest.approx(z["kl_zero"])
    assert z["ce_increase"] == pytest.approx(z["ce_zero"] - z["ce_clean"])
    assert z["ce_increase_relative"] == pytest.approx(z["ce_increase"] / z["ce_clean"])
    assert z["flags"] == {}


def test_near_uniform_clean_ce_raises_the_flag(tiny_qwen3):
    import copy

    flat = copy.deepcopy(tiny_qwen3)
    with torch.no_grad():
        flat.model.norm.weight.mul_(1e-4)  # logits ≈ 0 whatever the residual: CE ≈ ln(vocab) clean and ablated
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    m = splice_metrics(flat, 1, identity_sae(64), ids)
    assert m["ce_clean"] == pytest.approx(math.log(300), abs=0.01)
    assert "clean_near_zero_ablation" in m["flags"] and "near-zero gap" in m["flags"]["clean_near_zero_ablation"]


def test_flag_sentences_say_why_loss_recovered_is_out_of_range():
    from mechreward.sae.evaluate import splice_flags

    better = splice_flags({"ce_clean": 2.0, "ce_sae": 1.9, "ce_zero": 3.0, "loss_recovered": 1.1})
    assert list(better) == ["loss_recovered_out_of_range"] and "better than the model itself" in better[
        "loss_recovered_out_of_range"] and "1.100" in better["loss_recovered_out_of_range"]
    worse = splice_flags({"ce_clean_all": 2.0, "ce_sae_all": 3.5, "ce_zero_all": 3.0, "loss_recovered_all": -0.5},
                         "_all")
    assert list(worse) == ["loss_recovered_out_of_range_all"] and "worse than zero ablation" in worse[
        "loss_recovered_out_of_range_all"]
    assert splice_flags({"ce_clean": 0.05, "ce_sae": 0.08, "ce_zero": 4.6, "loss_recovered": 0.9935}) == {}
