"""ResNet-18 (torchvision layout, ImageNet stem) on CIFAR-10 at 32x32, SGD + cosine for 200 epochs.

    python launch.py --config experiments/resnet18_cifar10.py
    python launch.py --config experiments/resnet18_cifar10.py:smoke

Common recipe (lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, crop + flip). Expected: about
93-95% with a CIFAR stem (3x3, no max pool); the ImageNet 7x7/2 stem and max pool used here shrink a
32px image 4x first and land lower. Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "resnet18"
    return smoke(config) if arg == "smoke" else config
