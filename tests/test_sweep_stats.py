"""Sweep statistics and report tables on known inputs: t-intervals, paired t-tests, Pareto fronts,
and a report that lists only the fields that differ between variants."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from cnnjax.sweep import report, space, stats, sweep_config


def test_mean_ci_matches_the_t_formula():
    mean, half = stats.mean_ci([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    # s = 0.02, n = 3: t_{0.975, 2} = 4.302653 -> 4.302653 * 0.02 / sqrt(3)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert math.isnan(stats.mean_ci([0.5])[1])


def test_paired_test_matches_scipy_and_hand_computation():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.90, 0.91, 0.92]
    result = stats.paired_test(a, b)
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / 2)
    assert result["diff"] == pytest.approx(d.mean())
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(2 * sps.t.sf(abs(t), 3))
    assert result["n"] == 4
    assert math.isnan(stats.paired_test([0.9], [0.8])["p"])
    with pytest.raises(ValueError, match="matched seeds"):
        stats.paired_test([1, 2], [1])


def test_pareto_front():
    cost = [1, 2, 3, 4, 2]
    acc = [0.5, 0.7, 0.6, 0.9, 0.7]
    # (3, 0.6) is beaten by (2, 0.7); the two equal points (2, 0.7) do not dominate each other.
    assert stats.pareto_front(cost, acc) == [True, True, False, True, True]


def _record(seed, acc, status="done"):
    results = {"test": {"accuracy": acc}, "best_validation": {"accuracy": acc}, "params": 10,
               "macs": 100, "train_seconds": 2.0, "images_per_second": 50.0}
    return {"status": status, "seed": seed, "metric": acc, "results": results}


def test_report_lists_only_differing_fields_with_correct_statistics(tmp_path):
    common = {"optimizer.name": "adam", "num_epochs": 5}
    results = [
        ({**common, "optimizer.learning_rate": 0.1, "model.kwargs.act": "relu"},
         [_record(0, 0.90), _record(1, 0.92), _record(2, 0.94)]),
        ({**common, "optimizer.learning_rate": 0.01, "model.kwargs.act": "relu"},
         [_record(0, 0.91), _record(1, 0.95), _record(2, 0.96)]),
    ]
    summary = report.write_report(str(tmp_path), results, sweep_config(seeds=3))
    rows = summary["rows"]
    # learning_rate differs; act, optimizer.name and num_epochs are shared and left out.
    assert "learning_rate" in rows[0] and "act" not in rows[0]
    assert "name" not in rows[0] and "num_epochs" not in rows[0]
    assert rows[0]["accuracy"] == pytest.approx(0.92)
    assert rows[0]["accuracy_ci95"] == pytest.approx(stats.mean_ci([0.90, 0.92, 0.94])[1])
    (comparison,) = summary["comparisons"]
    assert comparison["diff"] == pytest.approx(0.02)
    assert comparison["p"] == pytest.approx(sps.ttest_rel([0.91, 0.95, 0.96], [0.90, 0.92, 0.94]).pvalue)
    assert summary["best"] == space.variant_name(results[1][0])
    for name in ("report.md", "summary.csv", "summary.json", "tradeoffs.png"):
        assert (tmp_path / name).exists()
    header = next(line for line in (tmp_path / "report.md").read_text().splitlines()
                  if line.startswith("| variant"))
    assert "| learning_rate |" in header and "| act |" not in header
    csv_header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "learning_rate" in csv_header and "act" not in csv_header.split(",")


def test_baseline_by_name():
    results = [({"name": "plain", "x": 1}, [_record(0, 0.5)]), ({"name": "res", "x": 2}, [_record(0, 0.6)])]
    assert report.find_baseline(results, "res") == 1
    with pytest.raises(ValueError, match="matches no variant"):
        report.find_baseline(results, "nope")
