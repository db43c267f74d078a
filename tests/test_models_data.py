"""The bundled data set and the paper's models: shapes, and the blocks MBF makes of them."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels.apps import data, models


def test_load_digits_is_real_and_split():
    x, y, xt, yt = data.load_digits()
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) and len(xt) == 359
    assert torch.equal(data.load_digits()[1], y)  # seeded: same split every time


def test_the_shipped_digits_are_scikit_learns():
    """The package ships the digits file so that nothing extra is needed; where scikit-learn is
    installed, its copy gives the same images and labels."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y, xt, yt = data.load_digits(test_fraction=0.0)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert len(xt) == 0
    assert torch.equal(x, torch.tensor(digits.images, dtype=torch.float32)[order, None] / 16.0)
    assert torch.equal(y, torch.tensor(digits.target, dtype=torch.int64)[order])


def test_load_shapes_is_seeded_balanced_and_standardised():
    a, b = data.load_shapes(n_train=600, n_test=200), data.load_shapes(n_train=600, n_test=200)
    assert a.x_train.shape == (600, 3, 32, 32) and a.x_test.shape == (200, 3, 32, 32)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_train, minlength=10)
    assert counts.min() > 30  # every class present, roughly balanced (600 draws of 10)
    mean, std = a.x_train.mean((0, 2, 3)), a.x_train.std((0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-2, rtol=0)
    assert data.load_dataset("shapes").num_classes == 10  # no --data-dir needed


def test_relu_autoencoder_is_the_papers_recipe():
    model = models.DigitsAutoencoder(activation=torch.nn.ReLU)
    kinds = [type(m).__name__ for m in model.net]
    # ReLU hidden layers, a linear code layer (no activation after the 16-wide layer), logits out
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear", "Linear",
                     "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model.net[6].out_features == 16 and model.net[-1].out_features == 64


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
