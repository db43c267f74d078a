"""One list of sample inputs per op (extension-cpp's pattern): the correctness tests, the
opcheck tests and the torch.compile tests all build their arguments here, in each op's flat
signature (the one ``torch.ops.mbf_kernels.*`` and every backend module take)."""

from __future__ import annotations

import torch

from conftest import randn, random_spd
from mbf_kernels import compact, reference
from mbf_kernels.packed import pack_tril

#: The dense linalg ops' (n, d) cases for opcheck and compile: empty, a hot size, a ragged one.
OPCHECK_CASES = ((0, 3), (5, 9), (3, 10))
#: The compact ops' (n, d) cases: empty, one partial tile, more than two tiles.
COMPACT_OPCHECK_CASES = ((0, 3), (5, 9), (37, 10))


def cholesky_ex(n, d, dtype, device="cpu", *, damping=0.05, seed=0):
    return random_spd(n, d=d, dtype=dtype, seed=seed).to(device), damping


def cholesky_solve(n, d, dtype, device="cpu", *, k=2, seed=0):
    L64 = torch.linalg.cholesky(random_spd(n, d=d, seed=seed))
    return randn(n, d, k, dtype=dtype).to(device), L64.to(dtype).to(device)


def solve_spd_ex(n, d, dtype, device="cpu", *, k=2, damping=0.01, seed=0):
    A = random_spd(n, d=d, dtype=dtype, seed=seed).to(device)
    return A, randn(n, d, k, dtype=dtype).to(device), damping


def inv_spd_ex(n, d, dtype, device="cpu", *, damping=0.1, seed=0):
    return random_spd(n, d=d, dtype=dtype, seed=seed).to(device), damping


def outer_ema_(n, d, dtype, device="cpu", *, S=3, beta=0.9, seed=5):
    F = random_spd(n, d=d, dtype=dtype, seed=seed).to(device)
    return F, randn(n, S, d, dtype=dtype).to(device), beta


def compact_outer_ema_(n, d, dtype, device="cpu", *, beta=0.8, seed=9):
    F = compact.to_compact(pack_tril(random_spd(n, d=d, dtype=dtype, seed=seed))).to(device)
    return F, randn(n, d, dtype=dtype, seed=10).to(device), beta


def compact_cholesky_ex(n, d, dtype, device="cpu", *, damping=0.05, seed=9):
    F, _, _ = compact_outer_ema_(n, d, dtype, device, seed=seed)
    return F, n, damping


def compact_solve(n, d, dtype, device="cpu", *, seed=9):
    F, n, damping = compact_cholesky_ex(n, d, dtype, device, seed=seed)
    factor, _ = reference.compact_cholesky_ex(F, n, damping)
    return factor, randn(n, d, dtype=dtype, seed=11).to(device)


def mbf_step_(n, d, dtype, device="cpu"):
    """The fused step on one bucket, refresh and refactor on: flat arguments of the C++ op."""
    F, G, _ = compact_outer_ema_(n, d, dtype, device)
    factor, _ = reference.compact_cholesky_ex(F, n, 0.1)
    stats = torch.zeros(2, dtype=torch.int64, device=device)
    return (randn(n, d, dtype=dtype).to(device), G, torch.zeros(n, d, dtype=dtype, device=device),
            F.clone(), factor.clone(), stats, 0.1, 0.9, 0.9, 0.1, 0.0, False, True, False, True)


#: The dense linalg ops by their op name.
LINALG = {"cholesky_ex": cholesky_ex, "cholesky_solve": cholesky_solve,
          "solve_spd_ex": solve_spd_ex, "inv_spd_ex": inv_spd_ex, "outer_ema_": outer_ema_}
#: The compact-layout ops by their op name.
COMPACT = {"compact_outer_ema_": compact_outer_ema_, "compact_cholesky_ex": compact_cholesky_ex,
           "compact_solve": compact_solve}


def bucket_step(dtype, device="cpu"):
    """A bucket of d = 9 blocks from four tensors: W (20, 8) joined to its bias (tails), columns
    3..11 of V (5, 14) (strided rows), R (33, 9), and S (7, 9), which this step leaves out."""
    gen = [randn(20, 8, seed=1), randn(20, seed=2), randn(5, 14, seed=3), randn(33, 9, seed=4),
           randn(7, 9, seed=5)]
    params = [t.to(dtype).to(device) for t in gen]
    grads = [randn(*t.shape, seed=10 + i).to(dtype).to(device) for i, t in enumerate(params)]
    momenta = [torch.zeros_like(t) for t in params]
    tiles = 2 + 1 + 3 + 1
    # tensor, tail, n, offset, width, stride, first tile, flags (different per segment), step
    segments = [0, 1, 20, 0, 8, 8, 0, 7, 1,
                2, -1, 5, 3, 9, 14, 2, 1, 3,
                3, -1, 33, 0, 9, 9, 3, 5, 2]
    return params, grads, momenta, tiles, segments
