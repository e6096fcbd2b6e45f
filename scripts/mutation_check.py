# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Plants semantic bugs in a copy of the package, one at a time, and checks that the tests catch each.

Each mutant is a textual replacement in one file of `fla_mesa/` or of a benchmark a test guards (its anchor must
occur exactly once: a missing or repeated anchor fails the run loudly, as the code it targeted has moved) and names
the few test files (and a `-k` filter) that should catch it. For every mutant the committed tree of the commit asked
for (`git archive`, default HEAD: other people's uncommitted edits are not checked) is unpacked to a fresh temporary
directory, the mutant applied there, and pytest run in that directory, whose `fla_mesa` is imported before the
installed one (checked: the run fails if the copy is not what gets imported). A mutant is caught when the tests
fail. The unmutated copy runs every mutant's tests first: they must pass, else a "catch" would mean nothing.

Run from the repository root (CPU, the Triton kernels under the interpreter, as CI):

    TRITON_INTERPRET=1 .venv/bin/python scripts/mutation_check.py [--commit REV] [--only NAME ...] [--out FILE]

It took 24 minutes on 2 busy CPU cores (the baseline, 13 test selections, 16 min; then 9-54 s a mutant: -x stops
at the first failure) and writes a Markdown table (mutant, file, tests, caught or missed, seconds) to `--out` (default
benchmarks/results/mutation_check.md). Exit status 1 if any mutant is missed or the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str
    path: str
    anchor: str
    replacement: str
    tests: list[str]
    select: str | None = None  # pytest -k


MUTANTS = [
    Mutant("output pass: dx reads the state untransposed (S_c where S_cᵀ is due)",
           'fla_mesa/ops/mesa/kernel_utils.py',
           'p_g = h + o_m[:, None] + o_n[None, :] * M',
           'p_g = h + o_m[:, None] * N + o_n[None, :]',
           ['tests/ops/test_chunk_bwd_kernels.py'], 'bwd_kernels'),
    Mutant("output pass: the readout's decay matrix without its diagonal (j < t, not j <= t)",
           'fla_mesa/ops/mesa/chunk_o.py',
           'm_tt = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]',
           'm_tt = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]',
           ['tests/ops/test_chunk_fwd_kernels.py'], 'states_and_exact_solve'),
    Mutant('dq sign flipped in the Triton backward without a solve (cg_max_steps=0)',
           'fla_mesa/ops/mesa/chunk.py',
           'dq = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)',
           'dq = -chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)',
           ['tests/ops/test_no_solve.py'], 'triton and fp32 and 40'),
    Mutant('Jacobi diagonal without its sum of beta k^2 in the CG kernel',
           'fla_mesa/ops/mesa/chunk_cg.py',
           'b_d = mesa_dot(b_m, b_kf * b_kf, b_e[:, None] * b_hd[None, :] + b_lamb[None, :], DIAG_PREC, False)',
           'b_d = b_e[:, None] * b_hd[None, :] + b_lamb[None, :] + 0 * b_m[:, :1]',
           ['tests/ops/test_cg_fixed_steps.py'], 'chunk'),
    Mutant("recurrent kernel's float32 residual floor raised (9e-19 to 1e-12)",
           'fla_mesa/ops/mesa/fused_recurrent.py',
           'FLOOR2=residual_floor2(dtype),',
           'FLOOR2=residual_floor2(dtype) if dtype == torch.float64 else 1e-12,',
           ['tests/ops/test_fused_recurrent.py'], 'float32_matches_exact'),
    Mutant('diagonal without the new token in the recurrent kernel',
           'fla_mesa/ops/mesa/fused_recurrent.py',
           'b_dh = b_dh * b_gamma + b_kb * b_k',
           'b_dh = b_dh * b_gamma',
           ['tests/ops/test_cg_fixed_steps.py'], 'recurrent'),
    Mutant("recurrent kernel's S state not decayed",
           'fla_mesa/ops/mesa/fused_recurrent.py',
           'b_sv = b_sv * b_gamma + b_kb[:, None] * b_v[None, :]',
           'b_sv = b_sv + b_kb[:, None] * b_v[None, :]',
           ['tests/ops/test_fused_recurrent.py'], 'float32_matches_exact'),
    Mutant("CG kernel's float32 residual floor raised (loosened stop)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'tol2 = max(0.0 if cg_tol is None else float(cg_tol) ** 2, residual_floor2(torch.float32, precision))',
           'tol2 = max(0.0 if cg_tol is None else float(cg_tol) ** 2, 1e-11)',
           ['tests/ops/test_chunk.py'], 'fp32_matches and triton and B2-T63'),
    Mutant("CG kernel's causal mask off by one (a token's own key left out of its chunk sum)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'm_rc = (o_r[:, None] >= o_c[None, :])',
           'm_rc = (o_r[:, None] > o_c[None, :])',
           ['tests/ops/test_chunk.py'], 'fp32_matches and triton and B1-T1-'),
    Mutant('backward kernel: dg without its last-token (chunk state) term',
           'fla_mesa/ops/mesa/chunk_bwd.py',
           'b_dg += exp2(b_g_last) * b_last',
           'b_dg += 0 * b_last',
           ['tests/ops/test_chunk.py'], 'fp32_matches and triton and B2-T63 and True'),
    Mutant('varlen chunk states not reset between sequences (each starts at the first)',
           'fla_mesa/ops/mesa/chunk_h.py',
           'p_h0 = h0 + i_nh * K * W',
           'p_h0 = h0 + i_h * K * W',
           ['tests/layers/test_layer_triton.py', 'tests/ops/test_chunk.py'], 'varlen and (chunk or triton)'),
    Mutant("layer's PyTorch short convolution not reset between packed sequences",
           'fla_mesa/layers/mesa_net.py',
           'prev = x.new_zeros(W, D) if cache is None else',
           'prev = (x.new_zeros(W, D) if i == 0 else xs[-W:]) if cache is None else',
           ['tests/layers/test_mesa_net_layer.py'], 'varlen_matches_float64'),
    Mutant('PyTorch path: implicit backward with the adjoint term sign flipped',
           'fla_mesa/ops/mesa/chunk_torch.py',
           'loss = loss - (pieces.matvec(xc) * e).sum()',
           'loss = loss + (pieces.matvec(xc) * e).sum()',
           ['tests/ops/test_chunk.py'], 'fp32_matches and torch and B2-T63'),
    Mutant('PyTorch path: Jacobi diagonal without the in-chunk sum',
           'fla_mesa/ops/mesa/chunk_torch.py',
           '+ self.M @ k.pow(2) + self.lamb',
           '+ self.lamb',
           ['tests/ops/test_cg_fixed_steps.py'], 'chunk'),
    Mutant('PyTorch path: chunk state taken after the chunk (off by one chunk)',
           'fla_mesa/ops/mesa/chunk_torch.py',
           '            Hs.append(h_kk)\n            Ss.append(h_kv)\n'
           '            d = gc[:, :, i, -1, None, None].exp()\n'
           '            h_kk, lo_kk = decay_add(h_kk, lo_kk, d, kw[:, :, i].transpose(-1, -2) @ k[:, :, i])\n'
           '            h_kv, lo_kv = decay_add(h_kv, lo_kv, d, kw[:, :, i].transpose(-1, -2) @ v[:, :, i])\n',
           '            d = gc[:, :, i, -1, None, None].exp()\n'
           '            h_kk, lo_kk = decay_add(h_kk, lo_kk, d, kw[:, :, i].transpose(-1, -2) @ k[:, :, i])\n'
           '            h_kv, lo_kv = decay_add(h_kv, lo_kv, d, kw[:, :, i].transpose(-1, -2) @ v[:, :, i])\n'
           '            Hs.append(h_kk)\n            Ss.append(h_kv)\n',
           ['tests/ops/test_chunk.py'], 'fp32_matches and torch and B2-T63'),
    Mutant('state passes: the running state carried in plain float32 (TwoSum\'s compensation term dropped)',
           'fla_mesa/ops/mesa/chunk_h.py',
           'b_lo = (b_p - (b_h - b_z)) + (b_y - b_z)',
           'b_lo = 0 * b_z',
           ['tests/ops/test_long_states.py'], 'state_pass and ieee-1.0'),
    Mutant("state passes: the decay's rounding error left out of the compensation term",
           'fla_mesa/ops/mesa/chunk_h.py',
           'b_lo = tl.fma(b_h, b_d, -b_p) + b_lo * b_d',
           'b_lo = b_lo * b_d',
           ['tests/ops/test_long_states.py'], 'state_pass and 0.9999'),
    Mutant('PyTorch path: the running state carried in plain float32 (TwoSum\'s compensation term dropped)',
           'fla_mesa/ops/mesa/chunk_torch.py',
           'lo = (p - (h - z)) + (y - z)',
           'lo = 0 * z',
           ['tests/ops/test_long_states.py'], 'pytorch_path'),
    Mutant("layer: Λ without its lower bound",
           'fla_mesa/layers/mesa_net.py',
           'return (F.softplus(self.lambda_params.float()) + self.lambda_lower_bound)',
           'return (F.softplus(self.lambda_params.float()))',
           ['tests/layers/test_mesa_net_layer.py'], 'matches_float64_reference and default'),
    Mutant("op: the backward given g for the forward's g_cum (the cumulative log-decay not saved)",
           'fla_mesa/ops/mesa/chunk.py',
           "ctx.save_for_backward(x, k, v, kw.get('g_cum', g), beta,",
           "ctx.save_for_backward(x, k, v, g, beta,",
           ['tests/ops/test_chunk.py'], 'fp32_matches and triton'),
    Mutant("recurrent kernel's own L2 norm: the streamed H's key columns left unrounded (16-bit inputs)",
           'fla_mesa/ops/mesa/fused_recurrent.py',
           'b_kc = round_to(b_kc * b_rk, K_ROUND)',
           'b_kc = b_kc * b_rk',
           ['tests/ops/test_fused_recurrent.py'], 'l2norm_first'),
    Mutant('gate kernel: the gamma cap with the wrong sign',
           'fla_mesa/ops/mesa/gate.py',
           'b_g += _log1p(-C * b_beta * b_beta)',
           'b_g -= _log1p(-C * b_beta * b_beta)',
           ['tests/layers/test_layer_triton.py'], 'matches_float64 and default'),
    Mutant('gate, PyTorch path: the gamma cap with the wrong sign',
           'fla_mesa/ops/mesa/gate.py',
           'g = g + torch.log1p(-(1 - gamma_cap) * beta * beta)',
           'g = g - torch.log1p(-(1 - gamma_cap) * beta * beta)',
           ['tests/layers/test_mesa_net_layer.py'], 'matches_float64_reference and default'),
    Mutant("gate kernel: log σ(a)'s gradient σ(a) instead of σ(-a)",
           'fla_mesa/ops/mesa/gate.py',
           'b_da = b_dg * _sigmoid(-b_a)',
           'b_da = b_dg * _sigmoid(b_a)',
           ['tests/layers/test_layer_triton.py'], 'matches_float64 and default'),
    Mutant("gate kernel: a's gradient stored unrounded (a bf16 store truncates under the interpreter)",
           'fla_mesa/ops/mesa/gate.py',
           'tl.store(da + o, round_to(b_da, DA_ROUND).to(da.dtype.element_ty), mask=m)',
           'tl.store(da + o, b_da.to(da.dtype.element_ty), mask=m)',
           ['tests/ops/test_gate.py'], 'matches_float64'),
    Mutant('layer: the switch to the chunk kernel at 64 tokens instead of 65',
           'fla_mesa/layers/mesa_net.py',
           'elif q_len <= 64 and not self.training:',
           'elif q_len < 64 and not self.training:',
           ['tests/layers/test_layer_triton.py'], 'switch'),
    Mutant("grads kernel: the shares past a wide config's slices left unwritten",
           'fla_mesa/ops/mesa/chunk_bwd.py',
           'for i_z in range(tl.maximum(NK, NV), NS):',
           'for i_z in range(NS, NS):',
           ['tests/test_gpu_configs.py'], 'wider_config'),
    Mutant("chunk-start factor kernel: Λ left out of M's diagonal",
           'fla_mesa/ops/mesa/factor.py',
           'b_d = tl.where(m_i, b_lamb, 1.)',
           'b_d = tl.where(m_i, 0. * b_lamb, 1.)',
           ['tests/ops/test_chunk_precond.py'], 'forward_hard and 8'),
    Mutant("precondition='auto': the factor kernel counts the chunks it factorises but lists none (all chunk 0)",
           'fla_mesa/ops/mesa/factor.py',
           'tl.store(items + 1 + tl.atomic_add(items, 1), i_n.to(tl.int32))',
           'tl.atomic_add(items, 1)',
           ['tests/ops/test_auto_precond.py'], 'rescues and triton'),
    Mutant("precondition='auto': the map's list (where no factor kernel runs) holds the chunks that do not need it",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'b_f = (tl.load(need + o, mask=o < N, other=0) != 0).to(tl.int32)',
           'b_f = (tl.load(need + o, mask=o < N, other=0) == 0).to(tl.int32)',
           ['tests/ops/test_auto_precond.py'], 'rescue_items'),
    Mutant("precondition='auto': the rescue list's positions off by one (an inclusive scan)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'tl.store(items + 1 + base + tl.cumsum(b_f, 0) - b_f,',
           'tl.store(items + 1 + base + tl.cumsum(b_f, 0),',
           ['tests/ops/test_auto_precond.py'], 'rescue_items'),
    Mutant("precondition='auto': the rescue pass's programs stop one item short",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'for i_w in range(tl.program_id(0), n_items * NR, tl.num_programs(0)):',
           'for i_w in range(tl.program_id(0), n_items * NR - 1, tl.num_programs(0)):',
           ['tests/ops/test_auto_precond.py'], 'rescues and triton'),
    Mutant("precondition='auto': a rescued token's steps without the Jacobi pass's (PyTorch path)",
           'fla_mesa/ops/mesa/chunk_torch.py',
           'total = torch.where(steps < 0, ~steps, steps) + torch.where(more < 0, ~more, more)',
           'total = torch.where(steps < 0, 0 * steps, steps) + torch.where(more < 0, ~more, more)',
           ['tests/ops/test_auto_precond.py'], 'torch and not gradients and not varlen and not skip'),
    Mutant("precondition='auto': the Jacobi pass marks no chunk for the second (the last row's flag only)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'tl.store(need + i_tg * H + i_h, 1, mask=tl.max((m_bad & m_r).to(tl.int32), 0) > 0)',
           'tl.store(need + i_tg * H + i_h, 1, mask=tl.min((m_bad & m_r).to(tl.int32), 0) > 0)',
           ['tests/ops/test_auto_precond.py'], 'marks'),
    Mutant("adjoint's dq in bfloat16: the first pass of 'auto' does not write it",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'flag_unconverged=True, xl=xl, _need=need,',
           'flag_unconverged=True, xl=None, _need=need,',
           ['tests/ops/test_auto_precond.py'], 'skips_jacobi and triton'),
    Mutant("adjoint's dq in bfloat16: the second pass of 'auto' does not write it",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'chunk_mesa_bwd_kernel_cg[grid](b=x, do=do, xl=xl, v=v',
           'chunk_mesa_bwd_kernel_cg[grid](b=x, do=do, xl=xl if not rescue else None, v=v',
           ['tests/ops/test_auto_precond.py'], 'skips_jacobi and triton'),
    Mutant("adjoint of 'auto': the second pass reads dx from the buffer, which holds the first pass's iterate there",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'IS_VARLEN, RESCUE, DO_IS_BF16, FLAG_UNCONVERGED, F_IS_BF16, RESCUE, FIRST, XL,',
           'IS_VARLEN, False, DO_IS_BF16, FLAG_UNCONVERGED, F_IS_BF16, RESCUE, FIRST, XL,',
           ['tests/ops/test_auto_precond.py'], 'triton'),
    Mutant("adjoint's right-hand side: the dx pass in single bf16 products",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'x = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, cu_seqlens, chunk_indices, chunk_size, precision)',
           "x = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, cu_seqlens, chunk_indices, chunk_size, 'bf16')",
           ['tests/ops/test_chunk.py']),
    Mutant("adjoint of 'auto': the chunks that skipped Jacobi not solved again (PyTorch path)",
           'fla_mesa/ops/mesa/chunk_torch.py',
           'redo = (steps < 0) | skip',
           'redo = steps < 0',
           ['tests/ops/test_auto_precond.py'], 'skips_jacobi and torch'),
    Mutant("adjoint of 'auto': the rescue kernel reads the unwritten x and steps of a chunk that skipped Jacobi",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'b_whole = (tl.load(need + i_c) + tl.zeros([BR], dtype=tl.int32)) == 2',
           'b_whole = (tl.load(need + i_c) + tl.zeros([BR], dtype=tl.int32)) == 3',
           ['tests/ops/test_auto_precond.py'], 'skips_jacobi and triton'),
    Mutant("stall predictor: the Triton stall kernel does not mark a chunk it scores above the threshold",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'tl.store(need + i_c * H + i_h, 2)',
           'pass',
           ['tests/ops/test_auto_precond.py'], 'routes and triton'),
    Mutant("stall predictor: the Triton stall kernel's threshold 4x too high (routes too few)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'if 2 * tl.sum(tl.sum(b_ff, 1), 0) > STALL_FF2:',
           'if 2 * tl.sum(tl.sum(b_ff, 1), 0) > 4 * STALL_FF2:',
           ['tests/ops/test_auto_precond.py'], 'first_pass_routes'),
    Mutant("stall predictor: the Triton stall kernel counts the diagonal (its row blocks' mask)",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'm_up = m_r[:, None] & m_k[None, :] & (o_r[:, None] < o_k[None, :])',
           'm_up = m_r[:, None] & m_k[None, :] & (o_r[:, None] <= o_k[None, :])',
           ['tests/ops/test_auto_precond.py'], 'first_pass_routes'),
    Mutant("chunk preconditioner: a varlen sequence's last chunk ends at the next sequence's first state",
           'fla_mesa/ops/mesa/kernel_utils.py',
           'last = (i_c + 1 >= NT) | (i_sn != i_s)',
           'last = i_c + 1 >= NT',
           ['tests/ops/test_factor.py', 'tests/ops/test_chunk_precond.py'], 'end_states or keeps_the_steps'),
    Mutant("stall predictor: the Triton stall kernel's a_c at the chunk's last token, not its middle one",
           'fla_mesa/ops/mesa/chunk_cg.py',
           'tl.minimum(i_t * BT + BT // 2, T - 1)',
           'tl.minimum(i_t * BT + BT - 1, T - 1)',
           ['tests/ops/test_auto_precond.py'], 'first_pass_routes'),
    Mutant("stall predictor: the score counts the diagonal too (PyTorch path)",
           'fla_mesa/ops/mesa/precond.py',
           '* u[..., None, :] * off).sum((-2, -1))',
           '* u[..., None, :]).sum((-2, -1))',
           ['tests/ops/test_auto_precond.py'], 'stall_score'),
    Mutant("return_cg_steps='encoded' without the flag in the solve (the unconverged tokens' counts plain)",
           'fla_mesa/ops/mesa/utils.py',
           "wanted = return_cg_unconverged or warn_unconverged or return_cg_steps == 'encoded'",
           "wanted = return_cg_unconverged or warn_unconverged",
           ['tests/ops/test_extreme_inputs.py'], 'encoded'),
    Mutant("MesaNet keeps the plain step counts (return_cg_steps=True): its unconverged tokens lost",
           'fla_mesa/layers/mesa_net.py',
           "return_cg_steps='encoded',",
           "return_cg_steps=True,",
           ['tests/layers/test_mesa_net_layer.py'], 'unconverged'),
    Mutant("chunk-start factor kernel: Λ's first row for every matrix (the row period read in place ignored)",
           'fla_mesa/ops/mesa/factor.py',
           'b_lamb = tl.load(lamb + (i_n % NL) * K + i * BS + o_b, mask=i * BS + o_b < K, other=1.).to(tl.float32)\n'
           '        b_s = ',
           'b_lamb = tl.load(lamb + (i_n % 1) * K + i * BS + o_b, mask=i * BS + o_b < K, other=1.).to(tl.float32)\n'
           '        b_s = ',
           ['tests/ops/test_factor.py'], 'lamb_broadcast'),
    Mutant("the layer's fused conv and L2 norm: the norm's backward without its projection term",
           'fla_mesa/ops/mesa/conv_l2norm.py',
           'b_ds = (b_dy - tl.sum(b_dy * b_y, 1)[:, None] * b_y) * b_r[:, None]',
           'b_ds = b_dy * b_r[:, None]',
           ['tests/ops/test_conv_l2norm.py'], 'matches_fla'),
    Mutant("the layer's fused conv and L2 norm: the conv's taps one token late",
           'fla_mesa/ops/mesa/conv_l2norm.py',
           'o_x = o_t + i_w - (W - 1)',
           'o_x = o_t + i_w - W',
           ['tests/ops/test_conv_l2norm.py'], 'matches_fla'),
    Mutant("the layer's fused conv and L2 norm: no gradient for the conv's weight",
           'fla_mesa/ops/mesa/conv_l2norm.py',
           'return dx, dw, db, None, None',
           'return dx, None, db, None, None',
           ['tests/ops/test_conv_l2norm.py'], 'matches_fla'),
    Mutant("gate kernel: the projection's bias subtracted",
           'fla_mesa/ops/mesa/gate.py',
           'b_x += tl.load(bias + o % H, mask=m, other=0.).to(tl.float32)',
           'b_x -= tl.load(bias + o % H, mask=m, other=0.).to(tl.float32)',
           ['tests/ops/test_gate.py'], 'column_views'),
    Mutant("fused projections: the weights' gradients from misaligned rows of x",
           'fla_mesa/modules/projections.py',
           "@ x.reshape(-1, x.shape[-1])",
           "@ x.reshape(-1, x.shape[-1]).roll(1, 0)",
           ['tests/modules/test_projections.py'], 'match_separate'),
    Mutant("chunk benchmark: fla's state pass imported by a name fla lacks (its column silently 'n/a')",
           'benchmarks/benchmark_chunk.py',
           'from fla.ops.mesa_net.chunk_h_fwd import chunk_mesa_fwd_h',
           'from fla.ops.mesa_net.chunk_h_fwd import chunk_mesa_fwd_states as chunk_mesa_fwd_h',
           ['tests/test_fla_imports.py'], 'tools'),
]


def export(commit: str, dest: str):
    """The committed tree of `commit` unpacked into `dest` (what CI's fresh clone sees)."""
    archive = subprocess.run(['git', '-C', ROOT, 'archive', commit], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)


def apply(mutant: Mutant, dest: str):
    path = os.path.join(dest, mutant.path)
    with open(path) as f:
        text = f.read()
    count = text.count(mutant.anchor)
    if count != 1:
        raise SystemExit(f"mutant '{mutant.name}': anchor found {count} times in {mutant.path} (must be once): "
                         f"{mutant.anchor!r}")
    with open(path, 'w') as f:
        f.write(text.replace(mutant.anchor, mutant.replacement))


def run_tests(dest: str, tests: list[str], select: str | None) -> tuple[bool, float, str]:
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join([dest, os.environ.get('PYTHONPATH', '')]))
    # the copy must be what gets imported, not the installed (editable) checkout
    probe = 'import fla_mesa, tests.utils; print(fla_mesa.__file__, tests.utils.__file__)'
    where = subprocess.run([sys.executable, '-c', probe],
                           cwd=dest, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(p.startswith(dest) for p in where):
        raise SystemExit(f"the copy in {dest} is not what gets imported: {where}")
    cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-rf', '-p', 'no:cacheprovider', *tests]
    if select:
        cmd += ['-k', select]
    start = time.time()
    result = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    # the first failure's one-line summary (-rf), else pytest's last line
    failed = [line for line in lines if line.startswith('FAILED ')]
    tail = (failed[0] if failed else lines[-1]) if lines else result.stderr[-300:]
    # 0: passed; 1: failed; 5: nothing selected (a filter that no longer matches is an error, not a pass)
    if result.returncode not in (0, 1):
        raise SystemExit(f"pytest exited {result.returncode} for {tests} -k {select!r}: {tail}")
    return result.returncode == 0, time.time() - start, tail


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--commit', default='HEAD')
    parser.add_argument('--only', nargs='*', help='substrings of mutant names to run')
    parser.add_argument('--skip-baseline', action='store_true', help='skip the unmutated run (it passed already)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'mutation_check.md'))
    args = parser.parse_args()
    commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', args.commit], check=True, capture_output=True,
                            text=True).stdout.strip()
    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    ok = True
    with tempfile.TemporaryDirectory(prefix='fla_mesa_mutant_') as tmp:
        clean = os.path.join(tmp, 'clean')
        os.mkdir(clean)
        export(commit, clean)
        # every anchor checked before anything runs
        for m in mutants:
            with open(os.path.join(clean, m.path)) as f:
                if f.read().count(m.anchor) != 1:
                    raise SystemExit(f"mutant '{m.name}': anchor not found exactly once in {m.path}: {m.anchor!r}")
        # the baseline: every mutant's tests pass on the unmutated copy
        groups = [] if args.skip_baseline else sorted({(tuple(m.tests), m.select) for m in mutants},
                                                     key=lambda g: (g[0], g[1] or ''))
        start = time.time()
        for tests, select in groups:
            passed, _, tail = run_tests(clean, list(tests), select)
            if not passed:
                raise SystemExit(f"baseline: {list(tests)} -k {select!r} fails without a mutant: {tail}")
        print(f"baseline: {len(groups)} test selections pass ({time.time() - start:.0f} s)", flush=True)
        rows = []
        for i, m in enumerate(mutants):
            dest = os.path.join(tmp, f'mutant{i}')
            os.mkdir(dest)
            export(commit, dest)
            apply(m, dest)
            passed, seconds, tail = run_tests(dest, m.tests, m.select)
            caught = not passed
            ok &= caught
            print(f"{'caught' if caught else 'MISSED'} ({seconds:.0f} s): {m.name}: {tail}", flush=True)
            rows.append((m, caught, seconds, tail))
    lines = [
        '# Mutation check',
        '',
        f'`scripts/mutation_check.py` on commit {commit[:12]}; {platform.node()}, '
        f'{platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, Python {platform.python_version()}, TRITON_INTERPRET=1; '
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. Each mutant planted alone in a copy of the commit; '
        'caught = its tests fail (the unmutated copy passes them).',
        '',
        '| mutant | file | tests (-k) | result | seconds | first failure |',
        '|---|---|---|---|---|---|',
    ]
    for m, caught, seconds, tail in rows:
        why = tail.replace('|', '/')[:160] if caught else ''
        lines.append(f"| {m.name} | `{m.path}` | {', '.join(t.split('/')[-1] for t in m.tests)} (`{m.select}`) | "
                     f"{'caught' if caught else '**missed**'} | {seconds:.0f} | {why} |")
    lines.append('')
    lines.append(f"{sum(c for _, c, _, _ in rows)} of {len(rows)} caught.")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f"written {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
