"""Data sets for ``mbf train``: the handwritten 8x8 digits (shipped with the package), a
generated 32x32 colour shapes set (no download), and CIFAR-10, CIFAR-100 (python pickle format)
and SVHN (.mat) read from files the user already has. Nothing here downloads anything."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Dataset", "DATASETS", "load_dataset", "load_digits", "load_shapes", "load_cifar",
           "load_svhn"]


@dataclass
class Dataset:
    """Images (N, C, H, W) float32 and labels (N,) int64, split into train and test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]


#: The 1,797 8x8 handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test
#: set, CC BY 4.0, as scikit-learn ships it): 64 pixel values 0..16 and the label, per line.
#: Shipped with the package (57 kB) so that the main job and the tests need no extra.
DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 1,797 real 8x8 digit images: (x_train, y_train, x_test, y_test).

    Images are (N, 1, 8, 8) float32 scaled to [0, 1] (the raw values are 0..16); the split is a
    seeded random permutation, the same for every optimizer of a comparison.
    """
    with gzip.open(DIGITS_FILE, "rt") as f:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in f if line.strip()],
                            dtype=torch.int64)
    x = rows[:, :64].to(torch.float32).view(-1, 1, 8, 8) / 16.0
    y = rows[:, 64].contiguous()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# Where each data set's files live under --data-dir: the folder names of the official archives
# (cifar-10-python.tar.gz unpacks to cifar-10-batches-py/), or the files directly in --data-dir.
_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_SVHN = ("svhn", "train_32x32.mat", "test_32x32.mat")


def _find(data_dir: Path, subdir: str, names: list[str], what: str) -> list[Path]:
    for folder in (data_dir / subdir, data_dir):
        paths = [folder / n for n in names]
        if all(p.is_file() for p in paths):
            return paths
    raise FileNotFoundError(
        f"{what} not found under {data_dir}: expected {', '.join(names)} in "
        f"{data_dir / subdir} or in {data_dir} itself (nothing is downloaded; unpack the "
        f"official archive there)")


def _normalise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel standardisation with the training set's mean and std."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_cifar(data_dir: str | Path, num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python pickle batches (uint8 rows of 3x32x32)."""
    if num_classes not in _CIFAR:
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    subdir, train_names, test_names, label_key = _CIFAR[num_classes]
    paths = _find(Path(data_dir), subdir, train_names + test_names, f"CIFAR-{num_classes}")

    def read(batch_paths: list[Path]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for path in batch_paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            if b"data" not in batch or label_key not in batch:
                raise ValueError(f"{path} is not a CIFAR-{num_classes} python batch "
                                 f"(needs keys b'data' and {label_key!r})")
            xs.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(batch[label_key], dtype=torch.int64))
        return torch.cat(xs).float() / 255.0, torch.cat(ys)

    x_train, y_train = read(paths[:len(train_names)])
    x_test, y_test = read(paths[len(train_names):])
    x_train, x_test = _normalise(x_train, x_test)
    return Dataset(f"cifar{num_classes}", x_train, y_train, x_test, y_test, num_classes)


