"""The receptive-field study: stacked 3x3 against 5x5/7x7 counted on the real units, and a smoke
sweep whose report carries the study section computed from its own measurements."""

import pytest

from cnnjax.config import ConfigError, load_config
from cnnjax.models.ablation import RECEPTIVE_FIELD_UNITS, receptive_field
from cnnjax.studies import receptive_field as study
from cnnjax.studies.bottleneck import arithmetic_section, unit_rows
from cnnjax.sweep import run_sweep

CONFIG = "experiments/ablation_receptive_field.py"


def test_unit_arithmetic_is_counted_on_the_real_units():
    pairs = study.receptive_field_pairs()
    rows = unit_rows(pairs)
    # Simonyan & Zisserman sec. 2.3 at 128 channels, no bias: 2*9*C^2 against 25*C^2, 3*9*C^2 / 49*C^2.
    expected = [(409_600, 5, 1), (294_912, 5, 2), (802_816, 7, 1), (442_368, 7, 3)]
    got = [(r["counted weights"], r["measured receptive field"], r["ReLUs on that path"])
           for r in rows]
    assert got == expected
    for row, unit in zip(rows, (u for pair in pairs for u in pair.units), strict=True):
        assert row["formula weights"] == row["counted weights"]
        assert row["receptive field"] == receptive_field(unit.path)
        assert row["MACs"] == row["counted weights"] * 32 * 32  # stride 1, 32x32 output
    assert [p.reference for p in pairs] == ["5x5", "7x7"]
    assert [RECEPTIVE_FIELD_UNITS[p.candidate] for p in pairs] == [(3, 3), (3, 3, 3)]
    text = arithmetic_section(rows, pairs)
    assert "409,600 against 294,912 weights, 1.39x (formula and module agree)" in text
    assert "802,816 against 442,368 weights, 1.81x (formula and module agree)" in text


def test_smoke_sweep_writes_the_study_section(tmp_path):
    config, _ = load_config(f"{CONFIG}:smoke")
    # One pair: each smoke run costs seconds of compilation (the suite's budget), and the other
    # pair differs only in its unit, whose arithmetic is tested above.
    config.sweep.variants = [v for v in config.sweep.variants if v["name"] in ("7x7", "3x3x3")]
    config.sweep.baseline = "7x7"
    summary = run_sweep(config, str(tmp_path), print_fn=lambda line: None)
    report = (tmp_path / "report.md").read_text()
    assert "## Receptive field: the source notes' arithmetic" in report
    assert "| 294,912 | 294,912 |" in report and "| 409,600 | 409,600 |" in report
    for png in ("receptive_field_units.png", "receptive_field_pairs.png"):
        assert (tmp_path / png).stat().st_size > 0 and f"]({png})" in report
    rows = {r["variant"].rsplit("_", 1)[0]: r for r in summary["rows"]}
    assert set(rows) == {"7x7", "3x3x3"}
    assert "5x5 or 3x3x2 did not finish" in report
    for large, stack in (("7x7", "3x3x3"),):
        ratio = rows[large]["params"] / rows[stack]["params"]
        assert f"{stack} has {ratio:.2f}x fewer parameters" in report
        diff = 100 * (rows[stack]["accuracy"] - rows[large]["accuracy"])
        side = "more" if diff >= 0 else "less"
        assert f"is {abs(diff):.2f} points {side} accurate" in report
        assert f"| {large} | {rows[large]['params']:,} | {rows[large]['macs']:,} | 1 |" in report


def test_configs_and_unknown_size():
    with pytest.raises(ConfigError, match="use no argument .* or one of cpu, smoke"):
        load_config(f"{CONFIG}:big")
    for size, seeds in ((None, 3), ("cpu", 2)):
        config, _ = load_config(CONFIG + (f":{size}" if size else ""))
        assert [v["name"] for v in config.sweep.variants] == list(RECEPTIVE_FIELD_UNITS)
        assert config.sweep.seeds == seeds and config.sweep.study == "cnnjax.studies.receptive_field"
        # Within the study every variant shares all but its unit.
        shared = [{k: v for k, v in variant.items() if k not in ("name", "model.kwargs.unit")}
                  for variant in config.sweep.variants]
        assert all(s == shared[0] for s in shared)
