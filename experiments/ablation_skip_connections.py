"""Ablation: skip connections. A deep plain CNN against the same CNN with identity shortcuts.

    python launch.py --config experiments/ablation_skip_connections.py:cpu --sweep    # minutes, CPU
    python launch.py --config experiments/ablation_skip_connections.py --sweep        # CIFAR-10, GPU
    python launch.py --config experiments/ablation_skip_connections.py:smoke --sweep  # seconds

He et al. 2016 (fig. 1 and 6): plain-56 has a higher TRAINING error than plain-20 on CIFAR-10
(the degradation problem), and ResNet-56 lower than ResNet-20. Every variant is
`PlainNet(depth, residual)` (cnnjax/models/ablation.py): 3x3 convs at constant width 16 and
resolution with batch norm, He init and ReLU; residual=True adds the input of every pair of layers
before the second activation, so plain and residual nets have exactly the same weights. The study
(cnnjax/studies/skip_connections.py) adds the final training loss/accuracy, training-loss curves
and per-layer gradient norms at init and after training to report.md.

Full size (no arg): CIFAR-10, depths 20 and 56, He et al.'s recipe (SGD 0.1, momentum 0.9, weight
decay 1e-4, lr / 10 at 32k and 48k of 64k steps, crop + flip), 3 seeds. Not yet measured.

cpu: the embedded 8x8 digits at 8x8, depths 8 and 32, batch 64 (21 steps per epoch), SGD 0.1 with
one warm-up epoch and cosine decay, weight decay 1e-4, 10 epochs, one seed.
Measured (2026-11-22, shared 2-core CPU, no GPU, fp32; `python launch.py --config
experiments/ablation_skip_connections.py:cpu --sweep`, 8 min 14 s wall, 2 min 28 s CPU, with other
jobs loading the machine): final training loss (mean of the last epoch's logged steps) / training
accuracy / test accuracy: plain-8 0.0057 / 100% / 98.5%, residual-8 0.0055 / 100% / 99.3%,
plain-32 0.587 / 75.4% / 77.4%, residual-32 0.132 / 98.4% / 96.7%. The degradation shows at this
size: plain-32's training loss is 103x plain-8's; skips cut it 4.4x (at depth 8 they change it by
2%). Without batch norm (Xavier, at init) plain-32's stem gradient norm is 9.0e-8 against 2.4 with
skips; with batch norm it is 10.4 plain against 0.88 residual at init, so here degradation is slow
optimisation, not vanishing gradients. 19,034 params at depth 8, 75,098 at 32, skips or not.
"""

from _cifar10 import cifar10_config
from _sizes import check_size

from cnnjax.config import base_config, smoke
from cnnjax.sweep import sweep_config

STUDY = "cnnjax.studies.skip_connections"


def _variants(depths: tuple[int, ...]) -> list[dict]:
    return [{"name": f"{'residual' if residual else 'plain'}{depth}", "model.kwargs.depth": depth,
             "model.kwargs.residual": residual}
            for depth in depths for residual in (False, True)]


def _plainnet(config):
    config.model.name = "plainnet"
    config.model.kwargs.width = 16
    config.model.kwargs.norm = True
    config.model.kwargs.kernel_init = "he_normal"
    config.model.kwargs.act = "relu"
    return config


def _cpu_config():
    config = _plainnet(base_config())
    config.data.name = "digits"
    config.model.image_size = 8  # PlainNet keeps the resolution: 8x8 keeps depth 56 affordable
    config.model.in_channels = 1
    config.batch_size = 64
    config.num_epochs = 10
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 5  # a dense training curve: it is what the study is about
    config.keep_checkpoints = 1
    return config


def _gpu_config():
    config = _plainnet(cifar10_config())
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_epochs = (91.0, 137.0)  # 32k and 48k steps at 351 steps per epoch
    config.num_epochs = 182
    return config


def get_config(arg: str | None = None):
    check_size(arg, "ablation_skip_connections")
    if arg == "smoke":
        config = smoke(_cpu_config())
        config.num_train_steps = 2
        config.model.kwargs.width = 4
        depths, seeds = (2, 4), 1
    elif arg == "cpu":
        config, depths, seeds = _cpu_config(), (8, 32), 1
    else:
        config, depths, seeds = _gpu_config(), (20, 56), 3
    deep = depths[-1]
    config.sweep = sweep_config(strategy="grid", variants=_variants(depths), seeds=seeds,
                                baseline=f"plain{deep}", study=STUDY)
    return config
