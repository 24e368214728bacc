"""The 1x1-bottleneck study: the notes' arithmetic counted on the real blocks, matched ResNet depth,
the pairwise reading computed from measurements, and a smoke sweep that writes the study section."""

import dataclasses
import json

import pytest
from scipy import stats

from cnnjax.config import ConfigError, load_config
from cnnjax.profile import profile_model
from cnnjax.studies import bottleneck
from cnnjax.sweep import run_sweep, space

CONFIG = "experiments/ablation_bottleneck.py"


def test_unit_arithmetic_is_counted_on_the_real_blocks():
    pairs = bottleneck.bottleneck_pairs()
    rows = {r["unit"]: r for r in bottleneck.unit_rows(pairs)}
    # (weights, receptive field) the source notes give: 3x3 128->128 against 1x1 to 32 then 3x3;
    # GoogLeNet 3a without / with reductions; ResNet basic (64 ch) against bottleneck (256 ch).
    expected = {"3x3 128->128": (147_456, 3), "1x1 128->32, 3x3 32->128": (40_960, 3),
                "3a without 1x1 reductions": (393_216, 5), "3a with 1x1 reductions": (163_328, 5),
                "basic 3x3-3x3, 64 ch": (73_728, 5), "bottleneck 1x1-3x3-1x1, 256 ch": (69_632, 3)}
    assert set(rows) == set(expected)
    for label, (weights, field) in expected.items():
        row = rows[label]
        assert row["counted weights"] == row["formula weights"] == weights, label
        height, width, _ = map(int, row["input"].split("x"))
        assert row["MACs"] == weights * height * width  # stride 1: one use per output pixel
        assert row["receptive field"] == row["measured receptive field"] == field, label
    text = bottleneck.arithmetic_section(list(rows.values()), pairs)
    assert "147,456 against 40,960 weights, 3.60x (formula and module agree)" in text
    # The count comes from the module, not the formula: a wrong formula is caught.
    plain, reduced = pairs[2].units
    wrong = dataclasses.replace(pairs[2], units=(dataclasses.replace(plain, terms=((3, 128, 64),)),
                                                 reduced))
    assert "DISAGREE" in bottleneck.arithmetic_section(bottleneck.unit_rows([wrong]), [wrong])


@pytest.mark.parametrize("size, image, layers", [("cpu", 16, 20), ("smoke", 8, 8)])
def test_resnet_pair_has_matched_depth_and_differs_in_the_block(size, image, layers):
    config, _ = load_config(f"{CONFIG}:{size}")
    found = {v["name"]: space.apply_variant(config, v) for v in config.sweep.variants}
    profiles = {name: profile_model(found[name].model.name, image_size=image, num_classes=10,
                                    in_channels=1, **found[name].model.kwargs.to_dict())
                for name in ("resnet_basic", "resnet_bottleneck")}
    # Depth: the weighted layers on the main path (stem, block convolutions, classifier).
    depth = {name: [layer["name"] for layer in p["layers"] if "downsample" not in layer["name"]]
             for name, p in profiles.items()}
    assert len(depth["resnet_basic"]) == len(depth["resnet_bottleneck"]) == layers
    assert not any(name.endswith("conv3") for name in depth["resnet_basic"])
    assert sum(name.endswith("conv3") for name in depth["resnet_bottleneck"]) == (layers - 2) // 3


def _record(seed, accuracy):
    return {"status": "done", "seed": seed, "results": {"test": {"accuracy": accuracy}}}


def test_pair_reading_is_computed_from_the_measurements():
    pair = bottleneck.bottleneck_pairs()[2]
    reference, candidate = [0.90, 0.91, 0.93], [0.905, 0.93, 0.925]
    results = [({"name": "conv_3x3"}, [_record(s, a) for s, a in enumerate(reference)]),
               ({"name": "conv_1x1_3x3"}, [_record(s, a) for s, a in enumerate(candidate)])]
    summary = {"rows": [
        {"variant": space.variant_name({"name": "conv_3x3"}), "params": 1000, "macs": 9000,
         "images_per_second": 50.0},
        {"variant": space.variant_name({"name": "conv_1x1_3x3"}), "params": 400, "macs": 3000,
         "images_per_second": 80.0}]}
    config, _ = load_config(f"{CONFIG}:smoke")
    (m,) = bottleneck.measure_pairs([pair], config, summary, results, throughput=False)
    assert m["params_ratio"] == 2.5 and m["macs_ratio"] == 3.0
    diff = [c - r for c, r in zip(candidate, reference, strict=True)]
    assert m["accuracy_diff_points"] == pytest.approx(100 * sum(diff) / 3)
    assert m["p"] == pytest.approx(stats.ttest_rel(candidate, reference).pvalue)
    assert m["reference"]["train images/s"] == 50.0 and m["candidate"]["accuracy"] == pytest.approx(
        sum(candidate) / 3)
    text = bottleneck.reading([m])
    assert "conv_1x1_3x3 has 2.50x fewer parameters and 3.00x fewer MACs than conv_3x3" in text
    assert f"is {100 * sum(diff) / 3:.2f} points more accurate" in text
    assert f"p = {m['p']:.3g}, not significant at 5%" in text
    (missing,) = bottleneck.measure_pairs([pair], config, summary, results[:1], throughput=False)
    assert "conv_3x3 or conv_1x1_3x3 did not finish" in bottleneck.reading([missing])


def test_smoke_sweep_writes_the_study_section(tmp_path):
    config, _ = load_config(f"{CONFIG}:smoke")
    # One pair: each smoke run costs seconds of compilation; the ResNet pair's nets are built
    # above and every pair's report path is tested with recorded measurements.
    config.sweep.variants = [v for v in config.sweep.variants if v["name"].startswith("conv")]
    summary = run_sweep(config, str(tmp_path), print_fn=lambda line: None)
    report = (tmp_path / "report.md").read_text()
    assert "## 1x1 bottleneck: the source notes' arithmetic" in report
    assert "| 147,456 | 147,456 |" in report and "| 40,960 | 40,960 |" in report
    for png in ("bottleneck_units.png", "bottleneck_pairs.png"):
        assert (tmp_path / png).stat().st_size > 0 and f"]({png})" in report
    rows = {r["variant"].rsplit("_", 1)[0]: r for r in summary["rows"]}
    plain, reduced = rows["conv_3x3"], rows["conv_1x1_3x3"]
    ratios = plain["params"] / reduced["params"], plain["macs"] / reduced["macs"]
    assert (f"conv_1x1_3x3 has {ratios[0]:.2f}x fewer parameters and {ratios[1]:.2f}x fewer MACs"
            in report)
    assert f"| conv_3x3 | {plain['params']:,} | {plain['macs']:,} | 1 |" in report
    assert "inception_naive or inception_1x1 did not finish" in report
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {r["status"] for r in saved["rows"]} == {"done"}


def test_unknown_size_is_a_one_line_error():
    with pytest.raises(ConfigError, match="use no argument .* or one of cpu, smoke"):
        load_config(f"{CONFIG}:gpu")
    config, _ = load_config(CONFIG)
    assert config.data.name == "cifar10" and config.sweep.seeds == 3
    assert [v["name"] for v in config.sweep.variants] == [
        "inception_naive", "inception_1x1", "resnet_basic", "resnet_bottleneck", "conv_3x3",
        "conv_1x1_3x3"]
