"""Ablation: compound scaling (Tan & Le 2019). A small EfficientNet scaled in depth only, width only,
resolution only, and all three by the compound rule, to 2x, 4x and 8x the baseline's FLOPs; plus a
grid of (alpha, beta, gamma) with alpha * beta^2 * gamma^2 in [1.9, 2.1] trained at phi = 1.

    python launch.py --config experiments/ablation_compound_scaling.py --sweep       # GPU, CIFAR-10
    XLA_FLAGS=--xla_backend_optimization_level=0 \\
      python launch.py --config experiments/ablation_compound_scaling.py:cpu --sweep  # 2-core CPU
    python launch.py --config experiments/ablation_compound_scaling.py:smoke --sweep

Baseline: EfficientNet-B0's first MBConv stages (all seven stride a 32px image down to 1x1) at width
0.5 and depth 0.5 of B0's: stem 16, one block per stage of 8/16/24 channels, head 128. Single
dimensions use the multiplier SOLVED for the FLOPs closest to each target (channels round to
multiples of 8 and repeats round up, so 2^phi or 2^(phi/2) misses from so small a base; the report
gives both); the compound rule uses (1.2, 1.1, 1.15)^phi with phi = log2(target), as the paper does,
so its measured FLOPs ratio is whatever rounding makes of the promised 1.92^phi. The XLA_FLAGS
prefix cuts the compile time of the 17 networks and did not slow the steps in a test here.

Sizes: None = CIFAR-10 at 32px, four stages, 50 epochs, 3 seeds, the 12-triple grid (GPU). "cpu" =
the embedded 8x8 digits upsampled to 16px, three stages, 4 epochs of batch 32 (168 steps), one
seed, a 5-triple grid: 17 runs. "smoke" = baseline and the 2x targets, two stages, 4px, for tests.

Expected: compound scaling at least as accurate as the best single dimension at equal FLOPs (the
paper's Figure 8, ImageNet). On 8x8 digits resolution scaling cannot add information.
Measured (2-core CPU shared with other jobs, no GPU, 2026-11-22, the :cpu command above; test
accuracy on the 270 test digits, one seed): baseline 96.67%. At 2x: width 97.78%, compound 97.78%
(rounding made it 3.15x the FLOPs), resolution 97.41%, depth 97.04%. At 4x: compound 98.15%
(5.79x), depth 97.41%, width 97.41%, resolution 96.30%. At 8x: width 98.15%, compound 97.78%
(6.24x), depth 97.04%, resolution 96.67%. One binomial standard error is 1.09 points, so no rule
is separated from another at this size. Best grid triples (tied at 97.78%): (1, 1.2, 1.15) and the
paper's (1.2, 1.1, 1.15). 17 runs: 757 s CPU (user), 13.1 min wall at load average 3-5; a
first run at load average 11-13 took 36 min wall and gave the same accuracies.
"""

import ml_collections
from _cifar10 import cifar10_config
from _sizes import check_size

from cnnjax.config import base_config, smoke
from cnnjax.models.efficientnet import B0_STAGES
from cnnjax.studies.compound_scaling import PAPER_TRIPLE, constrained_grid, plan_variants
from cnnjax.sweep import sweep_config

# alpha (depth), beta (width), gamma (resolution) axes; only triples with 1.9 <= a*b^2*g^2 <= 2.1 run.
FULL_GRID = ((1.0, 1.2, 1.4, 1.6, 1.8), (1.0, 1.1, 1.2), (1.0, 1.1, 1.15, 1.2, 1.3))
CPU_GRID = ((1.0, 1.2, 1.4, 1.8), (1.0, 1.1, 1.2), (1.0, 1.15, 1.3))


def _baseline(config: ml_collections.ConfigDict, image_size: int, num_stages: int = 3) -> None:
    config.model.name = "efficientnet_b0"
    config.model.kwargs.update(dict(
        stages=B0_STAGES[:num_stages], width_coefficient=0.5, depth_coefficient=0.5, stem_channels=32,
        head_channels=256, dropout_rate=0.1,
        stochastic_depth_rate=0.0,  # short runs: dropping blocks only slows the deep variants
    ))
    config.model.image_size = image_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    check_size(arg, "ablation_compound_scaling")
    if arg is None:
        config = cifar10_config()
        config.num_epochs = 50
        config.optimizer.weight_decay = 1e-5
        _baseline(config, 32, num_stages=4)
        targets, grid, seeds = (2, 4, 8), constrained_grid(*FULL_GRID), 3
    else:
        config = base_config()
        config.data.name = "digits"
        config.model.in_channels = 1
        config.batch_size = 32
        config.num_epochs = 4
        config.optimizer.name = "adam"
        config.optimizer.learning_rate = 3e-3
        config.optimizer.schedule = "cosine"
        config.log_every_steps = 50
        _baseline(config, 16)
        targets, grid, seeds = (2, 4, 8), constrained_grid(*CPU_GRID), 1
    if arg == "smoke":
        config = smoke(config)
        _baseline(config, 4, num_stages=2)  # after smoke(), whose registry overrides it replaces
        targets, grid = (2,), [PAPER_TRIPLE]
    config.sweep = sweep_config(strategy="grid", variants=plan_variants(config, targets, grid=grid),
                                seeds=seeds, baseline="baseline",
                                study="cnnjax.studies.compound_scaling")
    return config
