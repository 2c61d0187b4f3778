"""SparseAutoencoder math: encode/decode against independent dense computations, AuxK, norms."""

import pytest
import torch

from mechreward.errors import ConfigError, ShapeError
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.kernels import DECODE_IMPLS, selected_preacts, sparse_decode



def random_sae(d_in=12, d_sae=40, k=5, seed=0, dtype=torch.float64, **kw):
    sae = SparseAutoencoder(SAEConfig(d_in, d_sae, k, **kw), dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g, dtype=dtype))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g, dtype=dtype) * 0.3)
        sae.b_dec.copy_(torch.randn(d_in, generator=g, dtype=dtype))
        sae.act_scale.fill_(0.7)
    return sae


def dense_codes(sae, x, relu_first=False, relu=True):
    """Independent reference: pre over all latents, top-k per token, ReLU."""
    W_enc, b_enc, b_dec, s = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), sae.act_scale
    xc = x * s - (b_dec if sae.cfg.apply_b_dec_to_input else 0)
    pre = xc @ W_enc + b_enc
    score = pre.clamp_min(0) if relu_first else pre
    idx = score.topk(sae.cfg.k, dim=-1).indices
    z = torch.zeros_like(pre)
    vals = pre.gather(-1, idx)
    z.scatter_(-1, idx, vals.clamp_min(0) if relu else vals)
    return z


def test_k_must_be_between_zero_and_d_sae():
    for k in (0, -1, 64, 100):
        with pytest.raises(ConfigError, match=f"k={k}.*d_sae=64"):
            SAEConfig(d_in=8, d_sae=64, k=k)


def test_wrong_input_width_is_shape_error():
    sae = random_sae()
    with pytest.raises(ShapeError, match="d_in=12"):
        sae.encode(torch.randn(3, 11, dtype=torch.float64))


@pytest.mark.parametrize("flags", [{}, {"relu": False, "apply_b_dec_to_input": False}, {"relu_before_topk": True}])
def test_encode_equals_dense_topk_then_relu_on_any_leading_shape(flags):
    sae = random_sae(**flags)
    if not sae.cfg.relu:
        with torch.no_grad():
            sae.b_enc.sub_(8.0)  # make many kept pre-activations negative
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ref = dense_codes(sae, x, relu_first=sae.cfg.relu_before_topk, relu=sae.cfg.relu)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (2, 7, 5)
    z = torch.zeros(2, 7, 40, dtype=torch.float64).scatter_add_(-1, indices, values.detach())
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.encode_dense(x).detach(), ref, rtol=0, atol=1e-12)
    if not sae.cfg.relu:  # Qwen-Scope convention keeps negative values
        assert (values < 0).any()
    # decode is x̂ = (z W_dec + b_dec) / s in the input's units
    x_hat = sae.decode(values, indices)
    torch.testing.assert_close(x_hat, (ref @ sae.W_dec + sae.b_dec) / 0.7, rtol=1e-12, atol=1e-12)


def test_decode_implementations_and_their_gradients_equal_dense_autograd():
    g = torch.Generator().manual_seed(3)
    N, k, d_sae, d_in = 50, 6, 80, 24
    idx = torch.randint(0, d_sae, (N, k), generator=g)
    idx[0, :2] = 7  # duplicate latent in one row must sum
    grad_out = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    ref = None
    for name in ["dense", *[n for n in DECODE_IMPLS if n != "dense"], None]:
        v = torch.rand(N, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
        W = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
        if name == "dense":  # independent: one-hot matrix product
            onehot = torch.nn.functional.one_hot(idx, d_sae).to(torch.float64)  # [N, k, d_sae]
            out = torch.einsum("nk,nks,sd->nd", v, onehot, W)
        else:
            out = sparse_decode(v, idx, W, impl=name)
        out.backward(grad_out)
        got = (out.detach(), v.grad, W.grad)
        if ref is None:
            ref = got
            continue
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # the W_dec gradient is zero on rows no token selected
        unused = torch.ones(d_sae, dtype=torch.bool)
        unused[idx.flatten()] = False
        assert unused.any() and (W.grad[unused] == 0).all()


def test_selected_preacts_gradients_equal_dense_autograd():
    g = torch.Generator().manual_seed(4)
    N, d_in, d_sae, k = 30, 10, 50, 7
    args = [torch.randn(N, d_in, generator=g, dtype=torch.float64), torch.randn(d_in, d_sae, generator=g, dtype=torch.float64),
            torch.randn(d_sae, generator=g, dtype=torch.float64)]
    idx = torch.randint(0, d_sae, (N, k), generator=g)
    gout = torch.randn(N, k, generator=g, dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in args]
    with torch.no_grad():
        pre = a[0] @ a[1] + a[2]
    selected_preacts(a[0], a[1], a[2], idx, pre).backward(gout)
    b = [t.clone().requires_grad_() for t in args]
    (b[0] @ b[1] + b[2]).gather(1, idx).backward(gout)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-12, atol=1e-12)


