"""The bundled data set and the paper's models: shapes, and the blocks MBF makes of them."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels import data, models


def test_load_digits_is_real_and_split():
    pytest.importorskip("sklearn")
    x, y, xt, yt = data.load_digits()
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) and len(xt) == 359
    assert torch.equal(data.load_digits()[1], y)  # seeded: same split every time


@pytest.mark.parametrize("name, shape, out", [
    ("resnet32", (2, 3, 32, 32), (2, 10)), ("vgg11", (2, 3, 32, 32), (2, 10)),
    ("small_cnn", (2, 1, 8, 8), (2, 10)), ("digits_autoencoder", (2, 1, 8, 8), (2, 64)),
])
def test_models_forward(name, shape, out):
    model = models.MODELS[name]()
    assert model(torch.randn(shape)).shape == out


def test_resnet32_and_vgg16_blocks():
    resnet = models.ResNet32()
    # He et al.'s 0.46M, plus the two 1x1 projection shortcuts (option B).
    assert 0.46e6 < sum(p.numel() for p in resnet.parameters()) < 0.47e6
    rows = mk.MBF.from_model(resnet, backend="torch").block_summary()
    by = {(r["kind"], r["d"]): r["blocks"] for r in rows}
    assert by[("shared", 65)] == 1  # fc 64 + bias
    convs3 = sum(m.weight.shape[0] * m.weight.shape[1] for m in resnet.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert by[("blocks", 9)] == convs3
    vgg = models.vgg16(num_classes=100)
    blocks9 = {(r["kind"], r["d"]): r["blocks"] for r in
               mk.MBF.from_model(vgg, backend="torch").block_summary()}
    assert blocks9[("blocks", 9)] == 1_634_496  # the ~1.6M 3x3 kernels of MBF_SPEC section 1
    assert {k for k in blocks9 if k[0] == "shared"} == {("shared", 513), ("shared", 4097)}
