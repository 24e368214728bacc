"""The PyTorch side of `cnnjax.bench --compare-torch`: the same network in torch, timed the same way.

torch is never a dependency of cnnjax; this module is imported only when a comparison is asked for.
torchvision's model is used where torchvision is importable; otherwise hand-written equivalents of
the networks whose torch code is short (LeNet-5 and the CIFAR ResNets) stand in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# registry name -> torchvision.models constructor name (and its extra arguments)
TORCHVISION = {
    "alexnet": ("alexnet", {}), "vgg16": ("vgg16", {}), "vgg16_bn": ("vgg16_bn", {}),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": False}),
    "resnet18": ("resnet18", {}), "resnet34": ("resnet34", {}), "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", {}), "resnet152": ("resnet152", {}),
    "densenet121": ("densenet121", {}), "densenet201": ("densenet201", {}),
    "mobilenet_v2": ("mobilenet_v2", {}), "efficientnet_b0": ("efficientnet_b0", {}),
}
CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
WARMUP_STEPS = 2


class LeNet5(nn.Module):
    """cnnjax.models.lenet.LeNet5 in torch: tanh, average pooling, dense C3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(16, 120, 5), nn.Tanh(), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlockA(nn.Module):
    """CIFAR basic block with the option A (subsample + zero-pad) shortcut, as in cnnjax."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, momentum=0.1, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=0.1, eps=1e-5)
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x
        if self.stride != 1 or self.extra:
            shortcut = nn.functional.pad(x[:, :, ::self.stride, ::self.stride],
                                         (0, 0, 0, 0, 0, self.extra))
        return torch.relu(y + shortcut)


class CifarResNet(nn.Module):
    """cnnjax.models.resnet.CifarResNet (option A shortcuts, width 16) in torch."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3,
                 width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, channels = [], width
        for i in range(3):
            for j in range(blocks_per_stage):
                out = width * 2**i
                layers.append(BasicBlockA(channels, out, 2 if i > 0 and j == 0 else 1))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def build_torch_model(name: str, *, num_classes: int, in_channels: int) -> tuple[nn.Module, str]:
    """(model, where it came from): torchvision when importable, else a hand-written equivalent."""
    if name in TORCHVISION and in_channels == 3:
        try:
            import torchvision
        except ImportError:
            pass
        else:
            builder, kwargs = TORCHVISION[name]
            return getattr(torchvision.models, builder)(num_classes=num_classes, **kwargs), \
                "torchvision"
    if name == "lenet5":
        return LeNet5(num_classes, in_channels), "hand-written"
    if name in CIFAR_RESNET_DEPTHS:
        return CifarResNet(CIFAR_RESNET_DEPTHS[name], num_classes, in_channels), "hand-written"
    raise ValueError(
        f"no PyTorch equivalent of {name!r} here: install torchvision (for "
        f"{', '.join(sorted(TORCHVISION))}) or drop --compare-torch"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, steps: int, repeats: int) -> list[float]:
    per_step = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def _one_mode(model: nn.Module, mode: str, x, y, device, precision: str, steps: int,
              repeats: int) -> dict[str, Any]:
    """Train (SGD momentum 0.9, lr 0.1, cross-entropy) and eval throughput of one execution mode."""
    net = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    autocast = precision == "bf16"

    def train_once():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(net(x).float(), y)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def eval_once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return net(x)

    model.train()
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):  # the first call compiles under torch.compile
        train_once()
    _sync(device)
    out = {"warmup_seconds": time.perf_counter() - start}
    train = _time(train_once, device, steps, repeats)
    model.eval()
    for _ in range(WARMUP_STEPS):
        eval_once()
    evaluate = _time(eval_once, device, steps, repeats)
    batch = x.shape[0]
    return out | {"train_images_per_second": batch / statistics.median(train),
                  "train_step_seconds": statistics.median(train),
                  "eval_images_per_second": batch / statistics.median(evaluate)}


