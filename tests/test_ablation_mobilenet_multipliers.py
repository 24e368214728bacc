"""The MobileNet width/resolution ablation: Howard et al. 2017's arithmetic traced from the real modules
(Tables 2, 3, 6, 7), and the smoke sweep's report checked against closed-form cost formulas."""

import json
from fractions import Fraction

import pytest

from cnnjax.config import ConfigError, load_config
from cnnjax.models.mobilenet import MOBILENET_V1_BLOCKS
from cnnjax.studies import mobilenet_multipliers as study
from cnnjax.sweep import run_sweep

CONFIG = "experiments/ablation_mobilenet_multipliers.py"


def closed_form_costs(alpha, size, in_channels, classes, blocks=MOBILENET_V1_BLOCKS):
    """(MACs, params) of MobileNetV1 written out layer by layer: widths int(c * alpha), at least 8;
    every stride-2 3x3 conv with padding 1 gives ceil(side / 2); batch norm has 2 params a channel."""
    def width(c):
        return max(8, int(c * alpha))

    side, channels = -(-size // 2), width(32)
    macs, params = side * side * 9 * in_channels * channels, 9 * in_channels * channels + 2 * channels
    for out, stride in blocks:
        side = -(-side // stride)
        macs += side * side * (9 * channels + channels * width(out))
        params += 9 * channels + 2 * channels + channels * width(out) + 2 * width(out)
        channels = width(out)
    return macs + channels * classes, params + channels * classes + classes


def test_table3_standard_against_depthwise_separable_conv():
    rows = study.table3_rows()
    assert [r["MACs (traced)"] for r in rows] == [462_422_016, 52_283_392, 29_578_752, 15_091_200]
    assert [r["weights (traced)"] for r in rows] == [2_359_296, 266_752, 150_912, 150_912]
    assert all(r["MACs (traced)"] == r["MACs (formula)"] for r in rows)
    for r in rows:  # the paper prints these in millions, rounded
        assert abs(r["MACs (traced)"] / 1e6 - r["paper MACs (M)"]) < 0.5
        assert round(r["weights (traced)"] / 1e6, 2) == r["paper params (M)"]
    standard, separable = rows[0]["MACs (traced)"], rows[1]["MACs (traced)"]
    assert Fraction(separable, standard) == Fraction(1, 512) + Fraction(1, 9)  # 1/N + 1/D_K^2


def test_imagenet_sweeps_match_tables_2_6_and_7():
    rows, layer_types = study.imagenet_rows()
    assert [(r["alpha"], r["input"]) for r in rows] == [
        (1.0, 224), (0.75, 224), (0.5, 224), (0.25, 224), (1.0, 192), (1.0, 160), (1.0, 128)]
    for r in rows:
        assert abs(r["MACs"] / 1e6 - r["paper MACs (M)"]) < 1  # the paper rounds or truncates
        assert round(r["params"] / 1e6, 1) == r["paper params (M)"]
        assert (r["MACs"], r["params"]) == closed_form_costs(r["alpha"], r["input"], 3, 1000)
    assert rows[0]["params"] == 4_231_976 and rows[0]["MACs"] == 568_740_352
    shares = {t["type"]: round(t["MACs %"], 2) for t in layer_types}
    assert shares == {"Conv 1x1 (pointwise)": 94.86, "Conv DW 3x3": 3.06, "Conv 3x3 (stem)": 1.91,
                      "Fully connected": 0.18}


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    config, _ = load_config(f"{CONFIG}:smoke")
    workdir = tmp_path_factory.mktemp("mobilenet_multipliers")
    summary = run_sweep(config, str(workdir), print_fn=lambda _: None)
    return config, workdir, summary


def test_smoke_sweep_reports_measured_against_predicted(smoke_sweep):
    config, workdir, summary = smoke_sweep
    report = (workdir / "report.md").read_text()
    assert "## MobileNet width (alpha) and resolution (rho) multipliers" in report
    assert "### The trained variants: the paper's two separate 1-D sweeps" in report
    for png in (study.COST_PNG, study.ACCURACY_PNG):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 0
    data = json.loads((workdir / study.JSON_NAME).read_text())
    trained = data["trained"]
    assert [(r["alpha"], r["input"]) for r in trained] == [(0.5, 14), (0.5, 8)]
    blocks = config.model.kwargs.blocks
    for r in trained:
        assert (r["macs"], r["params"]) == closed_form_costs(r["alpha"], r["input"], 1, 10, blocks)
        assert r["rho"] == r["input"] / 14
        assert r["predicted (alpha rho / ref)^2"] == pytest.approx((r["input"] / 14) ** 2)
    ref, small = trained
    assert small["MACs / ref"] == small["macs"] / ref["macs"] and small["params / ref"] == 1.0
    assert f"MACs fall {ref['macs'] / small['macs']:.2f}x (3.06x predicted)" in data["reading"]
    assert data["reading"] in report


def test_reading_names_the_cheaper_way_to_save_compute():
    def row(alpha, size, macs, params, accuracy):
        return {"alpha": alpha, "rho": size / 28, "input": size, "last map": 1, "macs": macs,
                "params": params, "accuracy": accuracy, "accuracy_ci95": 0.01, "MACs / ref": macs / 1000,
                "predicted (alpha rho / ref)^2": (alpha * size / 28) ** 2}

    rows = [row(1.0, 28, 1000, 100, 0.95), row(0.5, 28, 260, 26, 0.93), row(1.0, 16, 300, 100, 0.90)]
    text = study.reading(rows, pointwise_share=94.9)
    assert "Width alpha 1 -> 0.5: MACs fall 3.85x (4.00x predicted) and parameters 3.85x" in text
    assert "Resolution 28 -> 16 px (rho 0.571): MACs fall 3.33x (3.06x predicted)" in text
    assert "widest gap is alpha=0.5 at 28 px: 26.0% of the reference MACs against 25.0% predicted" in text
    assert "thinning loses less here" in text and "no confidence" not in text
    rows[2] = row(1.0, 16, 400, 100, 0.90)  # 1.54x the thinned variant's MACs: no fair pair
    assert "differ 1.54x in MACs), so the two multipliers are not compared" in study.reading(rows, 94.9)


def test_configs_for_each_size():
    full, _ = load_config(CONFIG)
    assert full.model.name == "mobilenet_v1" and full.data.name == "cifar10"
    sizes = [(v["model.kwargs.width_multiplier"], v["model.image_size"]) for v in full.sweep.variants]
    assert sizes == [(1.0, 32), (0.75, 32), (0.5, 32), (0.25, 32), (1.0, 27), (1.0, 23), (1.0, 18)]
    cpu, _ = load_config(f"{CONFIG}:cpu")
    assert [v["model.image_size"] for v in cpu.sweep.variants] == [14, 14, 14, 14, 12, 10, 8]
    with pytest.raises(ConfigError, match="unknown size 'tiny'.*cpu, smoke"):
        load_config(f"{CONFIG}:tiny")
