"""The canonical packed lower-triangle layout (MBF_SPEC section 4)."""

from __future__ import annotations

import pytest
import torch

from mbf_kernels import packed
from conftest import random_spd


def test_order_is_row_major_lower_triangle():
    A = torch.arange(16.0).reshape(4, 4)
    # (0,0),(1,0),(1,1),(2,0),(2,1),(2,2),(3,0),...
    assert packed.pack_tril(A).tolist() == [0, 4, 5, 8, 9, 10, 12, 13, 14, 15]


@pytest.mark.parametrize("d", [1, 2, 9, 10, 27, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(d, dtype):
    A = random_spd(2, 5, d=d, dtype=dtype)
    P = packed.pack_tril(A)
    assert P.shape == (2, 5, d * (d + 1) // 2) and P.dtype == dtype
    assert torch.equal(packed.unpack_tril(P), A)
    Lo = packed.unpack_tril(P, symmetric=False)
    assert torch.equal(Lo, torch.tril(A))


def test_sizes():
    assert [packed.tril_size(d) for d in (0, 1, 2, 9, 27)] == [0, 1, 3, 45, 378]
    assert [packed.tril_dim(n) for n in (0, 1, 3, 45, 378)] == [0, 1, 2, 9, 27]
    with pytest.raises(ValueError, match="7 is not a triangular number"):
        packed.tril_dim(7)
    with pytest.raises(ValueError, match="not a triangular number"):
        packed.unpack_tril(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., d, d\)"):
        packed.pack_tril(torch.zeros(3, 4))
