"""The models of the MBF paper's experiments, sized by their input: ResNet-32 (CIFAR), VGG11 and
VGG16 with their 4096-wide classifiers, and a small CNN for 8x8 digits."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ResNet32", "SmallCNN", "VGG", "DigitsAutoencoder", "vgg11", "vgg16", "MODELS"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet32(nn.Module):
    """He et al.'s CIFAR ResNet with 3 stages of 5 basic blocks (16/32/64 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(5):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with batch norm for 32x32 inputs and the original 4096-wide classifier (whose
    d = 513 and 4097 rows exceed max_block_size: MBF's shared blocks)."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3,
                 width: int = 4096) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for v in _VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, width), nn.ReLU(inplace=True), nn.Linear(width, width),
            nn.ReLU(inplace=True), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg11(num_classes: int = 10, **kw) -> VGG:
    return VGG(11, num_classes, **kw)


def vgg16(num_classes: int = 10, **kw) -> VGG:
    return VGG(16, num_classes, **kw)


class SmallCNN(nn.Module):
    """Two 3x3 conv stages and a small classifier, for 8x8 single-channel digits by default;
    larger images are average-pooled to 4x4 before the classifier (in_channels=3 for
    CIFAR/SVHN), so its 512 -> 64 linear layer is the same for every input size."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(),
                                        nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class DigitsAutoencoder(nn.Module):
    """The paper's deep autoencoders (e.g. 784-1000-500-250-30 and back for MNIST), scaled to
    8x8 digits: 64-256-128-64-16-64-128-256-64, with a linear code layer and output logits
    (binary cross-entropy on them, i.e. a sigmoid output). ``activation`` of the hidden layers:
    sigmoid (the classic deep-autoencoder benchmark, whose mean-image plateau few optimizers
    leave in a short budget) or ReLU (the MBF paper's recipe)."""

    def __init__(self, widths: tuple[int, ...] = (64, 256, 128, 64, 16),
                 activation: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        dims = list(widths) + list(reversed(widths[:-1]))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2 and i != len(widths) - 2:  # linear code layer and output
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


MODELS = {"resnet32": ResNet32, "vgg11": vgg11, "vgg16": vgg16, "small_cnn": SmallCNN,
          "digits_autoencoder": DigitsAutoencoder}
