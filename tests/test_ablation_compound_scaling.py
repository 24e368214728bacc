"""The compound-scaling study: its FLOPs arithmetic against cnnjax.profile, the variant plan, a real
smoke sweep (two variants, one step each) and the report's reading checked against recomputed numbers."""

import json
import math

import pytest

from cnnjax.config import load_config
from cnnjax.models.efficientnet import B0_STAGES, compound_coefficients
from cnnjax.profile import profile_model
from cnnjax.studies import compound_scaling as cs
from cnnjax.sweep import run_sweep

EXPERIMENT = "experiments/ablation_compound_scaling.py"


def _macs(size, width, depth, **kwargs):
    """cnnjax.profile's count (jax.eval_shape trace) for a one-channel, ten-class EfficientNet."""
    return profile_model("efficientnet_b0", image_size=size, in_channels=1, num_classes=10,
                         width_coefficient=width, depth_coefficient=depth, **kwargs)["macs"]


def test_closed_form_macs_equal_the_traced_count():
    # B0 at 224px: 385,814,752 MACs, torchvision's published 0.39 GFLOPS (multiply-adds).
    assert cs.efficientnet_macs(224) == 385_814_752
    for size, width, depth, kwargs in [
        (16, 0.5, 0.5, dict(stages=B0_STAGES[:3], head_channels=256)),
        (13, 0.67, 1.3, dict(stages=B0_STAGES[:4], stem_channels=24, head_channels=100)),
    ]:
        closed = cs.efficientnet_macs(size, width, depth, in_channels=1, num_classes=10, **kwargs)
        assert closed == _macs(size, width, depth, **kwargs)


def test_paper_arithmetic_and_the_constrained_grid():
    assert cs.nominal_factor(*cs.PAPER_TRIPLE) == pytest.approx(1.2 * 1.21 * 1.3225)
    assert round(cs.nominal_factor(*cs.PAPER_TRIPLE), 4) == 1.9203
    assert compound_coefficients(3, *cs.PAPER_TRIPLE) == pytest.approx((1.728, 1.331, 1.520875))
    axes = ((1.0, 1.2, 1.4, 1.8), (1.0, 1.1, 1.2), (1.0, 1.15, 1.3))
    brute = [(a, b, g) for a in axes[0] for b in axes[1] for g in axes[2]
             if 1.9 <= a * b * b * g * g <= 2.1]
    assert cs.constrained_grid(*axes) == brute and cs.PAPER_TRIPLE in brute and len(brute) == 5
    with pytest.raises(ValueError, match=">= 1"):
        cs.constrained_grid((0.9,), (1.0,), (1.0,))


def test_cpu_plan_solves_each_dimension_to_its_target():
    config, _ = load_config(f"{EXPERIMENT}:cpu")
    variants = {v["name"]: v for v in config.sweep.variants}
    assert len(variants) == 17 and config.sweep.study == "cnnjax.studies.compound_scaling"
    assert variants["baseline"][cs.SIZE] == 16 and variants["compound_8x_a1.20_b1.10_g1.15"][
        cs.DEPTH] == pytest.approx(0.5 * 1.2**3)
    assert cs.parse_name("grid_a1.40_b1.20_g1.00") == {"rule": "grid", "target": None,
                                                       "triple": (1.4, 1.2, 1.0)}
    # The solved resolution is nearer the 2x target (in log ratio, traced counts) than a pixel less
    # or more; the solved width nearer than 0.05 less or more.
    kwargs = dict(stages=B0_STAGES[:3], head_channels=256)
    base = _macs(16, 0.5, 0.5, **kwargs)

    def miss(size, width):
        return abs(math.log(_macs(size, width, 0.5, **kwargs) / base / 2))

    size = variants["resolution_2x"][cs.SIZE]
    assert miss(size, 0.5) <= min(miss(size - 1, 0.5), miss(size + 1, 0.5))
    width = variants["width_2x"][cs.WIDTH]
    assert miss(16, width) <= min(miss(16, width - 0.025), miss(16, width + 0.025))


