"""What `tall compress` reports: kept share of each task vector, errors, and recovered vs expert on a zoo."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import invoke

from mergekit_ext.methods.consensus.format import GOOD_RECOVERY, CompressionReport, compress
from mergekit_ext.modeling import load_state_dict


def _expected_report(base_path, model_paths, tall_lambda=0.4):
    """The report's numbers computed independently: masks |τt| > λ·|τMTL − τt| over every float tensor."""
    base = load_state_dict(base_path)
    models = [load_state_dict(path) for path in model_paths]
    count = len(models)
    kept = torch.zeros(count, dtype=torch.float64)
    energy_kept = torch.zeros(count, dtype=torch.float64)
    energy = torch.zeros(count, dtype=torch.float64)
    support_error = torch.zeros(count, dtype=torch.float64)
    error = torch.zeros(count, dtype=torch.float64)
    total = 0
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        vectors = [model[name].double() - tensor.double() for model in models]
        multitask = sum(vectors)
        total += tensor.numel()
        for index, vector in enumerate(vectors):
            mask = (vector.abs() > tall_lambda * (multitask - vector).abs()).double()
            recovered = mask * multitask
            kept[index] += mask.sum()
            energy[index] += (vector**2).sum()
            energy_kept[index] += ((vector * mask) ** 2).sum()
            support_error[index] += (((recovered - vector) * mask) ** 2).sum()
            error[index] += ((recovered - vector) ** 2).sum()
    return {
        "kept_fraction": (kept / total).tolist(),
        "kept_energy": (energy_kept / energy).tolist(),
        "support_errors": (support_error / energy_kept).sqrt().tolist(),
        "relative_errors": (error / energy).sqrt().tolist(),
    }


def test_report_fields_match_an_independent_computation(tiny_family, tmp_path):
    names = ["ft0", "ft1", "ft2"]
    report = compress(tiny_family["base"], [tiny_family[n] for n in names], tmp_path / "bundle", progress=False)
    expected = _expected_report(tiny_family["base"], [tiny_family[n] for n in names])
    for field in ("kept_fraction", "kept_energy", "support_errors", "relative_errors"):
        got = [getattr(report, field)[name] for name in names]
        assert got == pytest.approx(expected[field], rel=1e-4, abs=1e-6), field
    # A real share, not all or nothing: three perturbations disagree on many weights.
    assert all(0.05 < f < 0.95 for f in report.kept_fraction.values())
    # The table prints those numbers (in %) and says what to judge the bundle by.
    text = "\n".join(report.lines())
    row = next(line for line in text.splitlines() if line.strip().startswith("ft1 "))
    assert f"{100 * report.kept_fraction['ft1']:.1f}%" in row and f"{report.support_errors['ft1']:.3f}" in row
    assert f"Good: >= {100 * GOOD_RECOVERY:.0f} %" in text and "--zoo" in text
    assert "recovery error per model" not in text


def test_single_model_keeps_all_its_energy_with_no_error(tiny_family, tmp_path):
    # One model: τMTL = τ, the mask is τ ≠ 0, so recovery is exact on the support and overall.
    report = compress(tiny_family["base"], [tiny_family["ft2"]], tmp_path / "one", progress=False)
    assert report.kept_energy["ft2"] == pytest.approx(1.0)
    assert report.support_errors["ft2"] == pytest.approx(0.0, abs=1e-6)
    assert report.relative_errors["ft2"] == pytest.approx(0.0, abs=1e-6)


def test_scores_print_ratio_and_mark_low_recovery():
    report = CompressionReport(
        bundle_bytes=10, base_bytes=10, models_bytes=20, relative_errors={"a": 1.1, "b": 0.9},
        kept_fraction={"a": 0.05, "b": 0.1}, kept_energy={"a": 0.3, "b": 0.5}, support_errors={"a": 0.4, "b": 0.2},
        scores={"a": {"task": "a", "recovered": 0.8, "expert": 0.9}, "b": {"task": "b", "recovered": 0.99, "expert": 1.0}},
        metric="acc, test split",
    )
    rows = {line.split()[0]: line for line in report.lines() if line.startswith("  a ") or line.startswith("  b ")}
    assert rows["a"].rstrip().endswith("88.9%  !")  # 0.8 / 0.9 is below the good level: marked
    assert rows["b"].rstrip().endswith("99.0%")
    assert any("recovered / expert (acc, test split" in line for line in report.lines())


def _zoo_rows(output, names):
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in names and len(parts) in (8, 9):  # 9: marked "!"
            rows[parts[0]] = parts
    return rows


@pytest.mark.slow
def test_compress_with_zoo_scores_recovered_against_expert(test_zoo, tmp_path):
    tasks = test_zoo.tasks
    experts = [str(test_zoo.expert(t)) for t in tasks]
    result = invoke("tall", "compress", "--base", test_zoo.base, *experts, tmp_path / "bundle", "--zoo", test_zoo.root, "--split", "validation")
    assert result.exit_code == 0, result.output
    rows = _zoo_rows(result.output, tasks)
    assert set(rows) == set(tasks), result.output
    for task, parts in rows.items():
        recovered, expert = float(parts[5]), float(parts[6])
        # the expert column is the expert on its own task: what the zoo recorded at build time
        assert expert == pytest.approx(test_zoo.manifest["metrics"]["experts"][task][task]["validation"])
        assert float(parts[7].rstrip("%")) == pytest.approx(100 * recovered / expert, abs=0.06)
    assert "recovered / expert (acc, validation split" in result.output

    # One model alone is recovered exactly: 100 % of its expert.
    result = invoke("tall", "compress", "--base", test_zoo.base, experts[0], tmp_path / "one", "--zoo", test_zoo.root, "--split", "validation")
    assert result.exit_code == 0, result.output
    parts = _zoo_rows(result.output, tasks)[tasks[0]]
    assert parts[5] == parts[6] and re.fullmatch(r"100\.0%", parts[7])

    # A model the zoo has no task for is refused before anything is written.
    result = invoke("tall", "compress", "--base", test_zoo.base, test_zoo.base, tmp_path / "bad", "--zoo", test_zoo.root)
    assert result.exit_code != 0 and "neither an expert of zoo" in result.output
    assert not (tmp_path / "bad").exists()
