"""Shared CIFAR-10 recipe (not an experiment): 32x32 RGB from TFDS, pad-4 crop + flip, SGD momentum.

Derived configs import `cifar10_config` and override only what their paper changes.
"""

from cnnjax.config import base_config


def cifar10_config():
    config = base_config()
    config.data.name = "cifar10"
    config.data.val_fraction = 0.1  # He et al. 2016 hold out 5k of the 50k training images
    config.data.augment.random_crop_padding = 4
    config.data.augment.hflip = True
    config.model.image_size = 32
    config.model.in_channels = 3
    config.batch_size = 128
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "cosine"
    config.num_epochs = 200
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
