# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Input validation and small helpers shared by every Mesa path."""

from __future__ import annotations

import math
import os
import warnings

import torch
from fla.utils import tensor_cache

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def use_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under the Triton interpreter."""
    return x.is_cuda or (x.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET', '0') == '1')


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Solver and state dtype: float64 only for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# the unit roundoff of a CG's products where they are not plain `ieee` in the solve's dtype
# (`kernel_utils.DOT_PRECISIONS`): a split (x3) product carries each operand in two parts, twice the bits of one
UNIT_ROUNDOFF = {'bf16': 2.0 ** -8, 'tf32': 2.0 ** -11, 'bf16x3': 2.0 ** -16, 'tf32x3': 2.0 ** -22}


def residual_floor2(dtype: torch.dtype, precision: str = 'ieee') -> float:
    """
    The squared relative residual under which every CG path stops a row, also with `cg_tol=None`: `(u / 64)²`, `u`
    the unit roundoff of the solve's arithmetic (its products' `precision`, at least `dtype`'s own). Below it a step
    changes x by less than the rounding of its products (the recurrence residual keeps falling, the error does not:
    op README, "The solver"): a relative residual of 9e-10 in float32, 2e-7 with bf16x3 products (bf16 inputs'
    default), 4e-9 with tf32x3, 2e-18 in float64. At least `√tiny`, which keeps rᵀr, rᵀz and pᵀw of the normalised
    rows out of the denormal range, where their rounding made float32 CG blow up in rows run far past convergence.
    """
    u = max(UNIT_ROUNDOFF.get(precision, 0.0), torch.finfo(dtype).eps / 2)
    return max((u / 64) ** 2, torch.finfo(dtype).tiny ** 0.5)


def min_log_decay(dtype: torch.dtype) -> float:
    """
    A log-decay below which `γ = exp(g)` (and `exp2` of it in log2 space) is exactly 0 in `dtype` (float32: under
    log(2⁻¹⁵⁰); float64: under log(2⁻¹⁰⁷⁵)), with a margin. The chunk paths clamp `g` to it before the in-chunk
    cumulative sum: `g = -inf` (γ = 0, legal) would make every later token's sum -inf there, and the decay between
    two of them `-inf - (-inf)` = NaN, where the clamped sums keep their finite differences and every decay across
    the token still rounds to 0. Not lower than needed: a sum this large keeps fewer bits of the finite
    gates after it (op README, "Extreme inputs").
    """
    return -800.0 if dtype == torch.float64 else -110.0


def split_cg_steps(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Decodes the step counts of a solve run with `flag_unconverged`: a token that stopped without reaching `cg_tol`
    (at `cg_max_steps`, or at a breakdown) holds `~n = -n - 1` for its `n` steps, so that one int32 tensor carries
    both (no extra output through the kernels and autograd functions). Returns `(steps, unconverged)`: the counts
    and a bool mask, both `[B, T, H]`, on the device (no host sync).
    """
    unconverged = steps < 0
    return torch.where(unconverged, ~steps, steps), unconverged


def pack_cg_steps(steps: torch.Tensor, cg_max_steps: int) -> torch.Tensor:
    """
    Step counts encoded as the kernels encode them (`~n` where unconverged: an op's `return_cg_steps='encoded'`;
    `split_cg_steps` decodes) in the narrowest integer dtype that holds every count ('auto' runs up to two solves of
    `cg_max_steps` each): what `MesaNet` keeps of each call, 1 byte a token and head at the default 30 steps.
    """
    bound = 2 * cg_max_steps + 1
    return steps.to(torch.int8 if bound <= 127 else torch.int16 if bound <= 32767 else torch.int32)


def flags_unconverged(return_cg_steps, return_cg_unconverged: bool, warn_unconverged: bool, cg_max_steps: int,
                      cg_tol: float | None) -> bool:
    """Whether an op's solve must flag the tokens that stop above `cg_tol` (`~n` steps): for any output that tells."""
    if return_cg_steps not in (True, False, 'encoded'):
        raise ValueError(f"`return_cg_steps` must be True, False or 'encoded', got {return_cg_steps!r}")
    wanted = return_cg_unconverged or warn_unconverged or return_cg_steps == 'encoded'
    return bool(wanted) and cg_tol is not None and cg_max_steps > 0


