"""DenseNet-BC (L=100, k=12) on CIFAR-10, the recipe of Huang et al. 2017 (paper: 4.51% error, C10+).

    python launch.py --config experiments/densenet_bc100_cifar10.py
    python launch.py --config experiments/densenet_bc100_cifar10.py:smoke

SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 64, 300 epochs, lr 0.1 divided by 10 at
epochs 150 and 225, crop + flip augmentation. Expected: 95.49% test accuracy.
Measured: not yet measured.
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = cifar10_config()
    config.model.name = "densenet_bc100"
    config.batch_size = 64
    config.num_epochs = 300
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (150.0, 225.0)
    config.optimizer.decay_rate = 0.1
    return smoke(config) if arg == "smoke" else config
