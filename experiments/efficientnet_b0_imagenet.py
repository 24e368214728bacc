"""EfficientNet-B0 on ImageNet, the recipe of Tan & Le 2019 (paper: 77.1% top-1).

    python launch.py --config experiments/efficientnet_b0_imagenet.py
    python launch.py --config experiments/efficientnet_b0_imagenet.py:smoke

RMSProp (decay 0.9, momentum 0.9, eps 1e-3), lr 0.016 per 256 images decayed by 0.97 every 2.4
epochs, weight decay 1e-5, EMA 0.9999, swish, dropout 0.2, stochastic depth 0.2, 350 epochs.
The paper also uses AutoAugment, which cnnjax does not implement, so expect somewhat less.
Expected: about 77%. Measured: not yet measured.
"""

from _imagenet import imagenet_config

from cnnjax.config import smoke


def get_config(arg: str | None = None):
    config = imagenet_config()
    config.model.name = "efficientnet_b0"
    config.num_epochs = 350
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 0.016
    config.optimizer.rms_decay = 0.9
    config.optimizer.momentum = 0.9
    config.optimizer.eps = 1e-3
    config.optimizer.weight_decay = 1e-5
    config.optimizer.schedule = "exponential"
    config.optimizer.decay_epochs = (2.4,)
    config.optimizer.decay_rate = 0.97
    config.optimizer.warmup_epochs = 5.0
    config.optimizer.ema_decay = 0.9999
    config.loss.label_smoothing = 0.1
    return smoke(config) if arg == "smoke" else config