def test_auxk_decodes_dead_latents_without_b_dec_against_the_detached_residual():
    sae = random_sae(d_in=12, d_sae=40, k=3)
    with torch.no_grad():
        sae.b_dec.mul_(20)  # a large b_dec makes a double-counted bias impossible to miss
    x = torch.randn(16, 12, dtype=torch.float64) * 5
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.arange(0, 40, 2)] = True  # 20 dead latents
    k_aux = 4
    out = sae(x, dead_mask=dead, k_aux=k_aux)

    # Independent computation.
    with torch.no_grad():
        xs = x * 0.7
        pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = dense_codes(sae, x)
        recon = z @ sae.W_dec + sae.b_dec
        resid = xs - recon
        tv = (xs - xs.mean(0)).pow(2).sum()
        pre_dead = pre.masked_fill(~dead, -torch.inf)
        i = pre_dead.topk(k_aux, dim=-1).indices
        za = torch.zeros_like(pre).scatter_(-1, i, pre.gather(-1, i).clamp_min(0))
        e_hat = za @ sae.W_dec
        expected = (e_hat - resid).pow(2).sum() / tv  # 20 dead >= k_aux: scale 1
        double_b_dec = (e_hat + sae.b_dec - resid).pow(2).sum() / tv
    torch.testing.assert_close(out.fvu, resid.pow(2).sum() / tv, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.auxk_loss.detach(), expected, rtol=1e-10, atol=0)
    assert not torch.isclose(out.auxk_loss.detach(), double_b_dec, rtol=1e-2)

    # Detached residual: the AuxK gradient reaches only dead latents' decoder rows and biases.
    out.auxk_loss.backward()
    alive_rows = ~dead
    assert (sae.W_dec.grad[alive_rows] == 0).all() and (sae.W_dec.grad[dead].abs().sum() > 0)
    assert (sae.b_enc.grad[alive_rows] == 0).all()


def test_auxk_is_zero_without_dead_latents_and_scaled_when_few():
    sae = random_sae(d_in=12, d_sae=40, k=3)
    x = torch.randn(16, 12, dtype=torch.float64)
    none_dead = torch.zeros(40, dtype=torch.bool)
    assert sae(x, dead_mask=none_dead).auxk_loss.item() == 0.0
    one_dead = none_dead.clone()
    one_dead[5] = True
    few = sae(x, dead_mask=one_dead, k_aux=4).auxk_loss  # 1 dead of k_aux 4 → scaled by 1/4
    with torch.no_grad():
        xs = x * 0.7
        pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
        resid = xs - (dense_codes(sae, x) @ sae.W_dec + sae.b_dec)
        e_hat = pre[:, 5:6].clamp_min(0) * sae.W_dec[5]
        expected = 0.25 * (e_hat - resid).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    torch.testing.assert_close(few.detach(), expected, rtol=1e-10, atol=0)


def test_forward_matches_sparsify_fvu_auxk_and_reconstruction():
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sae = random_sae(d_in=16, d_sae=64, k=4, dtype=torch.float32, relu_before_topk=True)
    with torch.no_grad():
        sae.act_scale.fill_(1.0)
    sp = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=4))
    with torch.no_grad():
        sp.encoder.weight.copy_(sae.W_enc.t())
        sp.encoder.bias.copy_(sae.b_enc)
        sp.W_dec.copy_(sae.W_dec)
        sp.b_dec.copy_(sae.b_dec)
    x = torch.randn(32, 16)
    dead = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
    ours, theirs = sae(x, dead_mask=dead), sp(x, dead_mask=dead)
    torch.testing.assert_close(ours.x_hat, theirs.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.fvu, theirs.fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.auxk_loss, theirs.auxk_loss, rtol=1e-5, atol=1e-6)


def test_parallel_gradient_removal_and_unit_norm_decoder():
    sae = random_sae()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    sae(torch.randn(20, 12, dtype=torch.float64)).fvu.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-12 < (before * sae.W_dec).sum(1).abs().max()
    # only the parallel part was removed
    perp_before = before - (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
    torch.testing.assert_close(sae.W_dec.grad, perp_before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_activation_scale_keeps_codes_and_reconstruction(apply_b_dec):
    sae = random_sae(apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.act_scale.fill_(0.013)
    x = torch.randn(9, 12, dtype=torch.float64) * 80
    codes, x_hat = sae.encode_dense(x).detach(), sae(x).x_hat.detach()
    sae.fold_activation_scale()
    assert sae.act_scale.item() == 1.0
    torch.testing.assert_close(sae.encode_dense(x).detach(), codes, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae(x).x_hat.detach(), x_hat, rtol=1e-10, atol=1e-9)


def test_batchtopk_keeps_k_per_token_on_average_and_thresholds_at_eval():
    sae = random_sae(d_in=12, d_sae=40, k=3, architecture="batchtopk")
    x = torch.randn(64, 12, dtype=torch.float64)
    sae.train()
    z = sae.encode_dense(x).detach()
    assert int((z != 0).sum()) == 3 * 64
    per_token = (z != 0).sum(-1)
    assert per_token.min() != per_token.max()  # batch-level, not per-token, selection
    out = sae(x)
    torch.testing.assert_close(out.x_hat.detach(), (z @ sae.W_dec + sae.b_dec) / 0.7)
    kept_min = z[z > 0].min()
    assert sae.threshold.item() == pytest.approx(kept_min.item())  # first batch sets it
    sae.eval()
    ze = sae.encode_dense(x).detach()
    act = ((x * 0.7 - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0).detach()
    # Away from the threshold the eval codes are exactly the thresholded activations. The latent
    # that set the threshold sits on it: whether `act > threshold` holds there depends on the last
    # ulp of a matmul computed by another path, so it may be kept or dropped, nothing else.
    boundary = (act - kept_min).abs() < 1e-9
    assert int(boundary.sum()) >= 1
    torch.testing.assert_close(ze[~boundary], (act * (act > kept_min))[~boundary])
    assert bool(torch.all((ze[boundary] == 0) | torch.isclose(ze[boundary], act[boundary], rtol=1e-12, atol=1e-12)))
    values, indices = sae.encode(x)  # padded to the widest token
    dense = torch.zeros_like(ze).scatter_add_(-1, indices, values.detach())
    torch.testing.assert_close(dense, ze)
    assert values.shape[-1] == int((ze != 0).sum(-1).max())
