"""VGG-16 with batch norm on CIFAR-10 at 32x32 (512-unit classifier), SGD + cosine for 200 epochs.

    python launch.py --config experiments/vgg16_cifar10.py
    python launch.py --config experiments/vgg16_cifar10.py:smoke

The 32px image leaves a 1x1x512 map after five pools, so the 4096-unit classifier of Simonyan &
Zisserman 2014 shrinks to 512. Expected: about 93% (widely reproduced for VGG-16-BN on CIFAR-10).
Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "vgg16_bn"
    config.model.kwargs.hidden = 512
    config.optimizer.learning_rate = 0.05
    return smoke(config) if arg == "smoke" else config
