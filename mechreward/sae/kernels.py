"""Sparse kernels behind one name each: `sparse_decode` and `selected_preacts`.

A TopK SAE touches only k of d_sae latents per token, so both the decoder and the encoder's
backward can skip the zeros. Callers never branch on hardware: `sparse_decode` picks its
implementation per device (`DECODE_IMPLS`, `decode_impl_for`); on CUDA with Triton installed
both go to the fused kernels of `triton_kernels` (impl "triton").

Measured on CPU (2 cores, N=4096 tokens, k=32, d_sae=8192, d_in=512, forward + backward):
a dense scatter-then-matmul costs ~1.5 s; gathering rows (`W_dec[indices]`) ~0.9 s;
`embedding_bag` ~60 ms; CSR sparse products (`csr` below) ~60-110 ms. See
benchmarks/README.md for the numbers and how to re-measure (`python -m mechreward.sae.kernels`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor



def _csr_rows(values: Tensor, indices: Tensor, n_cols: int) -> Tensor:
    """[N, k] codes as a CSR matrix [N, n_cols] (k entries per row, duplicates allowed)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=torch.int64)
    with warnings.catch_warnings():  # CSR is marked beta; the ops used here are stable since 2.0
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, indices.reshape(-1).to(torch.int64), values.reshape(-1),
                                       (n, n_cols), check_invariants=False)


