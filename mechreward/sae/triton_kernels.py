"""Triton kernels for the TopK SAE step on GPU: sparse decode and the sparse backwards.

Three kernels cover both sparse products of the step (k of d_sae latents per token):

- `_gather_rows`   out[n] = Σ_j v[n, j] · W[idx[n, j]]        decode forward; encoder grad of x
- `_rowdot`        out[n, j] = ⟨g[n], W[idx[n, j]]⟩           grad of the decoded values
- `_segment_sum`   out[i] = Σ_{(n, j): idx[n, j] = i} v[n, j] · R[n]
                                                           grad of W_dec, W_enc (and b_enc)

`_segment_sum` is the "transpose" product Zᵀ @ R of the sparse code matrix Z: the (n, j) pairs
are sorted by latent once per selection (`kernels.latent_order`, shared by the decoder's
and the encoder's backward; stable sort, so every latent sums its rows in a fixed
order: the gradients are deterministic, unlike an atomic scatter) and each program owns one
latent's row of the output. Rows of latents that did not fire are written as zeros, so no
[N, d_sae] or [N·k, d_in] intermediate is built and nothing syncs with the host.

All accumulation is fp32 whatever the input dtypes (bf16 values under autocast). Callers use
`mechreward.sae.kernels` (`sparse_decode`, `selected_preacts`), which dispatch here on CUDA when
Triton is installed. With `TRITON_INTERPRET=1` (set before this module is imported) the same
kernels run on CPU tensors, which is how the CPU test suite checks them against the PyTorch
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import LatentOrder, _SelectedPreacts, latent_order

BLOCK_D = 128
"""Columns of d_in per program."""
BLOCK_K = 16
"""Selected latents loaded per inner iteration."""
BLOCK_P = 16
"""(token, latent) pairs of one segment loaded per inner iteration."""


@triton.jit
def _gather_rows(vals_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_wr, stride_wc,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < K
        i = tl.load(idx_ptr + n * K + j, mask=jmask, other=0).to(tl.int64)
        v = tl.load(vals_ptr + n * K + j, mask=jmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i[:, None] * stride_wr + d[None, :] * stride_wc,
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(out_ptr + n * D + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _rowdot(g_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_wr, stride_wc,
            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = j < K
    i = tl.load(idx_ptr + n * K + j, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        g = tl.load(g_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i[:, None] * stride_wr + d[None, :] * stride_wc,
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + n * K + j, acc.to(out_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _segment_sum(vals_ptr, rows_ptr, start_ptr, r_ptr, out_ptr, D, stride_rr, stride_or, stride_oc,
                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    start = tl.load(start_ptr + i)
    end = tl.load(start_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        r = tl.load(rows_ptr + p, mask=pmask, other=0).to(tl.int64)
        v = tl.load(vals_ptr + p, mask=pmask, other=0.0).to(tl.float32)
        x = tl.load(r_ptr + r[:, None] * stride_rr + d[None, :],
                    mask=pmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * x, axis=0)
    tl.store(out_ptr + i * stride_or + d * stride_oc, acc.to(out_ptr.dtype.element_ty), mask=dmask)


# --------------------------------------------------------------------------- launchers

def gather_rows(values: Tensor, indices: Tensor, W: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n] = Σ_j values[n, j] · W[indices[n, j]]: values, indices [N, k]; W [M, D] (any strides)."""
    n, k = indices.shape
    d = W.shape[1]
    out = torch.empty(n, d, dtype=out_dtype, device=W.device)
    if n:
        _gather_rows[(n, triton.cdiv(d, BLOCK_D))](values.contiguous(), indices.contiguous(), W, out, k, d,
                                                   W.stride(0), W.stride(1), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def rowdot(g: Tensor, indices: Tensor, W: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n, j] = ⟨g[n], W[indices[n, j]]⟩: g [N, D], indices [N, k], W [M, D] → [N, k]."""
    n, k = indices.shape
    out = torch.empty(n, k, dtype=out_dtype, device=W.device)
    if n:
        _rowdot[(n, triton.cdiv(k, BLOCK_K))](g.contiguous(), indices.contiguous(), W, out, k, W.shape[1],
                                              W.stride(0), W.stride(1), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def transpose_matmul(order: LatentOrder, values: Tensor, R: Tensor, out: Tensor) -> Tensor:
    """out[i] = Σ_{(n, j): idx[n, j] = i} values[n, j] · R[n]; out [n_latents, D] (any strides).
    `order` is `kernels.latent_order(idx, n_latents)`."""
    vals = values.reshape(-1)[order.perm].contiguous()
    d = R.shape[1]
    R = R if R.stride(1) == 1 else R.contiguous()
    n_latents = order.start.shape[0] - 1
    _segment_sum[(n_latents, triton.cdiv(d, BLOCK_D))](vals, order.rows, order.start, R, out, d, R.stride(0),
                                                       out.stride(0), out.stride(1),
                                                       BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D)
    return out


# --------------------------------------------------------------------------- autograd

class TritonDecode(torch.autograd.Function):
    """x̂ = Σ_j values[n, j] · W_dec[indices[n, j]]; W_dec's gradient touches only selected rows."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, order: LatentOrder | None = None) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.order = order
        return gather_rows(values, indices, W_dec, W_dec.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = rowdot(grad_out, indices, W_dec, values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = torch.empty_like(W_dec)
            order = ctx.order if ctx.order is not None else latent_order(indices, W_dec.shape[0])
            transpose_matmul(order, values, grad_out, grad_W)
        return grad_values, None, grad_W, None


class TritonSelectedPreacts(_SelectedPreacts):
    """`kernels._SelectedPreacts` (same forward) with a fused backward that touches only the
    selected latents: no [N, d_sae] gradient is ever built."""

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices = ctx.saved_tensors
        grad = grad.contiguous()
        d_sae = W_enc.shape[1]
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = gather_rows(grad, indices, W_enc.t(), x.dtype)  # row i of W_encᵀ is latent i's encoder
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            order = ctx.order if ctx.order is not None else latent_order(indices, d_sae)
            if ctx.needs_input_grad[1]:
                gW = torch.empty_like(W_enc)  # [d_in, d_sae], written through its transpose
                transpose_matmul(order, grad, x, gW.t())
            if ctx.needs_input_grad[2]:
                ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
                gb = transpose_matmul(order, grad, ones, torch.empty(d_sae, 1, dtype=W_enc.dtype,
                                                                     device=W_enc.device)).view(d_sae)
        return gx, gW, gb, None, None, None


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, order: LatentOrder | None = None) -> Tensor:
    """`kernels.sparse_decode` with the Triton kernels (output dtype = W_dec's)."""
    return TritonDecode.apply(values, indices, W_dec, order)


def selected_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor,
                     order: LatentOrder | None = None) -> Tensor:
    """`kernels.selected_preacts` with the Triton backward."""
    return TritonSelectedPreacts.apply(x, W_enc, b_enc, indices, pre, order)
