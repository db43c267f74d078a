"""The bundled data set and the paper's models: shapes, and the blocks MBF makes of them."""

from __future__ import annotations

import pickle

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels.apps import data, models
from mbf_kernels.apps.data import load_cifar, load_dataset, load_svhn


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
    # The 4096-wide classifier's blocks are too large to keep exact: rank 32 (large_linear="auto").
    assert {k for k in blocks9 if k[0] != "blocks"} == {("lowrank", 513), ("lowrank", 4097)}


# Data readers on tiny files written in each supported format


def _learnable_images(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 32, 32) images whose class sets the brightness of one image row band."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 3, 32, 32), generator=g)
    for i, c in enumerate(y.tolist()):
        band = (c * 32) // classes
        x[i, :, band:band + max(32 // classes, 1)] += 180
    return x.to(torch.uint8), y


def write_cifar(root, classes: int, n_train: int = 20, n_test: int = 10) -> None:
    """The official python-pickle layout: cifar-10-batches-py/data_batch_{1..5} + test_batch,
    or cifar-100-python/train + test, each {b'data': uint8 (n, 3072), b'labels' / b'fine_labels'}."""
    key = b"labels" if classes == 10 else b"fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    x, y = _learnable_images(n_train + n_test, classes, 0)
    data = x.reshape(len(x), -1).numpy()
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    per = n_train // len(train_files)
    for i, name in enumerate(train_files):
        sl = slice(i * per, (i + 1) * per)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data[sl], key: y[sl].tolist()}, f)
    with open(folder / ("test_batch" if classes == 10 else "test"), "wb") as f:
        pickle.dump({b"data": data[n_train:], key: y[n_train:].tolist()}, f)


def write_svhn(root, n_train: int = 20, n_test: int = 10) -> None:
    """SVHN's .mat files: X (32, 32, 3, N) uint8 and y (N, 1) in 1..10 (10 is the digit 0)."""
    scipy_io = pytest.importorskip("scipy.io")
    folder = root / "svhn"
    folder.mkdir(parents=True)
    x, y = _learnable_images(n_train + n_test, 10, 1)
    labels = torch.where(y == 0, torch.tensor(10), y).numpy().reshape(-1, 1)
    X = x.permute(2, 3, 1, 0).numpy()
    scipy_io.savemat(folder / "train_32x32.mat", {"X": X[..., :n_train], "y": labels[:n_train]})
    scipy_io.savemat(folder / "test_32x32.mat", {"X": X[..., n_train:], "y": labels[n_train:]})


# ---------------------------------------------------------------------------------------------
# data readers


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reader(tmp_path, classes):
    write_cifar(tmp_path, classes)
    ds = load_cifar(tmp_path, classes)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    expected_y = torch.arange(30) % classes
    assert torch.equal(ds.y_train, expected_y[:20]) and torch.equal(ds.y_test, expected_y[20:])
    # Standardised per channel with the training set's statistics.
    assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (ds.x_train.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    # The files' pixel order (3 channel planes of 32 rows) is kept: each image's brightest row
    # is its class's band.
    band_start = (expected_y[:20] * 32) // classes
    brightest = ds.x_train.mean(dim=(1, 3)).argmax(dim=1)
    assert ((brightest >= band_start) & (brightest < band_start + max(32 // classes, 1))).all()
    # The folder itself may be passed as well as its parent.
    sub = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    assert torch.equal(load_cifar(tmp_path / sub, classes).y_test, ds.y_test)


def test_svhn_reader_maps_label_10_to_digit_0(tmp_path):
    write_svhn(tmp_path)
    ds = load_svhn(tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.num_classes == 10
    assert torch.equal(ds.y_train, torch.arange(20) % 10)
    assert torch.equal(ds.y_test, torch.arange(20, 30) % 10)


def test_readers_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        load_cifar(tmp_path, 10)
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_svhn(tmp_path)
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_dataset("cifar100")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_dataset("svhn", tmp_path / "nowhere")
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test"):
        with open(tmp_path / "cifar-100-python" / name, "wb") as f:
            pickle.dump({b"data": [], b"labels": []}, f)  # CIFAR-10 keys in a CIFAR-100 file
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar(tmp_path, 100)


# ---------------------------------------------------------------------------------------------
# mbf train
