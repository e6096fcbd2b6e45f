# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Triton helpers shared by the Mesa chunk and fused-recurrent kernels: split products, rounding, program indices."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fla_mesa.utils import is_interpreting

# 1 / ln 2: gates go to log2 space once on the host, so that the kernels take exp2
RCP_LN2 = 1 / math.log(2)


@triton.jit
def exp2(x):
    return tl.math.exp2(x.to(tl.float32))


# operand precisions of `mesa_dot` (the README's precision study compares them):
#   'ieee'   fp32 FMA products, no tensor cores
#   'tf32x3' a = a_hi + a_lo with a_hi exact in tf32, a_hi b_hi + a_hi b_lo + a_lo b_hi on tf32 tensor cores,
#            about fp32 accuracy; two products when `b` is bf16 (exact in tf32: b_lo = 0)
#   'tf32'   one tf32 product (10-bit mantissa operands)
#   'bf16'   one bf16 product (8-bit mantissa operands)
#   'bf16x3' our own split: a = a_hi + a_lo in bf16, a_hi b_hi + a_hi b_lo + a_lo b_hi (16-bit operands);
#            two products when `b` is already bf16 (k, v in bf16: b_lo = 0)
DOT_PRECISIONS = ('ieee', 'tf32x3', 'tf32', 'bf16', 'bf16x3')


def resolve_precision(precision: str | None, default: str, ref: torch.Tensor, name: str = 'precision') -> str:
    """`precision`, else `default`; 'auto' by the dtype of `ref` (an input of the op)."""
    precision = default if precision is None else precision
    if precision == 'auto':
        precision = 'tf32x3' if ref.dtype == torch.float32 else 'bf16x3'
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"`{name}` must be one of {DOT_PRECISIONS} or 'auto', got {precision!r}")
    return precision

# the interpreter multiplies bf16 tensors as raw uint16: round to bf16, then multiply in fp32 (the same
# numbers a bf16 tensor-core product with fp32 accumulation gives)
BF16_DOT_TYPE = tl.constexpr(tl.float32 if is_interpreting() else tl.bfloat16)
INTERPRETING = tl.constexpr(is_interpreting())


