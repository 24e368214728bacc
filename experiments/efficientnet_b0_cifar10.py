"""EfficientNet-B0 (Tan & Le 2019) trained from scratch on CIFAR-10 at 32x32, SGD + cosine, 200 epochs.

    python launch.py --config experiments/efficientnet_b0_cifar10.py
    python launch.py --config experiments/efficientnet_b0_cifar10.py:smoke

The paper's CIFAR-10 result (98.1%) is transfer from ImageNet at 224px; from scratch at 32px is far
lower. Weight decay 1e-5 as in the paper, EMA of the weights for eval.
Expected: not established. Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "efficientnet_b0"
    config.optimizer.weight_decay = 1e-5
    config.optimizer.ema_decay = 0.999
    return smoke(config) if arg == "smoke" else config
