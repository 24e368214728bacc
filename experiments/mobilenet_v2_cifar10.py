"""MobileNetV2 (Sandler et al. 2018) on CIFAR-10 at 32x32, SGD + cosine, 200 epochs.

    python launch.py --config experiments/mobilenet_v2_cifar10.py
    python launch.py --config experiments/mobilenet_v2_cifar10.py:smoke

The paper trains only on ImageNet; this keeps its ImageNet stem (stride 2) and weight decay 4e-5.
Expected: not established (CIFAR-adapted strides reach about 94%). Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "mobilenet_v2"
    config.optimizer.weight_decay = 4e-5
    return smoke(config) if arg == "smoke" else config
