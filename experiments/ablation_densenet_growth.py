"""Ablation: the DenseNet-BC growth rate k (Huang et al. 2017), one variant per k at fixed depth.

    python launch.py --config experiments/ablation_densenet_growth.py --sweep        # CIFAR-10, GPU
    python launch.py --config experiments/ablation_densenet_growth.py:cpu --sweep    # MNIST, 2 CPU cores
    python launch.py --config experiments/ablation_densenet_growth.py:smoke --sweep  # seconds (tests)

Full size: DenseNet-BC-100 (3 blocks of 16 bottleneck layers, theta = 0.5) on CIFAR-10 with the
paper's recipe (experiments/densenet_bc100_cifar10.py), k = 12, 24, 32, 40, 3 seeds each. The paper
reports k = 12 at L = 100 (4.51% error, 0.8M params) and larger k only at other depths (k = 24,
L = 250: 3.62%; k = 40, L = 190: 3.46%); here depth is held fixed so k is the only change.
CPU size: the same k ratios at a quarter (k = 3, 6, 8, 10) in a DenseNet-BC with 3 blocks of 3
layers, on real MNIST resized to 14x14, 200 Adam steps of 32, one seed. The stem is 2k wide in
every variant (the paper's choice), so every width grows in proportion to k (up to the
transitions' rounding down).
`cnnjax.studies.densenet_growth` adds to report.md: the concatenation arithmetic (k0 + L*k per
block, floor(theta * c) per transition) traced from each variant's real network, params and MACs
against (k/k_min)^2, and test accuracy against params (one point per k).

Expected (Huang et al. 2017): params and MACs grow about as k^2, accuracy rises with k.
Measured: cpu size on a 2-core CPU shared with other jobs, no GPU, fp32, seed 0, 2026-11-22,
    python launch.py --config experiments/ablation_densenet_growth.py:cpu --sweep
10 min 25 s wall, 176 s CPU (four runs on a machine loaded by other jobs). Test accuracy on the
10,000 MNIST test digits after 200 steps (about 0.12 epoch: the nets are far from converged, the
run ranks them), with params and MACs per example:
    k=3   4,955 params    369,202 MACs  74.43%
    k=6  18,484          1,465,492      81.24%
    k=8  32,318          2,597,780      90.18%
    k=10 49,791          4,048,175      92.96%
From k=3 to k=10, params grow 10.0x and MACs 11.0x against (10/3)^2 = 11.1x; accuracy rises
with every step in k (+18.5 points overall; one seed, so no confidence intervals). The traced
widths match k0 + L*k and floor(theta * c) in every block, e.g. k=10: stem 20, block 50,
transition 25, block 55, transition 27 (floor of 27.5), block 57.
"""

from _mnist_study import quick_study_config
from _sizes import check_size
from densenet_bc100_cifar10 import get_config as bc100_config  # experiments/ is on the path

from cnnjax.config import smoke
from cnnjax.sweep import sweep_config

STUDY = "cnnjax.studies.densenet_growth"
PAPER_GROWTH_RATES = (12, 24, 32, 40)
CPU_GROWTH_RATES = (3, 6, 8, 10)  # the paper's values / 4: the same ratios, 16x cheaper convs


def variants(growth_rates: tuple[int, ...]) -> list[dict]:
    """One variant per growth rate, named k<k>."""
    return [{"name": f"k{k}", "model.kwargs.growth_rate": k} for k in growth_rates]


def _gpu_config():
    config = bc100_config()
    config.sweep = sweep_config(variants=variants(PAPER_GROWTH_RATES), seeds=3, baseline="k12",
                                metric="test.accuracy", study=STUDY)
    return config


def _cpu_config():
    config = quick_study_config()
    config.model.name = "densenet_bc100"  # DenseNet-BC, CIFAR stem; block_config set below
    config.model.kwargs.block_config = (3, 3, 3)
    config.sweep = sweep_config(variants=variants(CPU_GROWTH_RATES), seeds=1, baseline="k3",
                                metric="test.accuracy", study=STUDY)
    return config


def _smoke_config():
    config = smoke(_cpu_config())
    config.model.kwargs.block_config = (1, 1)
    config.model.image_size = 8
    config.num_train_steps = 2
    config.sweep.variants = variants((3, 5))  # odd k: the transitions round 1.5k down
    config.sweep.baseline = "k3"
    return config


def get_config(arg: str | None = None):
    sizes = {None: _gpu_config, "cpu": _cpu_config, "smoke": _smoke_config}
    return sizes[check_size(arg, "ablation_densenet_growth")]()