def _sampled_rowdot(a: Tensor, b: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = <a[n], b[indices[n, j]]> for a [N, D], b [M, D], indices [N, k]."""
    mask = _csr_rows(torch.ones(indices.shape, dtype=a.dtype, device=a.device), indices, b.shape[0])
    return torch.sparse.sampled_addmm(mask, a, b.t(), beta=0.0).values().view(indices.shape)


def _scatter_matmul_t(values: Tensor, indices: Tensor, rhs: Tensor, n_rows: int,
                      order: "LatentOrder | None" = None) -> Tensor:
    """Zᵀ @ rhs where Z [N, n_rows] holds `values` at `indices`: [n_rows, D]. Deterministic.

    Zᵀ is built directly in CSR form from the latent order (one stable sort, shared with the
    other backward of the step when `order` is given), so the sparse product needs no
    transposition of its own (which sorts again and copies every index and value)."""
    order = order if order is not None else latent_order(indices, n_rows)
    with warnings.catch_warnings():  # CSR is marked beta; the ops used here are stable since 2.0
        warnings.simplefilter("ignore")
        zt = torch.sparse_csr_tensor(order.start, order.rows, values.reshape(-1)[order.perm].to(rhs.dtype),
                                     (n_rows, indices.shape[0]), check_invariants=False)
    return torch.sparse.mm(zt, rhs)


class LatentOrder(NamedTuple):
    """The (token, slot) pairs of an [N, k] index matrix sorted by latent: Z's CSC form.

    One stable sort per selection; the decoder's and the encoder's backward both use it (and the
    Triton kernels' segment sums). Latent i's pairs are perm[start[i]:start[i + 1]]."""

    perm: Tensor
    """[N·k] int64: positions in the flattened [N, k], latent by latent (stable: token order within)."""
    rows: Tensor
    """[N·k] int64: the token of each sorted pair."""
    start: Tensor
    """[n_latents + 1] int64: segment boundaries (no host sync: searchsorted, not bincount)."""


def latent_order(indices: Tensor, n_latents: int) -> LatentOrder:
    """`LatentOrder` of indices [N, k] (values in [0, n_latents))."""
    # int32 keys when they fit: the sort is the costly part and halves with the key width.
    kdt = torch.int32 if n_latents < 2**31 else torch.int64
    flat = indices.reshape(-1).to(kdt)
    sorted_latents, perm = torch.sort(flat, stable=True)
    start = torch.searchsorted(sorted_latents, torch.arange(n_latents + 1, device=flat.device, dtype=kdt))
    return LatentOrder(perm, perm // indices.shape[1], start.to(torch.int64))


# --------------------------------------------------------------------------- decode

def decode_embedding_bag(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[n, j] · W_dec[indices[n, j]] via `embedding_bag` (autograd built in; its W_dec
    gradient is non-zero only on selected rows)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class _CSRDecode(torch.autograd.Function):
    """Forward with embedding_bag; backward with sampled dense-dense (grad of values) and a CSR
    product (grad of W_dec), so no [N, k, d_in] or [N, d_sae] intermediate is ever built.
    `order` (a `LatentOrder` of `indices`, or None to sort here) is shared with the encoder's
    backward of the same selection."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, order: LatentOrder | None = None) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.order = order
        return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_rowdot(grad_out, W_dec, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _scatter_matmul_t(values, indices, grad_out, W_dec.shape[0], ctx.order)
        return grad_values, None, grad_W, None


def decode_csr(values: Tensor, indices: Tensor, W_dec: Tensor, order: LatentOrder | None = None) -> Tensor:
    return _CSRDecode.apply(values, indices, W_dec, order)


def decode_dense(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Reference: scatter into [N, d_sae] and matmul. O(N·d_sae·d_in); for tests and tiny SAEs."""
    z = torch.zeros(indices.shape[0], W_dec.shape[0], dtype=W_dec.dtype, device=W_dec.device)
    z = z.scatter_add(1, indices, values.to(W_dec.dtype))
    return z @ W_dec


DECODE_IMPLS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "embedding_bag": decode_embedding_bag,
    "csr": decode_csr,
    "dense": decode_dense,
}
"""Every decode implementation by name; all compute the same function."""

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is importable. Its kernels ("triton") need a CUDA tensor, or TRITON_INTERPRET=1 set before
`triton_kernels` is imported; so "triton" is not in `DECODE_IMPLS` (which all run on CPU)."""

# Per device type. CPU: csr (embedding_bag forward; its backward reuses the encoder's latent
# order, so one sort per selection instead of embedding_bag's own sort plus a slow per-sample-
# weights backward: decode forward + backward 1.3x faster at 1 thread, 2.2x at 2 on the benchmark
# shape, see benchmarks/README.md). CUDA: the fused Triton kernels when installed (decode, W_dec and
# encoder backward touch only the selected latents), embedding_bag + CSR products otherwise.
_DEFAULT_DECODE = {"cpu": "csr", "cuda": "triton" if HAS_TRITON else "embedding_bag"}


def decode_impl_for(device: torch.device | str) -> str:
    return _DEFAULT_DECODE.get(torch.device(device).type, "embedding_bag")


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, impl: str | None = None,
                  order: LatentOrder | None = None) -> Tensor:
    """x̂ without bias: out[n] = Σ_j values[n, j] · W_dec[indices[n, j]].

    values, indices: [N, k]; W_dec: [d_sae, d_in] → [N, d_in] (dtype of W_dec). Differentiable
    in values and W_dec. `impl` forces one of `DECODE_IMPLS` or "triton"; None picks the
    device's fastest. `order` (`latent_order(indices, d_sae)`) lets the W_dec gradient reuse
    the sort of the encoder's backward (csr, triton); the other implementations ignore it.
    """
    impl = impl or decode_impl_for(W_dec.device)
    if impl == "triton":
        from .triton_kernels import decode

        return decode(values, indices, W_dec, order)
    if impl == "csr":
        return decode_csr(values, indices, W_dec, order)
    return DECODE_IMPLS[impl](values, indices, W_dec)


# --------------------------------------------------------------------------- encoder gather

class _SelectedPreacts(torch.autograd.Function):
    """pre[n, indices[n, j]] where pre = x @ W_enc + b_enc was computed without grad.

    Backward touches only the selected latents: grad x = G @ W_encᵀ, grad W_enc = xᵀ @ G and
    grad b_enc = column sums of G, with G the [N, d_sae] sparse gradient (k per row).
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor,
                order: LatentOrder | None = None) -> Tensor:
        ctx.save_for_backward(x, W_enc, indices)
        ctx.order = order
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices = ctx.saved_tensors
        grad = grad.to(W_enc.dtype).contiguous()
        d_sae = W_enc.shape[1]
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.sparse.mm(_csr_rows(grad, indices, d_sae), W_enc.t()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gW = _scatter_matmul_t(grad, indices, x.to(W_enc.dtype), d_sae, ctx.order).t()
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device)
            gb = gb.index_add(0, indices.reshape(-1), grad.reshape(-1))
        return gx, gW, gb, None, None, None


def selected_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor,
                     impl: str | None = None, order: LatentOrder | None = None) -> Tensor:
    """Differentiable gather of the encoder pre-activations at `indices` ([N, k]).

    x [N, d_in] (already centred), W_enc [d_in, d_sae], b_enc [d_sae]; `pre` [N, d_sae] must be
    x @ W_enc + b_enc computed under no_grad (it is reused, not recomputed). The backward is
    Triton's (`impl="triton"`, the default on CUDA when installed) or CSR products (any other).
    """
    if (impl or decode_impl_for(W_enc.device)) == "triton":
        from .triton_kernels import selected_preacts as triton_selected_preacts

        return triton_selected_preacts(x, W_enc, b_enc, indices, pre, order)
    return _SelectedPreacts.apply(x, W_enc, b_enc, indices, pre, order)


if __name__ == "__main__":  # quick CPU measurement of the decode implementations
    import time

    torch.manual_seed(0)
    N, k, d_in, d_sae = 4096, 32, 512, 8192
    W = torch.randn(d_sae, d_in, requires_grad=True)
    v = torch.rand(N, k, requires_grad=True)
    idx = torch.randint(0, d_sae, (N, k))
    g = torch.randn(N, d_in)
    for name in ("embedding_bag", "csr"):
        times = []
        for _ in range(5):
            W.grad = v.grad = None
            t0 = time.perf_counter()
            sparse_decode(v, idx, W, impl=name).backward(g)
            times.append(time.perf_counter() - t0)
        print(f"{name:14s} fwd+bwd median {sorted(times)[2] * 1e3:7.1f} ms")