def load_svhn(data_dir: str | Path) -> Dataset:
    """SVHN's cropped digits (train_32x32.mat, test_32x32.mat: X (32, 32, 3, N), y in 1..10
    where 10 stands for the digit 0)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install scipy") from exc
    subdir, train_name, test_name = _SVHN
    paths = _find(Path(data_dir), subdir, [train_name, test_name], "SVHN")

    def read(path: Path) -> tuple[Tensor, Tensor]:
        mat = loadmat(path)
        if "X" not in mat or "y" not in mat:
            raise ValueError(f"{path} is not an SVHN .mat file (needs variables X and y)")
        x = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).float() / 255.0
        y = torch.as_tensor(mat["y"].astype("int64")).reshape(-1) % 10
        return x, y

    x_train, y_train = read(paths[0])
    x_test, y_test = read(paths[1])
    x_train, x_test = _normalise(x_train, x_test)
    return Dataset("svhn", x_train, y_train, x_test, y_test, 10)


def _digits(_data_dir: str | Path | None) -> Dataset:
    return Dataset("digits", *load_digits(), num_classes=10)


#: The shapes' indicator functions on a shape's own coordinates (u, v) in [-1, 1]^2.
_SHAPES = (
    lambda u, v: u * u + v * v < 1,  # disk
    lambda u, v: torch.maximum(u.abs(), v.abs()) < 0.8,  # square
    lambda u, v: (v > -0.5) & (3 ** 0.5 * u + v < 1) & (-(3 ** 0.5) * u + v < 1),  # triangle
    lambda u, v: u.abs() + v.abs() < 1,  # diamond
    lambda u, v: ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1)),  # plus
    lambda u, v: ((u * u + v * v) < 1) & ((u * u + v * v) > 0.36),  # ring
    lambda u, v: ((u - v).abs() < 0.4) & ((u + v).abs() < 1.4)
    | ((u + v).abs() < 0.4) & ((u - v).abs() < 1.4),  # X
    lambda u, v: (u.abs() < 1) & (v.abs() < 0.3),  # horizontal bar
    lambda u, v: (u.abs() < 0.3) & (v.abs() < 1),  # vertical bar
    lambda u, v: (u * u + v * v < 1) & (v > 0),  # half disk
)


def load_shapes(n_train: int = 8000, n_test: int = 2000, seed: int = 0) -> Dataset:
    """A generated 10-class, 32x32 RGB image set, harder than the 8x8 digits and downloaded
    from nowhere: one of ten shapes (disk, square, triangle, diamond, plus, ring, X, two bars,
    half disk) at a random position, size (radius 5-10 px), rotation (+-30 degrees, so the
    plus and the X stay apart) and colour, on a random colour gradient with pixel noise and a
    small distractor disk. The same ``seed`` gives the same images on every machine (torch's
    CPU generator); standardised per channel like CIFAR."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    labels = torch.randint(0, len(_SHAPES), (n,), generator=g)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    coords = torch.arange(32, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (32, 32)
    cx, cy, radius = uniform(9, 23, 1, 1), uniform(9, 23, 1, 1), uniform(5, 10, 1, 1)
    angle = uniform(-0.52, 0.52, 1, 1)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    mask = torch.zeros(n, 32, 32, dtype=torch.bool)
    for k, shape in enumerate(_SHAPES):
        sel = labels == k
        mask[sel] = shape(u[sel], v[sel])
    tilt = uniform(-1, 1, 3, 1, 1)
    background = uniform(0, 1, 3, 1, 1) + 0.3 * tilt * (x - 16) / 16
    colour = uniform(0, 1, 3, 1, 1)
    bx, by = uniform(3, 29, 1, 1), uniform(3, 29, 1, 1)
    blob = ((x - bx) ** 2 + (y - by) ** 2 < uniform(2, 3, 1, 1) ** 2)[:, None]
    images = torch.where(mask[:, None], colour, background)
    images = torch.where(blob, uniform(0, 1, 3, 1, 1), images)
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    x_train, x_test = _normalise(images[:n_train], images[n_train:])
    return Dataset("shapes", x_train, labels[:n_train], x_test, labels[n_train:], len(_SHAPES))


DATASETS = {
    "digits": _digits,
    "shapes": lambda _data_dir: load_shapes(),
    "cifar10": lambda d: load_cifar(d, 10),
    "cifar100": lambda d: load_cifar(d, 100),
    "svhn": load_svhn,
}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """One of DATASETS; every one but the bundled digits is read from data_dir."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name not in ("digits", "shapes") and data_dir is None:
        raise ValueError(f"data set {name!r} is read from disk: pass --data-dir (the folder "
                         f"holding its files; nothing is downloaded)")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")
    return DATASETS[name](data_dir)
