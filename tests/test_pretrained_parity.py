"""Logits of converted checkpoints against the real torchvision and timm models (skips without them).

Each case saves a randomly initialised torch model (random batch-norm statistics too) to a file,
converts it with `convert_file` and runs both in fp32 eval mode on the same input.
"""

import pytest

from cnnjax.pretrained.verify import TOLERANCE, verify

TORCHVISION = ["alexnet", "vgg11_bn", "googlenet", "resnet50", "densenet121", "mobilenet_v2",
               "efficientnet_b0"]
TIMM = ["resnet50", "densenet121", "efficientnet_b0"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_logits_match_torchvision(name):
    pytest.importorskip("torchvision")
    result = verify(name, source="torchvision", image_size=64)
    assert result["relative_error"] <= TOLERANCE, result
    assert result["logit_scale"] > 1e-3  # the comparison is not between two near-zero outputs


@pytest.mark.parametrize("name", TIMM)
def test_logits_match_timm_from_a_pth_file(name):
    pytest.importorskip("timm")
    result = verify(name, source="timm", image_size=64, file_format="pth")
    assert result["relative_error"] <= TOLERANCE, result
    assert result["logit_scale"] > 1e-3