def op_outputs(
    op: str, o, final_state, steps, flagged: bool, cg_max_steps: int, cg_tol: float | None,
    return_cg_steps: bool | str, return_cg_unconverged: bool, warn_unconverged: bool,
) -> tuple:
    """
    What `chunk_mesa` and `fused_recurrent_mesa` return: `(o, final_state)`, then the steps and the unconverged mask
    as asked, decoded from `steps` when the solve ran with the flag (`flagged`), or the steps as the kernels encode
    them (`return_cg_steps='encoded'`: nothing decoded); the opt-in warning.
    """
    encoded, unconverged = steps, None
    if flagged and (return_cg_steps is True or return_cg_unconverged or warn_unconverged):
        steps, unconverged = split_cg_steps(steps)
    elif return_cg_unconverged:
        unconverged = torch.zeros_like(steps, dtype=torch.bool)
    if warn_unconverged and flagged:
        warn_if_unconverged(op, unconverged, cg_max_steps, cg_tol, stacklevel=5)
    out = (o, final_state)
    if return_cg_steps:
        out += (encoded if return_cg_steps == 'encoded' else steps,)
    if return_cg_unconverged:
        out += (unconverged,)
    return out


def warn_if_unconverged(op: str, unconverged: torch.Tensor, cg_max_steps: int, cg_tol: float | None, stacklevel: int = 4):
    """The opt-in warning (one host sync): how many token-heads stopped without reaching `cg_tol`."""
    n = int(unconverged.sum())
    if n:
        warnings.warn(
            f"{op}: {n} of {unconverged.numel()} token-heads stopped without reaching cg_tol = {cg_tol} in "
            f"cg_max_steps = {cg_max_steps} steps; their outputs can be far off the exact solve. A larger "
            f"cg_max_steps, a larger lamb or a better-conditioned state helps (op README, \"No silent failure\")",
            RuntimeWarning, stacklevel=stacklevel,
        )


