"""Ablation: MobileNet's width multiplier alpha and resolution multiplier rho (Howard et al. 2017).

    python launch.py --config experiments/ablation_mobilenet_multipliers.py --sweep        # CIFAR-10, GPU
    python launch.py --config experiments/ablation_mobilenet_multipliers.py:cpu --sweep    # MNIST, 2 CPU cores
    python launch.py --config experiments/ablation_mobilenet_multipliers.py:smoke --sweep  # seconds (tests)

The paper's two separate 1-D sweeps, not the alpha x rho grid: alpha = 1, 0.75, 0.5, 0.25 at full
resolution (Table 6) and rho = 1, 6/7, 5/7, 4/7 at alpha = 1 (Table 7, 224/192/160/128 px), seven
MobileNetV1 variants. The resolutions scale down in the same proportion: CIFAR-10's 32 px gives
32/27/23/18 px (rounded), MNIST resized to 14 px gives exactly 14/12/10/8 px.
Full size: CIFAR-10, SGD + cosine for 200 epochs (experiments/_cifar10.py), weight decay 4e-5,
3 seeds. CPU size: real MNIST at 14 px, 200 Adam steps of 32, one seed.
`cnnjax.studies.mobilenet_multipliers` adds to report.md: Table 3 (a standard 3x3 conv against the
depthwise separable one, then thinned and shrunk), Table 2 (where MobileNet-224's MACs sit), the
1-D sweeps at 224 px beside Tables 6-7, all traced from the real modules, and for the trained
variants measured MACs and params against alpha^2 and rho^2, with accuracy against MACs.

Expected (Howard et al. 2017, Tables 6-7): MACs fall about as alpha^2 and as rho^2, params as
alpha^2 only (rho leaves them unchanged); accuracy falls smoothly, steeply only at alpha = 0.25.
Measured: cpu size on a 2-core CPU shared with other jobs, no GPU, fp32, seed 0, 2026-11-22,
    python launch.py --config experiments/ablation_mobilenet_multipliers.py:cpu --sweep
19 min 54 s wall, 476 s CPU (seven runs on a machine loaded by other jobs). Test accuracy on the
10,000 MNIST test digits after 200 steps (about 0.12 epoch: far from converged, the run ranks
the variants), MACs per example as a fraction of alpha=1 at 14 px against alpha^2 rho^2:
    alpha=1    14 px  3,216,650 params  4,020,544 MACs  1      (1)      74.88%
    alpha=0.75 14 px  1,823,818         2,283,888       0.568  (0.5625) 64.64%
    alpha=0.5  14 px    823,434         1,034,912       0.257  (0.25)   63.05%
    alpha=0.25 14 px    215,498           273,616       0.068  (0.0625) 37.20%
    alpha=1    12 px  3,216,650         3,802,304       0.946  (0.735)  76.46%
    alpha=1    10 px  3,216,650         3,773,440       0.939  (0.510)  76.59%
    alpha=1     8 px  3,216,650         3,313,024       0.824  (0.327)  71.63%
Width behaves as in Table 6: MACs and params fall about as alpha^2 and accuracy falls with them.
Resolution does not save what rho^2 promises at this scale: MobileNetV1 divides the side by 32,
so from 14 px down to 8 px the deep layers already run on 1x1 maps and only the first layers
shrink (at 224 px the same code gives 0.735/0.511/0.328 against 0.735/0.510/0.327). With one
seed per variant, the 1.6-1.7 point edge of 12 and 10 px over 14 px is no evidence that
shrinking the input helps.
From the real modules (also in report.md): Table 3's 3x3 conv on 14x14x512 -> 512 costs
462,422,016 MACs and 2,359,296 weights, the depthwise separable one 52,283,392 and 266,752
(ratio 0.11306 = 1/512 + 1/9); MobileNet-224 has 4,231,976 params and 568,740,352 MACs (paper:
4.2M, 569M), 94.86% of them in the pointwise convs (paper Table 2: 94.86%).
"""

from _cifar10 import cifar10_config  # experiments/ is on the path while a config loads
from _mnist_study import quick_study_config
from _sizes import check_size

from cnnjax.config import smoke
from cnnjax.sweep import sweep_config

STUDY = "cnnjax.studies.mobilenet_multipliers"
WIDTHS = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS = (6 / 7, 5 / 7, 4 / 7)  # 192, 160 and 128 of 224; rho = 1 is the width sweep's first


def variants(widths: tuple[float, ...], resolutions: tuple[float, ...], base_size: int) -> list[dict]:
    """The width sweep at `base_size`, then the resolution sweep at the first (largest) width."""
    sweep = [{"name": f"alpha{alpha:g}", "model.kwargs.width_multiplier": alpha,
              "model.image_size": base_size} for alpha in widths]
    for rho in resolutions:
        size = int(round(base_size * rho))
        sweep.append({"name": f"rho{size}px", "model.kwargs.width_multiplier": widths[0],
                      "model.image_size": size})
    return sweep


def _gpu_config():
    config = cifar10_config()
    config.model.name = "mobilenet_v1"
    config.optimizer.weight_decay = 4e-5  # the paper uses little weight decay on its thin filters
    config.sweep = sweep_config(variants=variants(WIDTHS, RESOLUTIONS, 32), seeds=3,
                                baseline="alpha1", metric="test.accuracy", study=STUDY)
    return config


def _cpu_config():
    config = quick_study_config()  # 14 px: 14 * 6/7, 5/7 and 4/7 are whole pixels
    config.model.name = "mobilenet_v1"
    config.sweep = sweep_config(variants=variants(WIDTHS, RESOLUTIONS, 14), seeds=1,
                                baseline="alpha1", metric="test.accuracy", study=STUDY)
    return config


def _smoke_config():
    config = smoke(_cpu_config())
    config.model.image_size = 14
    config.model.kwargs.blocks = ((64, 1), (128, 2))  # two of the 13 blocks: a quarter of the compile
    config.num_train_steps = 2
    config.sweep.variants = variants((0.5,), (4 / 7,), 14)  # each run is mostly compile time
    config.sweep.baseline = "alpha0.5"
    return config


def get_config(arg: str | None = None):
    sizes = {None: _gpu_config, "cpu": _cpu_config, "smoke": _smoke_config}
    return sizes[check_size(arg, "ablation_mobilenet_multipliers")]()
