"""AlexNet (torchvision variant) on ImageNet, the recipe of Krizhevsky et al. 2012.

    python launch.py --config experiments/alexnet_imagenet.py
    python launch.py --config experiments/alexnet_imagenet.py:smoke

SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.01 divided by 10 three times (here at
epochs 30, 60, 80 instead of on plateaus), 90 epochs, dropout 0.5. Expected: 56.5% top-1
(torchvision's single model, single crop). Measured: not yet measured.
"""

from _imagenet import imagenet_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = imagenet_config()
    config.model.name = "alexnet"
    config.batch_size = 128
    config.num_epochs = 90
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (30.0, 60.0, 80.0)
    config.optimizer.decay_rate = 0.1
    return smoke(config) if arg == "smoke" else config
