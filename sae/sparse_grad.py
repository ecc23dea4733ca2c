"""The sparse-gradient forward pass: backpropagate through the active codes only.

A dictionary's codes are sparse (tens of features of thousands fire on a token), yet the dense
pass multiplies [B, F] matrices that are zero almost everywhere: encoder, decoder and the three
weight and code gradients are each a B x D x F matmul. Every pre-activation must still be
computed to know which features fire, but after that only the N active (row, feature) pairs
matter:

    values = relu(pre[rows, cols])                 gather; backward O(N D) into W_enc, b_enc, b_dec
    x_hat  = sum_j values_j W_dec[cols_j] + b_dec  bags of decoder rows; backward O(N D)

so one dense matmul remains of the five. The gradients are exactly the dense ones: relu, topk
and batchtopk pass no gradient to a pre-activation whose code is 0, and every loss reads the
codes through `values` (the dense `feature_acts` is built from them). The dense forward in
sae/base.py is the reference the tests compare against; `Dictionary.sparse_grad` turns this
path off. Weighted bags (`embedding_bag`) and sampled dot products do the O(N D) work without
materialising [N, D] products, as in sparsify's decoder.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from sae.base import Dictionary, ForwardOutput

MAX_ACTIVE_FRACTION = 0.125
"""Above this fraction of active codes the sparse pass costs about what the dense one does (at
the start of an L1 run most features fire), so `codes_from_mask` returns None and the caller
takes the dense path."""

_DOT_CHUNK = 1 << 16
"""Entries per chunk of the portable sampled dot product (bounds its [chunk, D] temporary)."""


class ActiveCodes(NamedTuple):
    """Which codes of a [B, F] batch are active: N (row, feature) pairs sorted by row, then
    feature; each backward pass reuses the same index tensors."""

    rows: Int[Tensor, " N"]
    """Batch row of each active code."""
    cols: Int[Tensor, " N"]
    """Feature of each active code."""
    offsets: Int[Tensor, " B_plus_1"]
    """Row r's codes are entries offsets[r] to offsets[r + 1] (CSR row pointers)."""
    col_order: Int[Tensor, " N"]
    """Permutation that sorts the entries by feature (for per-feature sums)."""
    col_offsets: Int[Tensor, " F_plus_1"]
    """In `col_order`, feature c's entries are col_offsets[c] to col_offsets[c + 1]."""
    n_features: int
    """F, the number of dictionary features."""


def _pointers(index: Tensor, n: int) -> Tensor:
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _codes(rows: Tensor, cols: Tensor, n_rows: int, n_features: int) -> ActiveCodes:
    return ActiveCodes(
        rows=rows,
        cols=cols,
        offsets=_pointers(rows, n_rows),
        col_order=torch.argsort(cols, stable=True),
        col_offsets=_pointers(cols, n_features),
        n_features=n_features,
    )


def codes_from_mask(mask: Bool[Tensor, "B F"]) -> ActiveCodes | None:
    """The True entries of `mask`, or None when more than MAX_ACTIVE_FRACTION are True."""
    if int(mask.count_nonzero()) > MAX_ACTIVE_FRACTION * mask.numel():
        return None
    rows, cols = mask.nonzero().unbind(1)  # row-major order: by row, then feature
    return _codes(rows, cols, mask.shape[0], mask.shape[1])


def codes_from_pairs(
    rows: Int[Tensor, " N"], cols: Int[Tensor, " N"], n_rows: int, n_features: int
) -> ActiveCodes:
    """Given (row, feature) pairs, sorted by row, then feature (a batch-wide selection)."""
    return _codes(rows, cols, n_rows, n_features)


def codes_from_indices(indices: Int[Tensor, "B K"], n_features: int) -> ActiveCodes:
    """K distinct features per row (topk indices, in any order within a row)."""
    n_rows, k = indices.shape
    cols = indices.sort(dim=-1).values.reshape(-1)
    rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
    return _codes(rows, cols, n_rows, n_features)


def _sum_by_feature(
    src: Float[Tensor, "B D"], weights: Float[Tensor, " N"], codes: ActiveCodes
) -> Float[Tensor, "F D"]:
    """out[c] = sum over entries j of feature c of weights[j] * src[rows[j]]."""
    order = codes.col_order
    return F.embedding_bag(
        codes.rows[order],
        src,
        codes.col_offsets,
        mode="sum",
        per_sample_weights=weights[order],
        include_last_offset=True,
    )


def _sum_by_row(
    table: Float[Tensor, "F D"], weights: Float[Tensor, " N"], codes: ActiveCodes
) -> Float[Tensor, "B D"]:
    """out[r] = sum over entries j of row r of weights[j] * table[cols[j]]."""
    return F.embedding_bag(
        codes.cols,
        table,
        codes.offsets,
        mode="sum",
        per_sample_weights=weights,
        include_last_offset=True,
    )


