"""Padding and output-size arithmetic of convolutions and pooling: VALID, SAME, FULL, ints, pairs."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from jax import lax

PaddingLike = str | int | Sequence[tuple[int, int]]
PADDINGS = ("FULL", "SAME", "VALID")


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """(value, value) for an int, else the two values (per-axis kernel sizes, strides, dilations)."""
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def explicit_padding(
    padding: PaddingLike, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1
) -> str | list[tuple[int, int]]:
    """Translates 'VALID', 'SAME', 'FULL' or an int into what `lax.conv_general_dilated` accepts.

    FULL pads k-1 zeros on each side (the textbook 'full' convolution), which `lax` has no name for.
    """
    kernel, dil = pair(kernel_size), pair(dilation)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "FULL":
            return [((k - 1) * d, (k - 1) * d) for k, d in zip(kernel, dil, strict=True)]
        if mode in ("SAME", "VALID"):
            return mode
        close = difflib.get_close_matches(mode, PADDINGS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ValueError(f"unknown padding {padding!r}.{hint} Choose one of: {', '.join(PADDINGS)}, "
                         "an int, or (low, high) pairs.")
    if isinstance(padding, int):
        return [(padding, padding)] * len(kernel)
    return [tuple(p) for p in padding]  # type: ignore[misc]


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: PaddingLike = "VALID",
                     dilation: int = 1) -> int:
    """Output length of a convolution or pooling along one axis: floor((n + 2p - k_eff) / s) + 1."""
    k_eff = (kernel - 1) * dilation + 1
    if isinstance(padding, str) and padding.upper() == "SAME":
        return -(-size // stride)  # ceil(n / s), independent of the kernel
    pads = explicit_padding(padding, kernel, dilation)
    low, high = (0, 0) if pads == "VALID" else pads[0]
    return (size + low + high - k_eff) // stride + 1


def pad_pairs(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              padding: Any) -> list[tuple[int, int]]:
    """(low, high) zero padding per spatial axis for 'VALID', 'SAME' or explicit pairs, as lax pads."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return [(0, 0)] * len(spatial)
        return lax.padtype_to_pads(tuple(spatial), tuple(kernel), tuple(strides), "SAME")
    return [tuple(p) for p in padding]  # type: ignore[misc]
