"""Transfer: ImageNet-pretrained ResNet-50 (torchvision weights) fine-tuned on CIFAR-10, against scratch.

    python -m cnnjax.pretrained convert resnet50 resnet50-11ad3fa6.pth runs/pretrained/resnet50
    python launch.py --config experiments/transfer_resnet50_cifar10.py --sweep         # GPU, 224 px
    python launch.py --config experiments/transfer_resnet50_cifar10.py:32 --sweep      # GPU, 32 px
    python launch.py --config experiments/transfer_resnet50_cifar10.py:smoke --sweep   # seconds

The first command converts torchvision's ImageNet weights once (.pth needs torch; a .safetensors
file needs only numpy); every pretrained variant then starts from runs/pretrained/resnet50
(`init_from`, override with --config.init_from=DIR). CIFAR-10 comes from TFDS (downloaded once).
- Input: by default the 32x32 images are resized to 224x224 (bilinear, `model.image_size=224`), the
  resolution the weights were trained at, and normalised with ImageNet's mean and std as torchvision
  expects. `:32` keeps 32 px (49x fewer MACs); the ImageNet stem (7x7/2 conv, 3x3/2 max pool) then
  leaves a 1x1 map after layer4, and the stem's weights start fresh (`finetune.reinit=("^stem_",)`):
  a CIFAR-style 3x3 stem without the max pool would need a ResNet option the model does not have.
- Head: `finetune.head=(512,)` turns the classifier into fc 2048 -> 512, ReLU, dropout 0.2,
  head_out 512 -> 10. Both layers start fresh (`finetune.strict=False`; the run prints them).
- Variants: `frozen_backbone` trains only fc and head_out (the backbone's parameters and batch-norm
  statistics frozen, no gradient computed through it); `full_finetune` trains everything with the
  backbone at 0.1x the head's learning rate (`finetune.lr_groups`); `scratch` is the same network and
  budget from a random init. SGD with momentum 0.9, lr 0.01 cosine over 10 epochs, batch 128.

Expected: full fine-tuning ahead of the frozen backbone, both far ahead of scratch in 10 epochs
(Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?", compare these three settings).
Measured: not run here (no GPU and no CIFAR-10 download on this machine); the offline transfer study is
experiments/transfer_mnist_digits.py. Its `:smoke` size runs in the tests (digits, small ResNet-50).
"""

from _cifar10 import cifar10_config

from cnnjax.config import smoke
from cnnjax.sweep import sweep_config

BACKBONE = "^(?!fc/|head_)"  # every parameter path except the classifier and the new head
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def variants() -> list[dict]:
    return [
        {"name": "frozen_backbone", "finetune.freeze": (BACKBONE,)},
        {"name": "full_finetune", "finetune.lr_groups": ((BACKBONE, 0.1),)},
        {"name": "scratch", "init_from": ""},
    ]


def get_config(arg: str | None = None):
    if arg not in (None, "32", "smoke"):
        raise ValueError(f"unknown size {arg!r} for transfer_resnet50_cifar10; use :32, :smoke or none")
    config = cifar10_config()
    config.model.name = "resnet50"
    config.model.image_size = 32 if arg == "32" else 224
    config.data.mean, config.data.std = IMAGENET_MEAN, IMAGENET_STD
    config.init_from = "runs/pretrained/resnet50"
    config.finetune.head = (512,)
    config.finetune.head_dropout = 0.2
    config.finetune.strict = False
    if arg == "32":
        config.finetune.reinit = ("^stem_",)
    config.num_epochs = 10
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 1e-4
    config.checkpoint_every_steps = 1000
    config.sweep = sweep_config(variants=variants(), seeds=1, baseline="scratch",
                                metric="test.accuracy", study="cnnjax.studies.transfer")
    if arg == "smoke":  # no converted weights offline: the variants run from random weights
        config = smoke(config)
        config.init_from = ""
        config.finetune.head = (16,)
    return config
