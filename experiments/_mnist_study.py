"""Shared recipe of the ablation studies' cpu size (not an experiment): real MNIST, short Adam runs.

The studies import `mnist_study_config` and set only their schedule, model and sweep.
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
