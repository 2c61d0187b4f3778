"""Independent agreement: our evaluator and SAELens's own evaluation (`sae_lens.evals`) give the
same variance explained, L0, dead fraction, CE clean / SAE / zero-ablated and KL for the same SAE
on the same tokens.

Model: a tiny random GPT-2 saved to disk. We load it with transformers; SAELens evaluates a
TransformerLens `HookedTransformer` built from the same saved weights (TransformerLens's own
GPT-2 weight conversion, no weight processing), hooked at `blocks.L.hook_resid_post` = the
output of decoder layer L. The SAE is written by us (`save_sae`) and read by `sae_lens.SAE`.
Every position is evaluated on both sides (no filters, no ignored tokens), as SAELens does.

Definitions that differ and are aligned here: SAELens's KL is per position including the last
one (which has no next token); ours averages over the positions that predict a target, so the
SAELens per-position KL is averaged over positions 0..T-2.

Tolerance: 1e-4 absolute on CE and KL (two float32 implementations of the forward), 1e-5 on
variance explained and exact L0 / dead fraction.
"""

import os

import pytest
import torch

from mechreward.activations import FilterConfig
from mechreward.models import load_model
from mechreward.sae.evaluate import activation_metrics, splice_metrics
from mechreward.sae.formats import save_sae
from mechreward.sae_train import heldout_activations
from tiny import VOCAB, identity_sae, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER = 1
CE_TOL, VE_TOL = 1e-4, 1e-5


def _hooked_gpt2(path):
    """TransformerLens's GPT-2 from the HF weights saved at `path` (config taken from that model)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    c = hf.config
    cfg = HookedTransformerConfig(d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False,
                                  positional_embedding_type="standard", device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


class _FixedTokens:
    """The one method of `sae_lens.ActivationsStore` that `get_sparsity_and_variance_metrics` calls,
    serving our fixed held-out rows (so both evaluations read the same tokens)."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def get_batch_tokens(self, n):
        out = self.tokens[self.i:self.i + n]
        self.i += n
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    save_tiny(d / "gpt2", "gpt2", seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (12, 24), generator=g)
    model, _ = load_model(str(d / "gpt2"), device="cpu")
    with torch.no_grad():
        mean = model(tokens, output_hidden_states=True).hidden_states[LAYER + 1].mean((0, 1))
    # a partial SAE: b_dec = the mean activation, the identity's ±e_i latents with only the top 16
    # of 64 |x_i − b_dec| kept, 20 latents dead (so no metric is trivially 0 or 1)
    sae = identity_sae(64, layer=LAYER, model_name="gpt2")
    sae.cfg.k = 16
    with torch.no_grad():
        sae.b_enc[:20] = -1e4
        sae.b_dec.copy_(mean)
    path = save_sae(sae, d / "sae")
    return d, path, tokens


def test_our_metrics_equal_sae_lens_evals_on_the_same_tokens(setup):
    from sae_lens import SAE
    from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    d, path, tokens = setup
    # ours: transformers model, our loader, our evaluator; every position
    model, tok = load_model(str(d / "gpt2"), device="cpu")
    from mechreward.sae.formats import load_sae

    ours_sae = load_sae(path)
    acts = heldout_activations(model, [LAYER], tokens, tok,
                               FilterConfig(drop_first_position=False, drop_special=False, outlier_factor=0))[LAYER]
    assert acts.shape[0] == tokens.numel()
    am = activation_metrics(ours_sae, acts)
    sm = splice_metrics(model, LAYER, ours_sae, tokens, batch_size=5)

    # theirs: TransformerLens model from the same weights, SAELens's loader and evaluation
    tl = _hooked_gpt2(d / "gpt2")
    sae = SAE.load_from_disk(str(path), device="cpu")
    sae.cfg.metadata.hook_name = f"blocks.{LAYER}.hook_resid_post"
    with torch.no_grad():  # the same model: clean logits agree before any SAE is involved
        torch.testing.assert_close(tl(tokens), model(tokens).logits, rtol=1e-4, atol=1e-4)
    scaler = ActivationScaler(None)
    sv, feats = get_sparsity_and_variance_metrics(
        sae, tl, _FixedTokens(tokens), scaler, n_batches=3, compute_l2_norms=False, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=4,
        model_kwargs={})
    rec = get_recons_loss(sae, tl, scaler, tokens, compute_kl=True, compute_ce_loss=True)

    assert am["variance_explained"] == pytest.approx(sv["explained_variance"], abs=VE_TOL)
    assert 0.05 < am["variance_explained"] < 0.95  # a partial SAE: the comparison is not trivially 0 or 1
    assert am["l0"] == pytest.approx(sv["l0"], abs=1e-6)
    density = torch.tensor(feats["feature_density"])
    assert am["dead_fraction"] == pytest.approx((density == 0).float().mean().item(), abs=1e-9)
    assert am["dead_fraction"] >= 20 / 128
    torch.testing.assert_close(am["fire_rates"], density.float(), rtol=1e-6, atol=1e-7)

    assert sm["ce_clean"] == pytest.approx(rec["ce_loss_without_sae"].mean().item(), abs=CE_TOL)
    assert sm["ce_sae"] == pytest.approx(rec["ce_loss_with_sae"].mean().item(), abs=CE_TOL)
    assert sm["ce_zero"] == pytest.approx(rec["ce_loss_with_ablation"].mean().item(), abs=CE_TOL)
    assert sm["kl_sae"] == pytest.approx(rec["kl_div_with_sae"][:, :-1].mean().item(), abs=CE_TOL)
    assert sm["kl_zero"] == pytest.approx(rec["kl_div_with_ablation"][:, :-1].mean().item(), abs=CE_TOL)
    # the three CEs differ by far more than the tolerance (a random model: either sign)
    assert abs(sm["ce_sae"] - sm["ce_clean"]) > 10 * CE_TOL and abs(sm["ce_zero"] - sm["ce_clean"]) > 10 * CE_TOL
    assert sm["kl_sae"] > 10 * CE_TOL
    assert sm["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
