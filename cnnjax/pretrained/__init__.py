"""Pretrained weights: torchvision/timm checkpoints converted to cnnjax variables and orbax checkpoints."""

from cnnjax.pretrained.checkpoint import restore_variables, save_variables
from cnnjax.pretrained.convert import (
    abstract_variables,
    checkpoint_model_kwargs,
    convert_file,
    detect_format,
    from_torch,
    load_state_dict,
    to_torch,
)
from cnnjax.pretrained.names import FAMILIES, torch_key_map

__all__ = [
    "FAMILIES",
    "abstract_variables",
    "checkpoint_model_kwargs",
    "convert_file",
    "detect_format",
    "from_torch",
    "load_state_dict",
    "restore_variables",
    "save_variables",
    "to_torch",
    "torch_key_map",
]
