"""ResNet-50 on ImageNet, the recipe of He et al. 2016 (single-crop top-1 about 75-76%).

    python launch.py --config experiments/resnet50_imagenet.py
    python launch.py --config experiments/resnet50_imagenet.py:smoke

SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 divided by 10 every 30 epochs, 90 epochs,
random-resized crop + flip at 224px. Expected: 76.1% top-1 (torchvision's reproduction).
Measured: not yet measured.
"""

from _imagenet import imagenet_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = imagenet_config()
    config.model.name = "resnet50"
    config.num_epochs = 90
    config.optimizer.learning_rate = 0.1
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "step"
    config.optimizer.decay_epochs = (30.0,)
    config.optimizer.decay_rate = 0.1
    return smoke(config) if arg == "smoke" else config