def _sampled_dot(
    a: Float[Tensor, "B D"], b: Float[Tensor, "F D"], codes: ActiveCodes
) -> Float[Tensor, " N"]:
    """dot(a[rows[j]], b[cols[j]]) for every entry j: (a b^T) at the active pairs only."""
    if a.device.type in ("cpu", "cuda") and a.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                codes.offsets,
                codes.cols,
                a.new_zeros(codes.cols.numel()),
                (a.shape[0], b.shape[0]),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()
    out = [
        (a[codes.rows[i : i + _DOT_CHUNK]] * b[codes.cols[i : i + _DOT_CHUNK]]).sum(-1)
        for i in range(0, codes.rows.numel(), _DOT_CHUNK)
    ]
    return torch.cat(out) if out else a.new_zeros(0)


class _GatherPreActs(torch.autograd.Function):
    """pre[rows, cols], pre = x W_enc + b_enc - b_dec W_enc, differentiated through the
    active entries only (`pre` itself is given detached; its inputs get the gradients)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        pre: Tensor,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor | None,
        codes: ActiveCodes,
    ) -> Tensor:
        ctx.codes = codes
        ctx.save_for_backward(x, W_enc, b_dec)
        return pre[codes.rows, codes.cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W_enc, b_dec = ctx.saved_tensors
        codes: ActiveCodes = ctx.codes
        _, need_x, need_w, need_b_enc, need_b_dec, _ = ctx.needs_input_grad
        g = grad.to(W_enc.dtype)
        per_feature = g.new_zeros(codes.n_features).index_add_(0, codes.cols, g)
        grad_x = grad_w = grad_b_dec = None
        if need_w:
            centred = x.to(W_enc.dtype) if b_dec is None else x.to(W_enc.dtype) - b_dec
            grad_w = _sum_by_feature(centred, g, codes).T
        if need_x:
            grad_x = _sum_by_row(W_enc.T.contiguous(), g, codes).to(x.dtype)
        if need_b_dec:
            grad_b_dec = -(W_enc @ per_feature)
        return None, grad_x, grad_w, per_feature if need_b_enc else None, grad_b_dec, None


class _DecodeActive(torch.autograd.Function):
    """sum_j values_j W_dec[cols_j] per row, differentiated through the active entries only."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, codes: ActiveCodes) -> Tensor:  # type: ignore[override]
        ctx.codes = codes
        ctx.save_for_backward(values, W_dec)
        return _sum_by_row(W_dec, values.to(W_dec.dtype), codes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        codes: ActiveCodes = ctx.codes
        g = grad.to(W_dec.dtype)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_dot(g, W_dec, codes).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _sum_by_feature(g, values.to(W_dec.dtype), codes)
        return grad_values, grad_w, None


def gather_pre_acts(
    d: Dictionary, x: Float[Tensor, "B D"], pre: Float[Tensor, "B F"], codes: ActiveCodes
) -> Float[Tensor, " N"]:
    """The pre-activations at the active pairs, with encoder gradients through them alone.

    `pre` must be `d.pre_activations(x)`. If it carries a gradient (the dense forward), this is
    plain indexing into it; if it is detached (the sparse forward), the gradient goes straight
    to W_enc, b_enc and b_dec at O(N D) cost.
    """
    if pre.requires_grad:
        return pre[codes.rows, codes.cols]
    b_dec = d.b_dec if d.cfg.apply_b_dec_to_input else None
    out: Tensor = _GatherPreActs.apply(pre, x, d.W_enc, d.b_enc, b_dec, codes)
    return out


def decode_active(
    values: Float[Tensor, " N"], codes: ActiveCodes, W_dec: Float[Tensor, "F D"]
) -> Float[Tensor, "B D"]:
    """sum_j values_j W_dec[cols_j] per row (x_hat without b_dec), backward O(N D)."""
    out: Tensor = _DecodeActive.apply(values, W_dec, codes)
    return out


def sparse_forward(
    d: Dictionary, x: Float[Tensor, "B D"], pre: Float[Tensor, "B F"], codes: ActiveCodes
) -> ForwardOutput:
    """The dictionary's ForwardOutput built from its active codes (same values and gradients
    as `d.dense_forward(x)`); `pre` is the detached `d.pre_activations(x)`."""
    from sae.base import ForwardOutput

    values = torch.relu(gather_pre_acts(d, x, pre, codes))
    x_hat = decode_active(values, codes, d.W_dec) + d.b_dec
    # In place on a fresh tensor: a [B, F] pass fewer than index_put's copy of the zeros.
    feature_acts = pre.new_zeros(pre.shape).index_put_((codes.rows, codes.cols), values)
    return ForwardOutput(x_hat=x_hat, feature_acts=feature_acts, pre_acts=pre, active=codes)


def firing_counts(out: ForwardOutput) -> Float[Tensor, " F"]:
    """On how many rows each feature's code is nonzero: from the active codes when the forward
    was sparse (O(N)), else a pass over the dense codes."""
    f = out.feature_acts.detach()
    codes = out.active
    if codes is None:
        return (f != 0).sum(0).float()
    fired = codes.cols[f[codes.rows, codes.cols] != 0]
    return torch.bincount(fired, minlength=codes.n_features).float()
