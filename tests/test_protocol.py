"""The evaluation protocol (mergekit_ext/evaluate/protocol): the statistics behind the README's
headline numbers, the selection step and the one grid table. Expected values are worked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mergekit_ext.evaluate.protocol import grids, selection, stats

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# quality-hard.json, test exact match per seed (0, 1, 2): task arithmetic and TSV-M.
TA = [0.60875, 0.596875, 0.660625]
TSV_M = [0.715625, 0.700625, 0.705625]


def test_summary_is_mean_and_sample_std():
    # mean 1.86625 / 3; deviations -0.0133333, -0.0252083, +0.0385417; squares sum 0.00229870;
    # sample variance / 2 = 0.00114935 -> std 0.0339021 (the population std would be 0.0276810).
    result = stats.summary(TA)
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(0.6220833, abs=1e-7)
    assert result["std"] == pytest.approx(0.0339021, abs=1e-7)
    assert f"{result['mean']:.3f} ± {result['std']:.3f}" == "0.622 ± 0.034"
    assert stats.standard_error(TA) == pytest.approx(0.0339021 / math.sqrt(3), abs=1e-7)


def test_summary_small_cases():
    assert stats.summary([0.5, 0.6, 0.7]) == pytest.approx({"mean": 0.6, "std": 0.1, "n": 3})
    assert stats.summary([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    # None and NaN (a failed merge) are left out, not counted as zero.
    assert stats.summary([0.5, None, float("nan"), 0.7]) == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02), "n": 2})
    empty = stats.summary([None])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])


def test_paired_differences_and_t_of_the_headline_method():
    # TSV-M − TA per seed: +0.106875, +0.10375, +0.045; mean 0.0852083, sample std 0.0348565,
    # t = 0.0852083 / (0.0348565 / sqrt 3) = 4.2341: below 4.303 (2 degrees of freedom), so
    # not beyond noise although better on every seed.
    differences = stats.paired_differences(TSV_M, TA)
    assert differences == pytest.approx([0.106875, 0.10375, 0.045])
    assert stats.summary(differences)["std"] == pytest.approx(0.0348565, abs=1e-7)
    assert stats.paired_t(differences) == pytest.approx(4.2341, abs=1e-4)
    assert stats.t_critical(2) == 4.303
    assert stats.beyond_noise(differences) is False


def test_beyond_noise():
    # mean 0.11, std 0.01: t = 0.11 / (0.01 / sqrt 3) = 19.05 > 4.303
    assert stats.paired_t([0.10, 0.11, 0.12]) == pytest.approx(19.0526, abs=1e-4)
    assert stats.beyond_noise([0.10, 0.11, 0.12]) is True
    assert stats.beyond_noise([-0.10, -0.11, -0.12]) is True  # worse beyond noise is beyond noise
    assert stats.beyond_noise([0.05, 0.05, 0.05]) is True  # identical non-zero differences: t infinite
    assert stats.paired_t([0.0, 0.0, 0.0]) == 0.0 and not stats.beyond_noise([0.0, 0.0, 0.0])
    assert stats.beyond_noise([0.3]) is False  # one seed says nothing about noise
    # 4 seeds: mean 0.05, std 0.0408248 -> t = 0.05 / (0.0408248 / 2) = 2.4495 < 3.182
    assert stats.paired_t([0.0, 0.05, 0.05, 0.1]) == pytest.approx(2.4495, abs=1e-4)
    assert stats.beyond_noise([0.0, 0.05, 0.05, 0.1]) is False
    with pytest.raises(ValueError, match="one reference value per seed"):
        stats.paired_differences([0.1, 0.2], [0.1])


def test_versus_reference_counts_seeds_beyond_two_standard_errors():
    # Seed 0: 0.11 / sqrt(0.03² + 0.04²) = 0.11 / 0.05 = 2.2 (> 2); seed 1: 0.10 / 0.05 = 2.0 (not > 2);
    # seed 2: -0.15 / 0.05 = -3.0; seed 3: no standard error.
    result = stats.versus_reference([0.61, 0.60, 0.35, 0.5], [0.5, 0.5, 0.5, 0.5], [0.03, 0.03, 0.03, None], [0.04, 0.04, 0.04, 0.04])
    assert result["differences"] == pytest.approx([0.11, 0.10, -0.15, 0.0])
    assert result["within_seed_z"][:3] == pytest.approx([2.2, 2.0, -3.0])
    assert result["within_seed_z"][3] is None
    assert (result["seeds_better"], result["seeds_worse"]) == (1, 1)
    assert result["summary"]["mean"] == pytest.approx(0.015)
    assert result["beyond_noise"] is False


def test_the_committed_quality_aggregate_is_these_statistics():
    """quality-hard.json's headline entries equal the helper's output on its own per-seed values."""
    agg = json.loads((RESULTS / "quality-hard.json").read_text())
    reference = agg["methods"]["task_arithmetic"]["test"]
    assert reference == pytest.approx(TA)
    for label, entry in agg["methods"].items():
        assert entry["test_mean_std"] == pytest.approx(stats.summary(entry["test"])), label
        if "delta_vs_ta" in entry and label != "task_arithmetic":
            versus = stats.versus_reference(entry["test"], reference)
            assert entry["delta_vs_ta"] == pytest.approx(versus["differences"]), label
            assert entry["delta_vs_ta_mean_std"] == pytest.approx(versus["summary"]), label
            assert entry["beyond_noise"] == versus["beyond_noise"], label


def test_select_takes_the_best_and_the_first_of_ties():
    chosen = selection.select(["a", "b", "c", "d"], [0.5, 0.7, 0.7, None])
    assert (chosen.index, chosen.setting, chosen.score) == (1, "b", 0.7)
    assert chosen.evidence() == {"settings": ["a", "b", "c", "d"], "scores": [0.5, 0.7, 0.7, None], "index": 1, "score": 0.7}
    assert selection.select([1, 2], [None, 0.1]).setting == 2  # a failed setting is never chosen
    # prefer breaks ties before grid order (adarank_bench: the λ nearest its grid's middle)
    grid = [0.3, 0.4, 0.5, 0.6, 0.8]
    assert selection.select(grid, [0.6, 0.7, 0.6, 0.7, 0.7], prefer=lambda v: -abs(v - 0.6)).setting == 0.6
    assert selection.select(grid, [0.6, 0.7, 0.6, 0.7, 0.7]).setting == 0.4
    with pytest.raises(selection.SelectionError, match="no setting"):
        selection.select(["a"], [None])
    with pytest.raises(ValueError, match="2 settings but 1 scores"):
        selection.select(["a", "b"], [0.1])


def test_one_grid_table_serves_every_user():
    from benchmarks import quality
    from mergekit_ext.demo import run as demo
    from mergekit_ext.tune.space import DEFAULT_SPACES

    assert quality.GRIDS is grids.QUALITY_GRIDS["multiple_choice"]
    assert quality.HARD_GRIDS is grids.QUALITY_GRIDS["generation"]
    assert DEFAULT_SPACES is grids.DEFAULT_SPACES
    assert demo.DEMO_GRIDS is grids.DEMO_GRIDS["generation"] and demo.MULTIPLE_CHOICE_GRIDS is grids.DEMO_GRIDS["multiple_choice"]
    # every grid of a method is in its one entry, under a known use
    uses = {"quality", "demo", "tune", "sweep", "adarank_prior", "smol"}
    assert all(set(entry) <= uses for entry in grids.METHOD_GRIDS.values())
    from benchmarks import smol_quality

    assert smol_quality.smol_settings() is grids.SMOL_GRIDS
    assert all(grids.METHOD_GRIDS[method]["smol"] is grid for method, grid in grids.SMOL_GRIDS.items())
    assert grids.quality_grid("task_arithmetic", "generation")[0] == {"weight": 1.0, "lambda": 0.2}
    # a method without an entry tunes its lambda if it has one, else runs once
    assert grids.quality_grid("new_method", "generation", ["lambda"]) == [{"lambda": v} for v in grids.WIDE_LAMBDAS]
    assert grids.quality_grid("new_method", "multiple_choice", ["alpha"]) == [{}]
    assert grids.axes_settings({"k": (1, 2), "lambda": (0.5,)}, {"weight": 1.0}) == [{"weight": 1.0, "k": 1, "lambda": 0.5}, {"weight": 1.0, "k": 2, "lambda": 0.5}]


def test_adarank_tables_state_the_sample_std_of_the_quality_table():
    """The same three task-arithmetic scores print the same ± in the AdaRank and quality tables,
    and every committed AdaRank table is what its JSON renders to today."""
    from benchmarks import adarank_bench

    quality = json.loads((RESULTS / "quality-hard.json").read_text())["methods"]["task_arithmetic"]["test_mean_std"]
    expected = f"{quality['mean']:.3f} ± {quality['std']:.3f}"
    assert expected == "0.622 ± 0.034"
    for name in ("adarank", "adarank-defaults", "adarank-schedule", "adarank-unlabeled"):
        text = adarank_bench.summarise(json.loads((RESULTS / f"{name}.json").read_text()))
        assert (RESULTS / f"{name}.md").read_text() == text + "\n", f"{name}.md: run python benchmarks/adarank_bench.py --render benchmarks/results/{name}.json"
        if name != "adarank-unlabeled":  # the unlabeled runs used other zoos
            row = next(line for line in text.splitlines() if line.startswith("| ta | (base method"))
            assert f"| {expected} |" in row, row


def test_worst_case_defaults_take_each_method_over_the_zoos_that_swept_it():
    """benchmarks/defaults_worst_case.py: a method swept on some zoos only is chosen over those, by its own parameter."""
    from benchmarks.defaults_worst_case import choose

    def zoo(methods):
        return {"base": 0.2, "expert": 0.6, "methods": methods}

    zoos = {
        "a": zoo({"tsv_m": [{"lambda": 1.0, "validation": 0.4}, {"lambda": 1.5, "validation": 0.5}]}),
        "b": zoo({"tsv_m": [{"lambda": 1.0, "validation": 0.4}, {"lambda": 1.5, "validation": 0.1}],
                  "rmm": [{"weight": 0.45, "validation": 0.3}, {"weight": 0.8, "validation": 0.5}]}),
        "c": zoo({"rmm": [{"weight": 0.45, "validation": 0.4}, {"weight": 0.8, "validation": 0.28}]}),
    }
    chosen = choose(zoos)
    assert chosen["tsv_m"]["zoos"] == ["a", "b"] and chosen["tsv_m"]["value"] == 1.0  # 1.5 falls below the base on b
    assert chosen["tsv_m"]["worst"]["1.5"] == pytest.approx(-0.25)
    assert chosen["rmm"]["parameter"] == "weight" and chosen["rmm"]["zoos"] == ["b", "c"]
    assert chosen["rmm"]["value"] == 0.45 and chosen["rmm"]["worst_share"] == pytest.approx(0.25)
    assert "iso_c" not in chosen  # swept nowhere
