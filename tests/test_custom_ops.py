"""The registered torch.ops.mbf_kernels.* ops: schema/fake consistency (opcheck) and compile."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from conftest import randn, random_spd

pytestmark = pytest.mark.skipif(
    not mk._extension.AVAILABLE, reason=f"C++ kernels not built: {mk._extension.LOAD_ERROR}"
)


def _samples():
    for dtype in (torch.float32, torch.float64):
        for n, d in ((0, 3), (5, 9), (3, 10)):
            A = random_spd(n, d=d, dtype=dtype)
            yield A, randn(n, d, 2, dtype=dtype), randn(n, 3, d, dtype=dtype)


@pytest.mark.parametrize("sample", list(_samples()), ids=lambda s: f"{tuple(s[0].shape)}-{s[0].dtype}")
def test_opcheck(sample):
    A, B, G = sample
    ops = torch.ops.mbf_kernels
    L = torch.linalg.cholesky(A)
    torch.library.opcheck(ops.cholesky_ex.default, (A, 0.1))
    torch.library.opcheck(ops.cholesky_solve.default, (B, L))
    torch.library.opcheck(ops.solve_spd_ex.default, (A, B, 0.1))
    torch.library.opcheck(ops.inv_spd_ex.default, (A, 0.1))
    torch.library.opcheck(ops.outer_ema_.default, (A.clone(), G, 0.9))


def test_direct_op_call_checks_shapes():
    with pytest.raises(RuntimeError, match=r"A must have shape \(N, d, d\)"):
        torch.ops.mbf_kernels.cholesky_ex(torch.zeros(3, 4), 0.0)
    with pytest.raises(RuntimeError, match="B must have shape"):
        torch.ops.mbf_kernels.solve_spd_ex(torch.eye(3).expand(2, 3, 3).contiguous(),
                                           torch.zeros(2, 4, 1), 0.0)


def test_torch_compile_traces_ops_without_graph_breaks():
    A = random_spd(8, d=9, dtype=torch.float32)
    G = randn(8, 9, dtype=torch.float32)

    def f(A, G):
        L, info = mk.linalg.cholesky_ex(A, 0.1, backend="cpu")
        F = mk.linalg.outer_ema_(A.clone(), G, 0.9, backend="cpu")
        return L * 2, info, F

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for got, want in zip(compiled(A, G), f(A, G)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(0, 3), (5, 9), (37, 10)])
def test_opcheck_compact_ops(n, d, dtype):
    from mbf_kernels import compact
    from mbf_kernels.packed import pack_tril

    ops = torch.ops.mbf_kernels
    F = compact.to_compact(pack_tril(random_spd(n, d=d, dtype=dtype)))
    G = randn(n, d, dtype=dtype)
    factor, _ = ops.compact_cholesky_ex(F, n, 0.1)
    torch.library.opcheck(ops.compact_outer_ema_.default, (F.clone(), G, 0.9))
    torch.library.opcheck(ops.compact_cholesky_ex.default, (F, n, 0.1))
    torch.library.opcheck(ops.compact_solve.default, (factor, G))
    stats = torch.zeros(2, dtype=torch.int64)
    torch.library.opcheck(
        ops.mbf_step_.default,
        (randn(n, d, dtype=dtype), G, torch.zeros(n, d, dtype=dtype), F.clone(), factor.clone(),
         stats, 0.1, 0.9, 0.9, 0.1, 0.0, False, True, False, True),
    )


def test_step_op_names_the_mismatched_argument():
    n, d = 5, 3
    p = torch.zeros(n, d)
    C = torch.zeros(1, 6, 16)
    with pytest.raises(RuntimeError, match="momentum must have dtype Float"):
        torch.ops.mbf_kernels.mbf_step_(p, p.clone(), p.double(), C, C.clone(),
                                        torch.zeros(2, dtype=torch.int64), 0.1, 0.9, 0.9, 0.1,
                                        0.0, False, True, True, True)
