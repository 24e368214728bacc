"""VGG-16 (configuration D) on ImageNet, the recipe of Simonyan & Zisserman 2014.

    python launch.py --config experiments/vgg16_imagenet.py
    python launch.py --config experiments/vgg16_imagenet.py:smoke

SGD momentum 0.9, weight decay 5e-4, batch 256, lr 0.01 divided by 10 three times (here at epochs
30, 50, 65 instead of on plateaus), 74 epochs, dropout 0.5. Expected: paper 27.0% top-1 error at
one scale (73.0%); torchvision 71.6%. Measured: not yet measured.
"""

from _imagenet import imagenet_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = imagenet_config()
    config.model.name = "vgg16"
    config.num_epochs = 74
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (30.0, 50.0, 65.0)
    config.optimizer.decay_rate = 0.1
    return smoke(config) if arg == "smoke" else config
