"""cnnjax.profile: MACs against the published figures, the source notes' arithmetic, and the CLI."""

import json
import subprocess
import sys

import flax.linen as nn
import pytest

from cnnjax import profile

# Published multiply-accumulates at 224x224 (torchvision's model cards and the papers).
PUBLISHED_GMACS = {
    "resnet50": 4.089, "resnet18": 1.814, "vgg16": 15.47, "alexnet": 0.714,
    "densenet121": 2.834, "mobilenet_v2": 0.301, "mobilenet_v1": 0.569, "efficientnet_b0": 0.386,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_macs_within_three_percent_of_published(name):
    result = profile.profile_model(name)
    assert result["flops"] == 2 * result["macs"]
    assert abs(result["macs"] / 1e9 / PUBLISHED_GMACS[name] - 1) < 0.03, result["macs"]
    assert sum(layer["macs"] for layer in result["layers"]) == result["macs"]


class _Stack(nn.Module):
    """Convolutions in sequence, no biases, as the source notes count them."""

    kernels: tuple[tuple[int, int], ...]  # (kernel size, output channels)

    @nn.compact
    def __call__(self, x, train=False):
        for k, c in self.kernels:
            x = nn.Conv(c, (k, k), use_bias=False)(x)
        return x


@pytest.mark.parametrize("kernels,weights", [
    (((3, 128),), 147_456),                 # one 3x3 conv 128 -> 128
    (((1, 32), (3, 128)), 4_096 + 36_864),  # 1x1 reduction to 32, then 3x3 back to 128
    (((3, 128), (3, 128)), 294_912),        # two stacked 3x3: receptive field 5x5
    (((5, 128),), 409_600),                 # one 5x5
])
def test_source_notes_weight_arithmetic(kernels, weights):
    result = profile.profile_module(_Stack(kernels), (8, 8, 128))
    assert result["params"] == weights
    # With SAME padding every weight is used once per output position.
    assert result["macs"] == weights * 8 * 8


def test_per_layer_table_names_every_conv():
    result = profile.profile_model("lenet5")
    assert [layer["kind"] for layer in result["layers"]].count("Dense") >= 1
    assert result["params"] == sum(layer["params"] for layer in result["layers"])
    assert "MACs" in profile.format_table(result)


def test_cli_json_and_unknown_name():
    out = subprocess.run([sys.executable, "-m", "cnnjax.profile", "lenet5", "--json"],
                         capture_output=True, text=True, check=True)
    payload = json.loads(out.stdout)
    assert payload["params"] == 61_706 and payload["flops"] == 2 * payload["macs"] > 0
    bad = subprocess.run([sys.executable, "-m", "cnnjax.profile", "resnet5"],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "resnet50" in bad.stderr
