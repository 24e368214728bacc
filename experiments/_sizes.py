"""The size argument every ablation recipe takes: `get_config()` is the full study (CIFAR-10 on a
GPU), `get_config("cpu")` the version for a 2-core CPU, `get_config("smoke")` a seconds-long run."""

SIZES = ("cpu", "smoke")


def check_size(arg: str | None, experiment: str) -> str | None:
    """`arg`, or a one-line error naming the sizes `experiment` takes."""
    if arg is not None and arg not in SIZES:
        raise ValueError(f"unknown size {arg!r} for {experiment}; use no argument (full size, "
                         f"CIFAR-10 on a GPU) or one of {', '.join(SIZES)}, e.g. "
                         f"--config experiments/{experiment}.py:cpu")
    return arg
