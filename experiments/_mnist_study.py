"""Shared recipe of the ablation studies' cpu size (not an experiment): real MNIST, short Adam runs.

The studies import `settled_study_config` or `quick_study_config` and set only their model and sweep.
"""

from cnnjax.config import base_config


def mnist_study_config(*, image_size: int, val_fraction: float, batch_size: int, steps: int):
    """MNIST from ../shared/datasets/mnist at `image_size`, grayscale, Adam 2e-3, `steps` steps."""
    config = base_config()
    config.data.name = "idx"
    config.data.path = "../shared/datasets/mnist"
    config.data.val_fraction = val_fraction
    config.model.image_size = image_size
    config.model.in_channels = 1
    config.batch_size = batch_size
    config.num_epochs = 1
    config.num_train_steps = steps
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    return config


def settled_study_config():
    """The bottleneck and receptive-field studies: 16 px, 5k validation digits, 300 steps of 64.

    16 px costs a third of 28 px's convolutions; 19,200 images are enough to separate the nets in
    minutes on 2 cores. Two 10x drops (at steps 172 and 258 of the 859 an epoch has) settle the
    300th step's weights: at a constant rate the final test accuracy swung by 10 points between seeds.
    """
    config = mnist_study_config(image_size=16, val_fraction=1 / 12, batch_size=64, steps=300)
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (0.2, 0.3)
    config.log_every_steps = 100
    return config


def quick_study_config():
    """The DenseNet and MobileNet studies: 14 px, 1,200 validation digits, 200 steps of 32.

    14 px (MNIST halved) costs a quarter of 28 px's convolutions; evaluating 5k digits would cost as
    much as training. The rate is constant, so stopping early is exact; one checkpoint is kept.
    """
    config = mnist_study_config(image_size=14, val_fraction=0.02, batch_size=32, steps=200)
    config.optimizer.schedule = "constant"
    config.log_every_steps = 50
    config.keep_checkpoints = 1
    return config
