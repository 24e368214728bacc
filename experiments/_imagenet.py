"""Shared ImageNet (ILSVRC-2012) recipe (not an experiment): TFDS imagenet2012, 224px, crop + flip.

TFDS cannot download ImageNet: put the ILSVRC2012 tars in `data.manual_dir` once, as
`python -m cnnjax.data prepare imagenet2012` explains. Derived configs override what their paper changes.
"""

from cnnjax.config import base_config


def imagenet_config():
    config = base_config()
    config.data.name = "imagenet2012"
    config.data.val_fraction = 0.01  # TFDS's "validation" split is the reported test set
    config.data.augment.random_resized_crop = True
    config.data.augment.hflip = True
    config.data.workers = 8
    config.model.image_size = 224
    config.model.in_channels = 3
    config.batch_size = 256
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5000
    return config
