"""Ablation: the 1x1 bottleneck, in three pairs of nets that differ only in their 1x1 reductions.

    python launch.py --config experiments/ablation_bottleneck.py:cpu --sweep    # MNIST, 2 CPU cores
    python launch.py --config experiments/ablation_bottleneck.py --sweep        # CIFAR-10, GPU
    python launch.py --config experiments/ablation_bottleneck.py:smoke --sweep  # seconds (tests)

The pairs (variant names; `cnnjax.studies.bottleneck` adds the arithmetic and the pairwise reading
to report.md):
- `inception_naive` / `inception_1x1`: the small GoogLeNet (`ablation_inception`) without and with
  the 1x1 reductions before its 3x3 and 5x5 branches (the pool projection stays in both).
- `resnet_basic` / `resnet_bottleneck`: ResNets at matched depth, i.e. the same number of weighted
  layers: 9 basic blocks (3, 3, 3) against 6 bottleneck blocks (2, 2, 2), each 18 convolutions +
  stem + classifier = 20 layers, same base width and the same 3x3 widths (the bottleneck block
  expands 4x after its 3x3, He et al. 2016 fig. 5). Built from the registry's `resnet34` (basic
  blocks) and `resnet50` (bottleneck blocks) entries with `stage_sizes` overridden, so both use
  the ImageNet layout (7x7/2 stem, 3x3/2 max pool, projection shortcuts).
- `conv_3x3` / `conv_1x1_3x3`: a VGG-style net (`ablation_bottleneck`) whose units are a plain 3x3
  CxC convolution or a 1x1 down to C/4 followed by the 3x3 back to C.

Measured (cpu size; 2-core CPU shared with other jobs, no GPU; 2026-11-22):
    python launch.py --config experiments/ablation_bottleneck.py:cpu --sweep
Real MNIST at 16x16, 300 steps of 64 (19,200 images), Adam 2e-3 with two 10x drops, 2 seeds;
InceptionNet at its defaults, ResNet base width 16, conv units 32 -> 8 -> 32. 26 min wall (356 s
user CPU; the machine's load average was 10-14). From runs/ablation_bottleneck_cpu_sweep/
report.md, unit arithmetic counted on the real blocks: 147,456 weights for a 3x3 128->128 against
40,960 with a 1x1 reduction to 32 (3.60x); Inception 3a 393,216 against 163,328 (2.41x); ResNet
basic block at 64 ch 73,728 against a 256-ch bottleneck block's 69,632. Trained nets (test accuracy,
mean of 2 seeds; whole-net params and MACs per image):
    inception_naive    87,434 params  8.69M MACs  96.89%   inception_1x1      35,698  4.03M  96.14%
    resnet_basic      272,826         0.68M       95.26%   resnet_bottleneck 220,730  0.57M  94.30%
    conv_3x3           28,522         3.17M       97.10%   conv_1x1_3x3        8,602  0.93M  92.36%
Every 1x1-reduced net is cheaper and (at this short budget) less accurate: -0.74 points (p = 0.06),
-0.96 (p = 0.013) and -4.75 (seeds 91.45% and 93.27%, p = 0.12; its bottleneck is 8 channels).
Forward throughput favoured the reduced nets 1.2-1.9x in the final report, but it moved by up to 2x
between regenerations of the report on the loaded machine (the ResNet pair once came out 1.13x
slower), so only its direction for the Inception and conv pairs is reliable here.
"""

from _cifar10 import cifar10_config
from _mnist_study import settled_study_config
from _sizes import check_size

from cnnjax.config import base_config, smoke
from cnnjax.sweep import sweep_config

STUDY = "cnnjax.studies.bottleneck"


def _kwargs(**kwargs) -> dict:
    return {f"model.kwargs.{key}": value for key, value in kwargs.items()}


def variants(*, inception: dict, resnet: dict, conv: dict,
             resnet_stages: tuple = ((3, 3, 3), (2, 2, 2))) -> list[dict]:
    """The six variants. `inception`, `resnet` and `conv` hold each net's size (constructor
    arguments); `resnet_stages` gives the (basic, bottleneck) stage sizes, with two convolutions
    per basic block and three per bottleneck block the same number of layers."""
    basic, bottleneck = resnet_stages
    return [
        {"name": "inception_naive", "model.name": "ablation_inception",
         **_kwargs(reduce=False, **inception)},
        {"name": "inception_1x1", "model.name": "ablation_inception",
         **_kwargs(reduce=True, **inception)},
        {"name": "resnet_basic", "model.name": "resnet34",
         **_kwargs(stage_sizes=basic, **resnet)},
        {"name": "resnet_bottleneck", "model.name": "resnet50",
         **_kwargs(stage_sizes=bottleneck, **resnet)},
        {"name": "conv_3x3", "model.name": "ablation_bottleneck",
         **_kwargs(bottleneck=False, **conv)},
        {"name": "conv_1x1_3x3", "model.name": "ablation_bottleneck",
         **_kwargs(bottleneck=True, **conv)},
    ]


def _gpu_config():
    config = cifar10_config()
    config.sweep = sweep_config(
        variants=variants(inception={}, resnet={"width": 64},
                          conv={"width": 128, "reduced": 32}), seeds=3,
        baseline="conv_3x3", metric="test.accuracy", study=STUDY)
    return config


def _cpu_config():
    config = settled_study_config()
    config.sweep = sweep_config(
        variants=variants(inception={}, resnet={"width": 16},
                          conv={"width": 32, "reduced": 8}), seeds=2,
        baseline="conv_3x3", metric="test.accuracy", study=STUDY)
    return config


def _smoke_config():
    config = smoke(base_config())
    config.model.image_size = 8
    config.model.in_channels = 1
    config.num_train_steps = 1
    tiny = {"stem_width": 4, "blocks": ((4, 4, 4, 2, 4, 4),)}
    config.sweep = sweep_config(
        variants=variants(inception=tiny, resnet={"width": 4},
                          conv={"width": 8, "reduced": 2, "stage_sizes": (1,)},
                          resnet_stages=((3,), (2,))), seeds=1,
        baseline="conv_3x3", metric="test.accuracy", study=STUDY)
    return config


def get_config(arg: str | None = None):
    sizes = {None: _gpu_config, "cpu": _cpu_config, "smoke": _smoke_config}
    return sizes[check_size(arg, "ablation_bottleneck")]()
