"""ResNet-20 on CIFAR-10, the recipe of He et al. 2016, section 4.2 (paper: 8.75% error, 91.25%).

    python launch.py --config experiments/resnet20_cifar10.py
    python launch.py --config experiments/resnet20_cifar10.py:smoke

SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations,
stop at 64k (~164 epochs of 390 steps), 4-pixel pad + random crop + flip, identity (A) shortcuts.
Expected: 91.25% test accuracy. Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "resnet20"
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (
        91.0,
        137.0,
    )  # 32k and 48k steps at 351 steps/epoch (45k images)
    config.optimizer.decay_rate = 0.1
    config.num_epochs = 182  # 64k steps
    return smoke(config) if arg == "smoke" else config
