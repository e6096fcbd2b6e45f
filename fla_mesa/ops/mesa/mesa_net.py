# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
fla's `fla.ops.mesa_net` entry points, `chunk_mesa_net` and `mesa_net_decoding_one_step`, with fla 0.6's signatures
and return values, run by this package's `chunk_mesa` and `fused_recurrent_mesa`, so fla's callers and fla's
`tests/ops/test_mesa.py` run unchanged on them.

The solver is fla's, step for step: plain (unpreconditioned) CG from the Jacobi start `x0 = q / (diag(H) + Λ)`,
`max_CG_iteration` steps per token, no tolerance. It differs from fla 0.6 in four ways, all documented in
`docs/upstream.md`:
- fla's chunk solver starts from `x0 = 0` while its decoding step starts from the Jacobi start; both entry points here
  start from the Jacobi start, so prefill and decoding solve each token the same way. Converged (`max_CG_iteration`
  about `K`), both starts give the exact solve; with a few steps the results differ.
- fla adds `1e-5` to three denominators (the Jacobi start, α and β of CG); here each right-hand side is normalised
  and nothing is added, so results do not depend on the scale of q. A row also stops early once its relative residual
  is under what the solve's arithmetic attains (`utils.residual_floor2`), where further steps change nothing.
- fla's chunk op runs q and k in float16 and needs `V == K`; here q and k keep their dtype (products at fp32 level),
  and `V` may differ from `K`. The backward is an implicit (adjoint-CG) one, as in fla.
- `mesa_net_decoding_one_step` needs `prev_h_kk` symmetric (every state Mesa makes is); fla's reads it as given.
"""

from __future__ import annotations

import torch

from fla_mesa.ops.mesa.chunk import chunk_mesa
from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa


def _state_pair(
    h_kk: torch.Tensor | None,
    h_kv: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    # fla takes the two states separately, either may be None; the op takes both or neither
    if h_kk is None and h_kv is None:
        return None
    ref = h_kk if h_kk is not None else h_kv
    N, H, K, V = ref.shape[0], k.shape[2], k.shape[3], v.shape[3]
    if h_kk is None:
        h_kk = ref.new_zeros(N, H, K, K)
    if h_kv is None:
        h_kv = ref.new_zeros(N, H, K, V)
    return h_kk, h_kv


@torch.compiler.disable
def chunk_mesa_net(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    h_kk_init: torch.Tensor | None = None,
    h_kv_init: torch.Tensor | None = None,
    output_final_state: bool = False,
    max_CG_iteration: int = 30,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""
    fla 0.6's `chunk_mesa_net`: the Mesa layer chunkwise, with fla's argument names, run by `chunk_mesa` with
    `cg_max_steps=max_CG_iteration, cg_tol=None, precondition=False` (the module docstring lists the differences).

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`, L2-normalised (or `use_qk_l2norm_in_kernel=True`).
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        g (torch.Tensor):
            log-decays `log γ_t <= 0` of shape `[B, T, H]`.
        beta (torch.Tensor):
            write strengths of shape `[B, T, H]`.
        lamb (torch.Tensor):
            the ridge `Λ`, positive, of shape `[H, K]`.
        h_kk_init (torch.Tensor, Optional):
            initial `H` of shape `[N, H, K, K]`, float32. Default: `None` (zeros).
        h_kv_init (torch.Tensor, Optional):
            initial `S` of shape `[N, H, K, V]`, float32. Default: `None` (zeros).
        output_final_state (bool, Optional):
            whether to return the final states. Default: `False`.
        max_CG_iteration (int, Optional):
            CG steps per token. Default: `30`.
        use_qk_l2norm_in_kernel (bool, Optional):
            L2-normalise q and k inside the op. Default: `False`.
        cu_seqlens (torch.LongTensor, Optional):
            cumulative sequence lengths `[N + 1]` of packed sequences (then `B` must be 1). Default: `None`.
        cu_seqlens_cpu (torch.LongTensor, Optional):
            accepted for fla's signature and unused (the op reads `cu_seqlens` once per tensor). Default: `None`.

    Returns:
        o (torch.Tensor): `[B, T, H, V]`, in the dtype of `v`.
        h_kk_final (torch.Tensor): `[N, H, K, K]` float32 if `output_final_state`, else `None`.
        h_kv_final (torch.Tensor): `[N, H, K, V]` float32 if `output_final_state`, else `None`.
    """
    o, final_state = chunk_mesa(
        q, k, v, g, beta, lamb,
        initial_state=_state_pair(h_kk_init, h_kv_init, k, v),
        output_final_state=output_final_state,
        cg_max_steps=max_CG_iteration,
        cg_tol=None,
        precondition=False,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    h_kk_final, h_kv_final = (None, None) if final_state is None else final_state
    return o, h_kk_final, h_kv_final


def mesa_net_decoding_one_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lamb: torch.Tensor,
    beta: torch.Tensor,
    prev_h_kk: torch.Tensor,
    prev_h_kv: torch.Tensor,
    max_CG_iteration: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    fla 0.6's `mesa_net_decoding_one_step`: one token of the Mesa layer per sequence, with fla's argument names and
    order (`lamb` before `beta`), run by `fused_recurrent_mesa` with `cg_max_steps=max_CG_iteration, cg_tol=None,
    precondition=False`. Inference only, as fla's: no autograd graph is built.

    Args:
        q (torch.Tensor):
            queries of shape `[B, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, H, K]`.
        v (torch.Tensor):
            values of shape `[B, H, V]`.
        g (torch.Tensor):
            log-decays of shape `[B, H]`.
        lamb (torch.Tensor):
            the ridge `Λ` of shape `[H, K]`.
        beta (torch.Tensor):
            write strengths of shape `[B, H]`.
        prev_h_kk (torch.Tensor):
            the state `H` before the token, `[B, H, K, K]`, float32 and symmetric.
        prev_h_kv (torch.Tensor):
            the state `S` before the token, `[B, H, K, V]`, float32.
        max_CG_iteration (int, Optional):
            CG steps. Default: `30`.

    Returns:
        o (torch.Tensor): `[B, H, V]`, in the dtype of `q`.
        h_kk_new (torch.Tensor): `[B, H, K, K]`, in the dtype of `prev_h_kk`.
        h_kv_new (torch.Tensor): `[B, H, K, V]`, in the dtype of `prev_h_kv`.
    """
    for name, x, dim in (('q', q, 3), ('k', k, 3), ('v', v, 3), ('g', g, 2), ('beta', beta, 2)):
        if not isinstance(x, torch.Tensor) or x.dim() != dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`{name}` must be a {dim}-D tensor ({'[B, H, K]' if dim == 3 else '[B, H]'}), got {shape}")
    with torch.no_grad():
        o, (h_kk, h_kv) = fused_recurrent_mesa(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g.unsqueeze(1), beta.unsqueeze(1), lamb,
            initial_state=(prev_h_kk, prev_h_kv),
            output_final_state=True,
            cg_max_steps=max_CG_iteration,
            cg_tol=None,
            precondition=False,
        )
    return o.squeeze(1).to(q.dtype), h_kk.to(prev_h_kk.dtype), h_kv.to(prev_h_kv.dtype)
