"""Ablation: stacked 3x3 convolutions against one large kernel with the same receptive field (VGG).

    python launch.py --config experiments/ablation_receptive_field.py:cpu --sweep    # MNIST, 2 CPU cores
    python launch.py --config experiments/ablation_receptive_field.py --sweep        # CIFAR-10, GPU
    python launch.py --config experiments/ablation_receptive_field.py:smoke --sweep  # seconds (tests)

Four variants of the VGG-style `ablation_receptive_field` net, named by their unit: `3x3x2` (two
stacked 3x3) against `5x5`, and `3x3x3` against `7x7` (Simonyan & Zisserman 2014, sec. 2.3).
Everything else (stem, width, stage layout, batch norm, recipe) is the same within a pair.
`cnnjax.studies.receptive_field` adds the notes' arithmetic (294,912 against 409,600 weights at
128 channels) and the pairwise reading to report.md.

Measured (cpu size; 2-core CPU shared with other jobs, no GPU; 2026-11-22):
    python launch.py --config experiments/ablation_receptive_field.py:cpu --sweep
Real MNIST at 16x16, width 24, one unit per stage, 300 steps of 64, Adam 2e-3 with two 10x drops,
2 seeds; 22 min wall (231 s user CPU, load average 10-14). From runs/ablation_receptive_field_cpu_
sweep/report.md, per unit at 128 channels counted on the real modules: 294,912 (3x3x2) against
409,600 (5x5) and 442,368 (3x3x3) against 802,816 (7x7) weights, receptive fields 5, 5, 7, 7 (also
measured from the gradient's support). Trained nets (test accuracy, mean of 2 seeds):
    5x5    43,858 params  4.89M MACs  98.12%     3x3x2  31,906 params  3.54M MACs  97.97%
    7x7    85,330 params  9.54M MACs  98.28%     3x3x3  47,602 params  5.28M MACs  98.09%
The stacks are 1.37x and 1.79x smaller and 0.15 / 0.18 points less accurate, within the noise of
2 seeds (paired p = 0.43 and 0.07). Their forward pass was 1.45x and 2.95x faster in the final
report (1.45-2.1x and 2.0-3.6x over three regenerations of the report on the loaded machine).
"""

from _cifar10 import cifar10_config
from _mnist_study import settled_study_config
from _sizes import check_size

from cnnjax.config import base_config, smoke
from cnnjax.sweep import sweep_config

STUDY = "cnnjax.studies.receptive_field"
UNITS = ("3x3x2", "5x5", "3x3x3", "7x7")


def variants(**net) -> list[dict]:
    """One variant per unit, named by it; `net` holds ReceptiveFieldNet's other arguments."""
    shared = {f"model.kwargs.{key}": value for key, value in net.items()}
    return [{"name": unit, "model.name": "ablation_receptive_field", "model.kwargs.unit": unit,
             **shared} for unit in UNITS]


def _gpu_config():
    config = cifar10_config()
    config.sweep = sweep_config(variants=variants(width=128, stage_sizes=(2, 2, 2)), seeds=3,
                                baseline="5x5", metric="test.accuracy", study=STUDY)
    return config


def _cpu_config():
    config = settled_study_config()
    config.sweep = sweep_config(variants=variants(width=24, stage_sizes=(1, 1, 1)), seeds=2,
                                baseline="5x5", metric="test.accuracy", study=STUDY)
    return config


def _smoke_config():
    config = smoke(base_config())
    config.model.image_size = 8
    config.model.in_channels = 1
    config.num_train_steps = 1
    config.sweep = sweep_config(variants=variants(width=4, stage_sizes=(1,)), seeds=1,
                                baseline="5x5", metric="test.accuracy", study=STUDY)
    return config


def get_config(arg: str | None = None):
    sizes = {None: _gpu_config, "cpu": _cpu_config, "smoke": _smoke_config}
    return sizes[check_size(arg, "ablation_receptive_field")]()