def _variant_row(report, name):
    """{column: cell} of one row of the study's variant table."""
    lines = report[report.index("### Variants"):].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return dict(zip(cells[0], next(c for c in cells if c[0] == name), strict=True))


@pytest.mark.slow
def test_smoke_sweep_trains_and_appends_the_study(tmp_path):
    config, _ = load_config(f"{EXPERIMENT}:smoke")
    config.num_train_steps = 1
    config.sweep.variants = [v for v in config.sweep.variants
                             if v["name"] in ("baseline", "compound_2x_a1.20_b1.10_g1.15")]
    summary = run_sweep(config, str(tmp_path), print_fn=lambda _: None)
    report = (tmp_path / "report.md").read_text()
    assert "## Compound scaling" in report and "![" in report and "(compound_scaling.png)" in report
    assert (tmp_path / "compound_scaling.png").stat().st_size > 10_000
    assert "alpha * beta^2 * gamma^2 = 1.2 * 1.1^2 * 1.15^2 = 1.9203" in report
    for row in summary["rows"]:
        results = json.loads((tmp_path / "trials" / row["variant"] / "seed_0" / "results.json")
                             .read_text())
        cells = _variant_row(report, row["variant"].rsplit("_", 1)[0])
        assert int(cells["MACs"].replace(",", "")) == results["macs"]  # the trainer's own count
        assert cells["test accuracy"] == f"{100 * results['test']['accuracy']:.2f}%"
    assert "equals the traced count for 2 of 2 variants" in report


def test_reading_follows_the_recorded_accuracies(tmp_path):
    config, _ = load_config(f"{EXPERIMENT}:smoke")
    assert [v["name"] for v in config.sweep.variants] == [
        "baseline", "depth_2x", "width_2x", "resolution_2x", "compound_2x_a1.20_b1.10_g1.15"]
    accuracy = {4: 0.80, 5: 0.85}  # by input side: resolution and compound variants score 0.85

    def recorded(trial, workdir):
        a = accuracy.get(trial.model.image_size, 0.82) + 0.01 * trial.model.kwargs.width_coefficient
        return {"test": {"accuracy": a}, "test_details": {"num_examples": 270},
                "best_validation": {"accuracy": a}, "train_seconds": 1.0}

    run_sweep(config, str(tmp_path), train_fn=recorded, print_fn=lambda _: None)
    report = (tmp_path / "report.md").read_text()
    rows = {v["name"]: v for v in config.sweep.variants}
    acc = {n: accuracy.get(v[cs.SIZE], 0.82) + 0.01 * v[cs.WIDTH] for n, v in rows.items()}
    single = max(("depth_2x", "width_2x", "resolution_2x"), key=acc.get)
    diff = 100 * (acc["compound_2x_a1.20_b1.10_g1.15"] - acc[single])
    assert (f"compound rule is {abs(diff):.2f} points {'above' if diff >= 0 else 'below'} the best "
            f"single dimension ({single.split('_')[0]})") in report
    se = 100 * math.sqrt(acc["baseline"] * (1 - acc["baseline"]) / 270)
    assert f"one binomial standard error at the baseline's accuracy is {se:.2f} points" in report
    assert "Best triple: alpha=1.2, beta=1.1, gamma=1.15" in report
    assert "equals the traced count for 5 of 5 variants" in report

    def macs(v):
        return cs.efficientnet_macs(v[cs.SIZE], v[cs.WIDTH], v[cs.DEPTH], stages=B0_STAGES[:2],
                                    head_channels=256, in_channels=1, num_classes=10)

    for name, variant in rows.items():
        cells = _variant_row(report, name)
        assert cells["FLOPs ratio"] == f"{macs(variant) / macs(rows['baseline']):.2f}x"
        assert cells["test accuracy"] == f"{100 * acc[name]:.2f}%"
