"""Triton SAE kernels (run through Triton's CPU interpreter) against the plain PyTorch reference.

On CUDA these kernels are the default behind `sparse_decode` / `selected_preacts`; here the
interpreter runs the very same kernel code on CPU tensors. Skipped when triton is not installed,
except under CI (`CI=true`, as `.ci/run` sets, which installs it), where that fails every test.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton's jit

import pytest
import torch
from needs import missing

from mechreward.sae import SAEConfig, SAETrainer, SparseAutoencoder, TrainerConfig, kernels
from mechreward.sae.kernels import decode_dense, selected_preacts, sparse_decode

tk = None
if kernels.HAS_TRITON:
    from mechreward.sae import triton_kernels as tk


@pytest.fixture(autouse=True)
def _needs_triton():
    if tk is None:
        missing("triton is not installed (pip install triton): the GPU kernels are checked through its "
                "CPU interpreter")


def codes(N=24, k=5, d_in=40, d_sae=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(N, k, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, d_sae, (N, k), generator=g)
    idx[0] = idx[0, 0]  # one token picks the same latent k times
    idx[:, -1] = 3  # a latent chosen by every token (longer than one segment block)
    gout = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    return v, idx, W, gout


def test_triton_decode_and_its_gradients_equal_the_dense_scatter_matmul():
    v, idx, W, gout = codes()
    out = sparse_decode(v, idx, W, impl="triton")
    out.backward(gout)
    got = (out.detach(), v.grad.clone(), W.grad.clone())
    v.grad = W.grad = None
    ref = decode_dense(v, idx, W)
    ref.backward(gout)
    # Kernels accumulate in fp32: float64 inputs agree to fp32 rounding.
    for a, b in zip(got, (ref.detach(), v.grad, W.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unused = torch.ones(W.shape[0], dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert unused.any() and (got[2][unused] == 0).all()  # rows of latents nobody picked: exactly zero


def test_triton_decode_output_dtype_is_w_dec_dtype_with_bf16_values():
    v, idx, W, _ = codes()
    W32 = W.detach().float()
    vb = v.detach().bfloat16()
    out = sparse_decode(vb, idx, W32, impl="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, decode_dense(vb.float(), idx, W32), rtol=1e-5, atol=1e-5)


def test_triton_w_dec_gradient_is_deterministic():
    v, idx, W, gout = codes(N=40, k=6)
    grads = []
    for _ in range(2):
        W.grad = None
        sparse_decode(v, idx, W, impl="triton").backward(gout)
        grads.append(W.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_triton_selected_preacts_gradients_equal_dense_autograd():
    g = torch.Generator().manual_seed(1)
    N, d_in, d_sae, k = 24, 40, 70, 6
    x = torch.randn(N, d_in, generator=g, requires_grad=True)
    W_enc = torch.randn(d_in, d_sae, generator=g, requires_grad=True)
    b_enc = torch.randn(d_sae, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = torch.addmm(b_enc, x, W_enc)
        idx = pre.topk(k, dim=-1).indices
    gout = torch.randn(N, k, generator=g)
    out = selected_preacts(x, W_enc, b_enc, idx, pre, impl="triton")
    assert torch.equal(out, pre.gather(-1, idx))
    out.backward(gout)
    got = [t.grad.clone() for t in (x, W_enc, b_enc)]
    assert got[1].is_contiguous() and got[1].shape == W_enc.shape
    for t in (x, W_enc, b_enc):
        t.grad = None
    torch.addmm(b_enc, x, W_enc).gather(-1, idx).backward(gout)
    for a, t in zip(got, (x, W_enc, b_enc)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_sae_training_steps_with_triton_dispatch_match_the_default_kernels(monkeypatch, autocast):
    """Three SAETrainer steps with AuxK on: the device dispatch sent to Triton (as on CUDA) gives
    the weights of the default CPU kernels."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, 16) * 2 + 0.3
    results = {}
    for impl in ("embedding_bag", "triton"):
        monkeypatch.setitem(kernels._DEFAULT_DECODE, "cpu", impl)
        sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=48, k=4))
        tr = SAETrainer(sae, TrainerConfig(dead_tokens=64, warmup_steps=0, autocast=autocast), total_steps=3)
        outs = [tr.step(xb) for xb in x]
        assert float(outs[-1].auxk_loss) > 0  # AuxK path ran
        results[impl] = ({k: v.clone() for k, v in sae.state_dict().items()}, [float(o.loss) for o in outs])
    ref, got = results["embedding_bag"], results["triton"]
    tol = 1e-4 if autocast == "none" else 2e-2
    assert got[1] == pytest.approx(ref[1], rel=tol, abs=tol)
    for name, t in ref[0].items():
        torch.testing.assert_close(got[0][name], t, rtol=tol, atol=tol, msg=name)


def test_cuda_dispatch_names_triton_when_installed():
    assert kernels.decode_impl_for("cuda") == "triton"
    assert kernels.decode_impl_for("cpu") == "csr"
    assert tk.BLOCK_D % 16 == 0
