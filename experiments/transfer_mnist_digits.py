"""Transfer: LeNet-5 pretrained on MNIST, fine-tuned on scikit-learn's 8x8 digits, against scratch.

    python launch.py --config experiments/transfer_mnist_digits.py --sweep         # 2 CPU cores, minutes
    python launch.py --config experiments/transfer_mnist_digits.py:smoke --sweep   # seconds (tests)

One command runs it all: `sweep.prepare` (cnnjax.studies.transfer:pretrain) first trains the source
run `sweep.pretrain` (LeNet-5 on the real MNIST IDX files, ../shared/datasets/mnist) in
WORKDIR/pretrain, then every variant except `scratch` starts from WORKDIR/pretrain/checkpoints with a
new classifier (`finetune.reinit`), and `cnnjax.studies.transfer` adds its section to report.md.
A rerun resumes whatever is unfinished and skips what is done, the pretraining included. The
fine-tuning budget is deliberately short (3 epochs of the 1,237 training digits), the regime where a
start is worth something. Variants:
- `scratch`: the same net and budget from a random init;
- `frozen_backbone`: C1, C3, C5 frozen (no gradient, no optimizer state), F6 and a new output layer train;
- `full_finetune`: every layer trains at the same learning rate, new output layer;
- `finetune_slow_backbone`: the convolutions train at 0.1x the learning rate (`finetune.lr_groups`).
Without --sweep the command trains the target config once, from scratch.

Expected (written before the run): every pretrained variant above scratch after the short budget,
the full fine-tune highest.
Measured: 2-core CPU shared with other jobs, no GPU, fp32, 2026-11-22; 6 min 17 s wall for
    python launch.py --config experiments/transfer_mnist_digits.py --sweep
- source: LeNet-5 on MNIST, 858 steps (2 epochs, 142 s of training), 98.43% test accuracy;
- target, 63 steps (3 epochs): test accuracy, mean of 3 seeds (95% CI half-width), paired t-test
  against scratch: full_finetune 95.80% (0.53), +2.3 points, p = 0.003; scratch 93.46% (0.53);
  finetune_slow_backbone 90.49% (4.3), -3.0 points, p = 0.12; frozen_backbone 88.02% (2.3),
  -5.4 points, p = 0.014, with 11,014 of 61,706 parameters trained;
- at the first evaluation (step 21, first seed) every pretrained variant is ahead (92.8-93.5%
  validation accuracy against 90.8% from scratch); at the end only full fine-tuning is. Features
  for sharp 28x28 MNIST strokes, frozen or slowed, plausibly fit blurred 8x8 digits upsampled to
  32x32 worse than features the digits shape themselves.
A rerun of the command skips the finished pretraining and trials and rewrites the report (7 s CPU).
"""

from cnnjax.config import base_config, smoke
from cnnjax.sweep import sweep_config

BACKBONE = ("^c1/", "^c3/", "^c5/")  # LeNet-5's convolutions; F6 and the output layer are the head


def variants() -> list[dict]:
    return [
        {"name": "scratch", "init_from": ""},
        {"name": "frozen_backbone", "finetune.freeze": BACKBONE},
        {"name": "full_finetune"},
        {"name": "finetune_slow_backbone",
         "finetune.lr_groups": tuple((pattern, 0.1) for pattern in BACKBONE)},
    ]


def source_config():
    """LeNet-5 on MNIST, two epochs (experiments/lenet5_mnist.py's recipe, shorter)."""
    config = base_config()
    config.model.name = "lenet5"
    config.data.name = "idx"
    config.data.path = "../shared/datasets/mnist"
    config.data.val_fraction = 1 / 12  # 5k of the 60k training digits
    config.batch_size = 128
    config.num_epochs = 2
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 100
    return config


def target_config():
    """LeNet-5 on the embedded digits for 3 epochs; the new classifier starts fresh."""
    config = base_config()
    config.model.name = "lenet5"
    config.data.name = "digits"
    config.batch_size = 64
    config.num_epochs = 3
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 10
    config.keep_checkpoints = 1
    config.finetune.reinit = ("^output/",)
    return config


def get_config(arg: str | None = None):
    if arg not in (None, "smoke"):
        raise ValueError(f"unknown size {arg!r} for transfer_mnist_digits; use :smoke or none")
    config, source = target_config(), source_config()
    if arg == "smoke":  # digits -> digits, three steps each: the same code path in seconds
        config, source = smoke(config), smoke(source)
        config.keep_checkpoints = 1
    config.sweep = sweep_config(variants=variants(), seeds=1 if arg else 3, baseline="scratch",
                                metric="test.accuracy", prepare="cnnjax.studies.transfer:pretrain",
                                study="cnnjax.studies.transfer")
    config.sweep.pretrain = source
    return config