def run_torch_benchmark(
    name: str, *, batch_size: int, image_size: int, in_channels: int, num_classes: int,
    precision: str = "fp32", steps: int = 20, repeats: int = 5,
    modes: Sequence[str] = ("eager", "compile"),
) -> dict[str, Any]:
    """images/s of each mode ("eager", "compile"), flat keys "<mode>_<metric>", plus the best."""
    unknown = set(modes) - {"eager", "compile"}
    if unknown:
        raise ValueError(f"unknown torch modes {sorted(unknown)}; use eager and/or compile")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(batch_size, in_channels, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    result: dict[str, Any] = {"version": torch.__version__, "device": str(device),
                              "threads": torch.get_num_threads()}
    for mode in modes:
        model, result["source"] = build_torch_model(name, num_classes=num_classes,
                                                    in_channels=in_channels)
        model = model.to(device, memory_format=torch.channels_last)
        try:
            numbers = _one_mode(model, mode, x, y, device, precision, steps, repeats)
        except Exception as err:  # noqa: BLE001 - torch.compile fails in many ways; report, don't crash
            result[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        result |= {f"{mode}_{k}": v for k, v in numbers.items()}
    rates = [result[f"{m}_train_images_per_second"] for m in modes
             if f"{m}_train_images_per_second" in result]
    if rates:
        result["best_train_images_per_second"] = max(rates)
    return result


def _augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flip: bool,
             padding: int = 4) -> torch.Tensor:
    """CIFAR augmentation on the device, per example: a random crop of the zero-padded uint8 images
    [B, C, H, W], a random horizontal flip (RGB only), then normalisation; channels_last float."""
    b, c, h, w = images.shape
    device = images.device
    padded = nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (b, 1), device=device) + torch.arange(h, device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1), device=device) + torch.arange(w, device=device)
    rows = torch.arange(b, device=device)[:, None, None, None]
    chans = torch.arange(c, device=device)[None, :, None, None]
    x = padded[rows, chans, top[:, None, :, None], left[:, None, None, :]]
    if flip:
        mirrored = torch.rand(b, device=device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    x = (x.float() / 255 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def run_torch_epoch(
    name: str, *, num_train: int, batch_size: int, image_size: int, in_channels: int,
    num_classes: int, precision: str = "fp32", epochs: int = 2, mode: str = "compile",
) -> dict[str, Any]:
    """Seconds per epoch of `num_train // batch_size` steps with the uint8 training set on the
    device, a fresh permutation per epoch and `_augment` on each batch (what cnnjax.bench_epoch
    compares against). SGD with momentum 0.9 and cross-entropy, as in `_one_mode`."""
    steps = num_train // batch_size
    if steps < 1 or epochs < 1:
        raise ValueError(f"an epoch needs num_train ({num_train}) >= batch_size ({batch_size}), "
                         f"and epochs ({epochs}) >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (num_train, in_channels, image_size, image_size),
                           dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (num_train,), device=device)
    rgb = in_channels == 3
    mean = torch.tensor((0.4914, 0.4822, 0.4465) if rgb else (0.5,), device=device)[:, None, None]
    std = torch.tensor((0.2470, 0.2435, 0.2616) if rgb else (0.25,), device=device)[:, None, None]
    model, source = build_torch_model(name, num_classes=num_classes, in_channels=in_channels)
    model = model.to(device, memory_format=torch.channels_last).train()
    net = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def train_once(idx: torch.Tensor) -> torch.Tensor:
        x = _augment(images[idx], mean, std, flip=rgb)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net(x).float(), labels[idx])
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    train_once(torch.randperm(num_train, device=device)[:batch_size])  # compiles under torch.compile
    _sync(device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(num_train, device=device)
        for step in range(steps):
            loss = train_once(order[step * batch_size:(step + 1) * batch_size])
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"version": torch.__version__, "device": str(device), "source": source, "mode": mode,
            "warmup_seconds": warmup, "epoch_seconds": statistics.median(times),
            "epoch_seconds_all": times, "loss_is_finite": bool(torch.isfinite(loss).item())}