# fla's `l2norm` default: q's and k's L2 norm on every path (chunk, layer, recurrent kernel) uses it
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """fla's l2norm (x / sqrt(sum x² + eps)) in PyTorch, for the paths that run no Triton."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _shape(x) -> str:
    return 'None' if x is None else str(tuple(x.shape))


@tensor_cache
def _as_list(cu_seqlens: torch.Tensor) -> list[int]:
    # one sync per cu_seqlens tensor, however many layers a step passes it to
    return cu_seqlens.tolist()


def _head_first(q: torch.Tensor, g: torch.Tensor, lamb: torch.Tensor) -> bool:
    # q [B, H, T, K] with g [B, T, H], or with everything head-first but lamb [H, K]
    B, D1, D2, K = q.shape
    if D1 == D2:
        return False
    return tuple(g.shape) == (B, D2, D1) or (tuple(g.shape) == (B, D1, D2) and tuple(lamb.shape) == (D1, K))


def _check_values(**tensors: torch.Tensor):
    """
    One host sync for every data check: the min and max of each input (NaN propagates through both, and ±inf shows
    in them), stacked and read back at once.
    """
    stats = torch.stack([m.float() for x in tensors.values() for m in torch.aminmax(x.detach())]).tolist()
    ext = {name: stats[2 * i:2 * i + 2] for i, name in enumerate(tensors)}
    lmin, lmax = ext.pop('lamb')
    # Λ > 0 keeps H + Λ positive definite (and finite)
    if not (lmin > 0 and lmax < math.inf):
        raise ValueError(f"`lamb` must be positive and finite everywhere, got min(lamb) = {lmin}, max(lamb) = {lmax}")
    # g <= 0 keeps γ in [0, 1]; g = -inf (γ = 0: forget everything) is legal
    gmin, gmax = ext.pop('g')
    if not (gmax <= 0 and gmin == gmin):
        raise ValueError(f"`g` is a log-decay and must be <= 0 everywhere (and not NaN), got max(g) = {gmax}")
    # β >= 0 keeps H_t positive semidefinite: a negative write can make H + Λ indefinite, where CG has no answer
    bmin, bmax = ext.pop('beta')
    if not (bmin >= 0 and bmax < math.inf):
        raise ValueError(f"`beta` must be >= 0 and finite everywhere, got min(beta) = {bmin}, max(beta) = {bmax}")
    for name, (lo, hi) in ext.items():
        if not (-math.inf < lo and hi < math.inf):
            raise ValueError(f"`{name}` must be finite everywhere, got min({name}) = {lo}, max({name}) = {hi}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None,
    cu_seqlens: torch.Tensor | None,
    cg_max_steps: int,
    cg_tol: float | None,
    chunk_size: int | None = None,
    check_values: bool = True,
) -> int:
    """
    Checks the arguments of `chunk_mesa`/`fused_recurrent_mesa`; returns N, the number of sequences. The checks of
    values in device memory sync the host: those of `lamb` and `g` only with `check_values`, those of `cu_seqlens`
    once per tensor object (as fla's own varlen helpers read it).
    """
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb)
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if q.dim() != 4:
        raise ValueError(f"`q` must have shape [B, T, H, K], got {_shape(q)}")
    B, T, H, K = q.shape
    if k.shape == q.shape and v.dim() == 4 and v.shape[:3] == q.shape[:3] and _head_first(q, g, lamb):
        raise ValueError(
            f"`q`, `k`, `v` look head-first [B, H, T, K]: q {_shape(q)}, v {_shape(v)} against g {_shape(g)} and "
            f"lamb {_shape(lamb)}; the op takes [B, T, H, K] (pass q.transpose(1, 2), and so k and v)"
        )
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` {_shape(q)}, got {_shape(k)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"`v` must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {_shape(v)}")
    for name, x in (('g', g), ('beta', beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"`{name}` must have shape [B, T, H] = {tuple(q.shape[:3])}, got {_shape(x)}")
    if lamb.shape != (H, K):
        raise ValueError(f"`lamb` must have shape [H, K] = ({H}, {K}), got {_shape(lamb)}")
    if T == 0 or H == 0 or K == 0 or v.shape[-1] == 0:
        raise ValueError(f"empty inputs are not supported: q {_shape(q)}, v {_shape(v)}")
    # data-dependent checks in one device sync; skipped while a CUDA graph is captured, where no sync is allowed
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values and not capturing:
        _check_values(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb)
    if not isinstance(cg_max_steps, int) or isinstance(cg_max_steps, bool) or cg_max_steps < 0:
        raise ValueError(f"`cg_max_steps` must be a non-negative int, got {cg_max_steps!r}")
    if cg_tol is not None and (not isinstance(cg_tol, (int, float)) or not 0 <= cg_tol < 1):
        raise ValueError(f"`cg_tol` must be None or a float in [0, 1), got {cg_tol!r}")
    if chunk_size is not None and chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32 or 64, got {chunk_size!r}")

    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"`cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise ValueError(
                f"`cu_seqlens` must be a 1-D int32/int64 tensor, got dtype {cu_seqlens.dtype}, shape {_shape(cu_seqlens)}"
            )
        if B != 1:
            raise ValueError(
                f"The batch size is expected to be 1 rather than {B} when using `cu_seqlens`. "
                f"Please flatten variable-length inputs before processing."
            )
        if cu_seqlens.device != q.device:
            raise ValueError(f"`cu_seqlens` must be on {q.device}, got {cu_seqlens.device}")
        N = cu_seqlens.numel() - 1
        if not capturing:
            cu = _as_list(cu_seqlens)
            if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"`cu_seqlens` must rise from 0 to T = {T}, got {cu}")

    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("`initial_state` must be a pair (h_kk [N, H, K, K], h_kv [N, H, K, V])")
        h_kk, h_kv = initial_state
        V = v.shape[-1]
        for name, h, shape in (('h_kk', h_kk, (N, H, K, K)), ('h_kv', h_kv, (N, H, K, V))):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"`initial_state` {name} must be a torch.Tensor, got {type(h).__name__}")
            if tuple(h.shape) != shape:
                raise ValueError(
                    f"`initial_state` {name} must have shape {shape} (N = {N} "
                    f"{'sequences in cu_seqlens' if cu_seqlens is not None else '= batch size'}), got {_shape(h)}"
                )
            if h.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"`initial_state` {name} must be float32 (or float64), got {h.dtype}")
            if h.device != q.device:
                raise ValueError(f"`initial_state` {name} must be on {q.device}, got {h.device}")
    return N


def pad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[1, T, ...]` packed sequences to a zero-padded batch `[N, T_max, ...]`."""
    lens = cu_seqlens.diff()
    pos = torch.arange(int(lens.max()), device=x.device)
    mask = pos < lens[:, None]
    idx = (cu_seqlens[:-1, None] + pos).clamp_max(x.shape[1] - 1)
    mask = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return x[0][idx] * mask


def unpad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad_varlen`: `[N, T_max, ...]` back to `[1, T, ...]`."""
    lens = cu_seqlens.diff()
    mask = torch.arange(x.shape[1], device=x.device) < lens[:, None]
    return x[mask].unsqueeze(0)


def zero_state(B, H, K, V, dtype, device):
    return (torch.zeros(B, H, K, K, dtype=dtype, device=device), torch.zeros(B, H, K, V, dtype=dtype, device=device))
