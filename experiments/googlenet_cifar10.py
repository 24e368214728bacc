"""GoogLeNet (Szegedy et al. 2014, with batch norm) on CIFAR-10 at 32x32, SGD + cosine, 200 epochs.

    python launch.py --config experiments/googlenet_cifar10.py
    python launch.py --config experiments/googlenet_cifar10.py:smoke

The ImageNet stem (7x7/2 conv + two max pools) shrinks 32px images to 4x4 before the inception
blocks, so expect well below the ~95% of CIFAR-adapted stems. Expected: not established.
Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "googlenet"
    return smoke(config) if arg == "smoke" else config
