"""The compact layout of the optimizer's state and the step's phases as standalone ops on it
(outer-product EMA, damped Cholesky with failure reporting, solve with a cached factor): every
compiled backend, on every device it runs on here, against the torch reference."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
import samples
from conftest import (STEP_TOL as TOL, assert_refuses_block_size, randn, targets,
                      unit_and_pivots)
from mbf_kernels import compact, dispatch, reference
from mbf_kernels.packed import pack_tril

# d = 1, non-powers of two on each side of 8, the hot sizes, Triton's largest (16) and past
# it; N = 0, one partial tile, one whole, more than two, more than one program with a ragged end.
CASES = [(n, d) for d in (1, 2, 4, 9, 10, 16, 27, 33) for n in (0, 1, 7, 16, 37)] + [(70, 9)]
GPU_CASES = [(5000, d) for d in (1, 2, 9, 10, 16, 25, 33, 64)]


def test_compact_round_trip():
    P = randn(37, 45)
    C = compact.to_compact(P)
    assert C.shape == compact.compact_shape(37, 9) == (3, 45, 16)
    assert torch.equal(compact.from_compact(C, 37), P)
    assert torch.equal(C[1, :, 2], P[18])  # block 18 = tile 1, lane 2


@pytest.mark.parametrize("d", [4, 9, 17])
def test_int8_unit_factor_codes_within_its_bounds_and_stays_spd(d):
    """layout.unit_from_factor / factor_from_unit (factor_dtype="int8"): on blocks from well to
    badly conditioned (condition numbers 1 to 1e8) the decoded factor's U is within half a code
    step of U, its pivots within half a bfloat16 ulp, its diagonal positive (so the decoded
    preconditioner is SPD whatever the conditioning); decoding and coding again gives the same
    bytes; a block whose factor is not finite codes U = I."""
    from mbf_kernels.layout import factor_from_unit, unit_factor_rows, unit_from_factor

    n = 48
    g = torch.Generator().manual_seed(d)
    Q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=g, dtype=torch.float64))
    spread = torch.logspace(0, 8, n, dtype=torch.float64)[:, None]  # the condition numbers
    eigen = spread ** -torch.linspace(0, 1, d, dtype=torch.float64) * 3.0
    A = Q @ torch.diag_embed(eigen) @ Q.transpose(1, 2)
    L = torch.linalg.cholesky(A)
    P = compact.factor_from_cholesky(L).float()
    P[-1, 1] = float("nan")  # the last block's factor is not finite
    coded = unit_from_factor(compact.to_compact(P))
    assert coded.dtype == torch.int8 and coded.shape == (3, unit_factor_rows(d), 16)
    decoded = compact.from_compact(factor_from_unit(coded, d), n)
    assert torch.equal(unit_from_factor(compact.to_compact(decoded)), coded)
    U, r = unit_and_pivots(P[:-1])
    U_q, r_q = unit_and_pivots(decoded[:-1])
    scale = U.abs().amax(1, keepdim=True) / 127
    assert ((U_q - U).abs() <= 0.5 * scale * (1 + 2.0 ** -7) + 1e-6 * scale).all()
    assert ((r_q - r).abs() <= 2.0 ** -8 * r).all()
    assert (decoded[:-1].double().view(n - 1, -1)[:, [k * (k + 3) // 2 for k in range(d)]]
            > 0).all()
    assert (unit_and_pivots(decoded[-1:])[0] == 0).all()  # U = I


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", CASES + GPU_CASES)
def test_compact_ops_match_reference(target, n, d, dtype):
    if n > 1000 and target.device != "cuda":
        pytest.skip("large batches run on GPU targets only")
    backend, tol = target.backend, TOL[dtype]
    F, G, beta = samples.compact_outer_ema_(n, d, dtype, target.device)
    if not dispatch.covers(backend, d, step=True):
        return assert_refuses_block_size(
            backend, d, lambda: compact.outer_ema_(F.clone(), G, beta, backend=backend))
    ours = compact.outer_ema_(F.clone(), G, beta, backend=backend)
    ref = compact.outer_ema_(F.clone(), G, beta, backend="torch")
    torch.testing.assert_close(compact.from_compact(ours, n), compact.from_compact(ref, n), **tol)

    factor, info = compact.cholesky_ex(ref, n, 0.05, backend=backend)
    factor_ref, info_ref = compact.cholesky_ex(ref, n, 0.05, backend="torch")
    assert info.dtype == torch.int32 and torch.equal(info, info_ref) and not info.any()
    torch.testing.assert_close(compact.from_compact(factor, n),
                               compact.from_compact(factor_ref, n), **tol)

    B = randn(n, d, dtype=dtype, seed=11).to(target.device)
    X = compact.solve(factor, B, backend=backend)
    torch.testing.assert_close(X, compact.solve(factor_ref, B, backend="torch"), **tol)
    # and it is the solve of the damped curvature itself
    A = mk.packed.unpack_tril(compact.from_compact(ref, n)) + 0.05 * torch.eye(
        d, dtype=dtype, device=target.device)
    if n:
        torch.testing.assert_close(X, torch.linalg.solve(A, B), **tol)


@pytest.mark.parametrize("target", targets())
def test_compact_cholesky_reports_failures(target):
    n, d = 20, 4
    F = torch.eye(d).repeat(n, 1, 1)
    F[3, 2, 2] = -1.0
    F[11, 0, 0] = float("nan")
    factor, info = compact.cholesky_ex(target.to(compact.to_compact(pack_tril(F))), n, 0.0,
                                       backend=target.backend)
    assert info.tolist() == [0] * 3 + [3] + [0] * 7 + [1] + [0] * 8
    rows = compact.from_compact(factor, n)
    assert (rows[[3, 11]] == 0).all() and torch.isfinite(rows).all()


@pytest.mark.parametrize("target", targets())
def test_compact_cholesky_zeroes_each_failing_block_only(target):
    """Indefinite, not finite and singular blocks fail at their pivot and come back zero; every
    other block's factor is the reference's."""
    d, n = 4, 20
    G = randn(n, d + 2, d, dtype=torch.float64, seed=0)
    dense = G.mT @ G / (d + 2)
    dense[3, 2, 2] = -5.0  # indefinite at pivot 3
    dense[7, 0, 0] = float("nan")  # not finite at pivot 1
    dense[11] = 0.0  # singular at damping 0: pivot 1
    F = target.to(compact.to_compact(pack_tril(dense)))
    L, info = compact.cholesky_ex(F, n, 0.0, backend=target.backend)
    L_ref, info_ref = reference.compact_cholesky_ex(F, n, 0.0)
    assert info.cpu().tolist() == info_ref.cpu().tolist()
    assert {i: v for i, v in enumerate(info.tolist()) if v} == {3: 3, 7: 1, 11: 1}
    rows_out = compact.from_compact(L, n)
    assert not rows_out[[3, 7, 11]].any()
    torch.testing.assert_close(rows_out, compact.from_compact(L_ref, n), rtol=1e-12, atol=0)


def test_compact_ops_validate():
    F = torch.zeros(compact.compact_shape(20, 4))
    with pytest.raises(ValueError, match=r"F must have the compact shape \(3, 10, 16\) for 33 blocks"):
        compact.outer_ema_(F, torch.zeros(33, 4), 0.5)  # 2 tiles hold at most 32 blocks
    with pytest.raises(TypeError, match="G has dtype torch.float64 but F has dtype torch.float32"):
        compact.outer_ema_(F, torch.zeros(20, 4, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        compact.outer_ema_(F, torch.zeros(20, 4), 2.0)
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        compact.cholesky_ex(F, 20, -1.0)
    with pytest.raises(ValueError, match="B must have shape"):
        compact.solve(F, torch.zeros(20, 4, 1))