@triton.jit
def round_tf32(a):
    # to the nearest value with a 10-bit mantissa (ties away from zero), by integer arithmetic on the fp32 bits
    return ((a.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(a):
    # fp32 -> the nearest bf16 value (ties to even), still fp32: a store to bf16 then needs no rounding (the
    # interpreter's cast truncates)
    bits = a.to(tl.int32, bitcast=True)
    return ((bits + 32767 + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


def round_code(dtype: torch.dtype) -> int:
    """`round_to`'s code for a store to `dtype`: 1 bf16, 2 fp16, 0 any other (nothing to round)."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


@triton.jit
def round_to(a, ROUND: tl.constexpr):
    # fp32 values rounded to nearest in a 16-bit dtype (`round_code`), still fp32: what a store to that dtype does on
    # a GPU (the interpreter's bf16 cast truncates)
    if ROUND == 1:
        a = round_bf16(a)
    elif ROUND == 2:
        a = a.to(tl.float16).to(tl.float32)
    return a


@triton.jit
def mesa_split(a, PREC: tl.constexpr):
    """`a` as the operand pair `(hi, lo)` of `mesa_dot_split`: split once, outside loops, what a loop reuses."""
    if PREC == 'bf16x3':
        hi = a.to(tl.bfloat16)
        lo = (a.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16).to(BF16_DOT_TYPE)
        hi = hi.to(BF16_DOT_TYPE)
    elif PREC == 'tf32x3':
        # both parts rounded to nearest tf32 (the tensor cores would truncate them: a bias that measured 5x the error)
        hi = round_tf32(a.to(tl.float32))
        lo = round_tf32(a.to(tl.float32) - hi)
    elif PREC == 'bf16':
        hi = a.to(tl.bfloat16).to(BF16_DOT_TYPE)
        lo = hi
    else:
        hi = a.to(tl.float32)
        lo = hi
    return hi, lo


@triton.jit
def _dot_part(a, b, acc, PREC: tl.constexpr):
    if PREC == 'tf32x3':
        acc = tl.dot(a, b, acc, input_precision='tf32')
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mesa_dot_split(a_hi, a_lo, b_hi, b_lo, acc, PREC: tl.constexpr, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr):
    """`acc + a @ b` from split operands; `A_EXACT`/`B_EXACT`: that operand's lo part is zero (bf16 values)."""
    if PREC == 'bf16x3' or PREC == 'tf32x3':
        # the small terms summed from zero, apart from acc: added into a large accumulator inside the tensor
        # cores they lost bits (more error than Triton's own tf32x3)
        small = tl.zeros(acc.shape, dtype=tl.float32)
        if not B_EXACT:
            small = _dot_part(a_hi, b_lo, small, PREC)
        if not A_EXACT:
            small = _dot_part(a_lo, b_hi, small, PREC)
        acc = _dot_part(a_hi, b_hi, acc + small, PREC)
    elif PREC == 'bf16':
        acc = tl.dot(a_hi, b_hi, acc)
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PREC)
    return acc


@triton.jit
def mesa_dot(a, b, acc, PREC: tl.constexpr, B_IS_BF16: tl.constexpr, A_IS_BF16: tl.constexpr = False):
    """
    `acc + a @ b` with fp32 accumulation and operands rounded as `PREC` says; `A_IS_BF16`/`B_IS_BF16`: that operand
    holds bf16 values (exact in both splits: one product fewer).
    """
    a_hi, a_lo = mesa_split(a, PREC)
    b_hi, b_lo = mesa_split(b, PREC)
    return mesa_dot_split(a_hi, a_lo, b_hi, b_lo, acc, PREC, A_IS_BF16, B_IS_BF16)


@triton.jit
def readout_products(a, d, h, bos, i_h, o_r, m_r, o_c, m_c, o_n, m_n, H: tl.constexpr, M: tl.constexpr,
                     N: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, A_IS_BF16: tl.constexpr,
                     D_IS_BF16: tl.constexpr, TRANS_G: tl.constexpr):
    """
    The two products over M of the output pass `out_t = e^{Γ_t} a_t G_c + Σ_{j<=t} M_tj (a_t·d_j) c_j` (`chunk_o`)
    for the rows `o_r` and the chunk's columns `o_c`: `(A Dᵀ, A G_c)` over the output columns `o_n`, BM of M at a
    time; `a`, `d` are `[.., M]`, `h` points at the chunk's state `[K, V]`, which is G_c `[M, N]` itself or, with
    TRANS_G, its transpose. The caller applies the decays and the product with c. The readout is (x, k, S_c); the
    adjoint's right-hand side dx is (do, v, S_cᵀ).
    """
    b_ad = tl.zeros([o_r.shape[0], o_c.shape[0]], dtype=tl.float32)
    b_o = tl.zeros([o_r.shape[0], o_n.shape[0]], dtype=tl.float32)
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m = tl.cast(i_m, tl.int64) * BM + tl.arange(0, BM)
        m_m = o_m < M
        b_a = tl.load(a + (bos * H + i_h) * M + o_r[:, None] * (H * M) + o_m[None, :], mask=m_r[:, None] & m_m[None, :],
                      other=0.)
        b_d = tl.load(d + (bos * H + i_h) * M + o_c[:, None] * (H * M) + o_m[None, :], mask=m_c[:, None] & m_m[None, :],
                      other=0.)
        if TRANS_G:
            p_g = h + o_m[:, None] + o_n[None, :] * M
        else:
            p_g = h + o_m[:, None] * N + o_n[None, :]
        b_h = tl.load(p_g, mask=m_m[:, None] & m_n[None, :], other=0.)
        # a split once for both of its products
        b_a_hi, b_a_lo = mesa_split(b_a, PREC)
        b_d_hi, b_d_lo = mesa_split(b_d, PREC)
        b_h_hi, b_h_lo = mesa_split(b_h, PREC)
        b_ad = mesa_dot_split(b_a_hi, b_a_lo, tl.trans(b_d_hi), tl.trans(b_d_lo), b_ad, PREC, A_IS_BF16, D_IS_BF16)
        b_o = mesa_dot_split(b_a_hi, b_a_lo, b_h_hi, b_h_lo, b_o, PREC, A_IS_BF16, False)
    return b_ad, b_o


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def sum2(a, b, AXIS: tl.constexpr):
    """`(tl.sum(a, AXIS), tl.sum(b, AXIS))` in one reduction: one cross-warp exchange for both on the GPU. The
    interpreter runs a two-value reduction's combine in Python (5x slower tests), so it sums them apart there."""
    if INTERPRETING:
        return tl.sum(a, AXIS), tl.sum(b, AXIS)
    return tl.reduce((a, b), AXIS, _add2)


@triton.jit
def chunk_program(i_t, i_b, chunk_indices, cu_seqlens, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """
    `(i_tg, i_t, bos, T)` of a program over one chunk: the chunk's index among all chunks (of `h_kk`), its index in
    its sequence, the sequence's first token and length. `i_t` comes in as the program's chunk axis (over every
    sequence's chunks when varlen, as fla's `chunk_indices` number them), `i_b` as its batch index.
    """
    if IS_VARLEN:
        i_tg = i_t
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
        bos = i_b * T
    return i_tg, i_t, bos, T


@triton.jit
def chunk_end_state(h, ht, chunk_indices, i_c, i_h, NT, H: tl.constexpr, SIZE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """
    A pointer to the state after chunk `i_c` (of the `[B, NT, H, ...]` chunk-start states `h`, `i_c` over `B·NT`)
    for head `i_h`: the next chunk's start state, or at a sequence's last chunk its final state in `ht`
    (`[N, H, ...]`). `SIZE`: the elements of one state. Varlen (B = 1): sequences by fla's `chunk_indices`.
    """
    if IS_VARLEN:
        i_s = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        # the next chunk's sequence (read in bounds: the last chunk reads itself and is last anyway)
        i_sn = tl.load(chunk_indices + tl.minimum(i_c + 1, NT - 1) * 2).to(tl.int64)
        last = (i_c + 1 >= NT) | (i_sn != i_s)
    else:
        i_s = i_c // NT
        last = i_c % NT == NT - 1
    if last:
        p = ht + (i_s * H + i_h) * SIZE
    else:
        p = h + ((i_c + 1) * H + i_h) * SIZE
    return p
