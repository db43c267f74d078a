"""Data sets that need no download: scikit-learn's bundled handwritten digits."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 1,797 real 8x8 digit images: (x_train, y_train, x_test, y_test).

    Images are (N, 1, 8, 8) float32 scaled to [0, 1] (the raw values are 0..16); the split is a
    seeded random permutation, the same for every optimizer of a comparison.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn "
                          "(or the package's [bench] extra)") from exc
    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
