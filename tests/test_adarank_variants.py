"""AdaRank on top of TSV-M and Iso-CTS (variants ``tsv_m`` and ``iso_cts``, issue 12).

Step 0 of each variant must be its base method exactly: the kernels against the
methods' own kernels, then the learner's file through mergekit's engine against
``merge_method: tsv_m`` / ``iso_cts``, for every objective.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import merge_config, run_merge_in_process

from mergekit_ext.methods.adarank import VARIANT_DEFAULTS
from mergekit_ext.methods.adarank.format import open_learned_file, write_learned_file
from mergekit_ext.methods.adarank.kernel import (
    apply_masks,
    mask_rows,
    matrix_components,
    origin_and_vectors,
)
from mergekit_ext.methods.adarank.learn import LearnOptions, learn, prepare, run
from mergekit_ext.methods.iso.kernel import iso_c_merge, iso_cts_merge
from mergekit_ext.methods.tsv.kernel import tsv_merge
from mergekit_ext.modeling import load_state_dict

MODELS = ("ft0", "ft1", "ft2")


def _family(count, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("shape, count", [((32, 64), 3), ((48, 20), 2), ((64, 32), 4), ((2, 8), 3)])
def test_all_components_on_are_the_base_methods(shape, count):
    """Every component on and coefficients λ give TSV-M / Iso-CTS / Iso-C (the (2, 8) case has
    T > r: TSV-M's fallback, Iso-CTS without task-specific room)."""
    base, models = _family(count, shape)
    _, vectors = origin_and_vectors(base, models, "tsv_m")
    parts = matrix_components(vectors, "tsv_m")
    assert parts.grid == (count, max(1, min(shape) // count))
    out = apply_masks(base, models, variant="tsv_m", coefficients=torch.full((count,), 1.7), mask=parts.valid())
    torch.testing.assert_close(out, tsv_merge(base, models, lam=1.7, is_matrix=True), atol=1e-6, rtol=1e-6)
    for fraction in (0.8, 0.5, 1.0):
        parts = matrix_components(vectors, "iso_cts", common_space_fraction=fraction)
        assert parts.grid[0] == mask_rows("iso_cts", count) == count + 1
        assert torch.equal(parts.sigma, parts.sigma[:1].expand_as(parts.sigma))  # one σ̄ for every component
        out = apply_masks(
            base, models, variant="iso_cts", coefficients=torch.full((count + 1,), 3.0), mask=parts.valid(),
            common_space_fraction=fraction,
        )  # fmt: skip
        expected = iso_cts_merge(base, models, lam=3.0, common_space_fraction=fraction, is_matrix=True)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-6)
        if fraction == 1.0:  # Iso-C: every component in the common row
            assert set(parts.rows.tolist()) == {count}
            torch.testing.assert_close(out, iso_c_merge(base, models, lam=3.0, is_matrix=True), atol=2e-6, rtol=1e-6)
    # Non-matrix tensors: θ0 + λ·mean τ, as the base methods (not the sum).
    vector_base, vector_models = _family(count, (7,), seed=1)
    for variant, rows, reference in (("tsv_m", count, tsv_merge), ("iso_cts", count + 1, iso_cts_merge)):
        out = apply_masks(vector_base, vector_models, variant=variant, coefficients=torch.full((rows,), 2.0), mask=None)
        torch.testing.assert_close(out, reference(vector_base, vector_models, lam=2.0), atol=1e-6, rtol=1e-6)


def test_masks_select_columns_of_the_stack_by_task():
    """Masking a cell removes exactly that column of the orthogonalized stack; coefficient rows
    scale their own task's (or the common block's) columns."""
    base, models = _family(3, (24, 40))
    _, vectors = origin_and_vectors(base, models, "iso_cts")
    for variant in ("tsv_m", "iso_cts"):
        parts = matrix_components(vectors, variant)
        rows = parts.grid[0]
        mask = parts.valid().clone()
        mask[0, 1] = mask[rows - 1, 0] = False
        coefficients = torch.arange(1.0, rows + 1.0)
        out = apply_masks(base, models, variant=variant, coefficients=coefficients, mask=mask)
        expected = base.double().clone()
        for i in range(parts.sigma.numel()):
            row, position = int(parts.rows[i]), int(parts.positions[i])
            if mask[row, position]:
                column = parts.left[:, i].double()[:, None] @ parts.right[i].double()[None, :]
                expected += float(coefficients[row]) * float(parts.sigma[i]) * column
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        assert (out - apply_masks(base, models, variant=variant, coefficients=coefficients, mask=parts.valid())).abs().max() > 1e-3


# ---------------------------------------------------------------- learner and engine


def _prompts(seed, count=24):
    rng = random.Random(seed)
    letters = "abcdefghij"
    return [f"rev({''.join(rng.sample(letters, rng.randint(3, 5)))}) = " for _ in range(count)]


def _options(variant, **options):
    options.setdefault("max_new_tokens", 3)  # the random fine-tunes never stop on their own
    return LearnOptions(variant=variant, batch_size=8, **options)


def _learn(family, variant, **options):
    return learn(
        [family[name] for name in MODELS], [_prompts(seed) for seed in range(3)], base=family["base"],
        options=_options(variant, **options), progress=False,
    )  # fmt: skip


def _write(result, path):
    return write_learned_file(path, result.masks, result.coefficients, result.info, result.fingerprints)


_REFERENCES = {}


def _reference(family, tmp_path_factory, variant):
    """``merge_method: tsv_m`` / ``iso_cts`` at their defaults through the engine (once per variant)."""
    if variant not in _REFERENCES:
        out = tmp_path_factory.mktemp(f"reference-{variant}") / "merged"
        run_merge_in_process(merge_config(variant, family, MODELS), out)
        _REFERENCES[variant] = load_state_dict(out)
    return _REFERENCES[variant]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tsv_m", "iso_cts"])
@pytest.mark.parametrize("objective", ["entropy", "entropy-answer", "distill"])
def test_zero_steps_through_the_engine_is_the_base_method(tiny_family, tmp_path, tmp_path_factory, variant, objective):
    result = _learn(tiny_family, variant, steps=0, objective=objective)
    rows = mask_rows(variant, 3)
    assert result.info["prior"] == VARIANT_DEFAULTS[variant]["prior"] and result.info["mask_rows"] == rows
    assert all(mask.dtype == torch.bool and mask.shape[0] == rows for mask in result.masks.values())
    assert all(torch.equal(row, torch.full((rows,), result.info["prior"])) for row in result.coefficients.values())
    kept = result.info["kept_components"]
    assert kept["before"] == kept["after"] == kept["band"] > 0  # every component of the stack on
    file = _write(result, tmp_path / "step0.safetensors")
    run_merge_in_process(merge_config("adarank", tiny_family, MODELS, parameters={"file": str(file)}), tmp_path / "adarank")
    merged, reference = load_state_dict(tmp_path / "adarank"), _reference(tiny_family, tmp_path_factory, variant)
    base = load_state_dict(tiny_family["base"])
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=2e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert max(float((merged[key] - base[key]).abs().max()) for key in merged) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tsv_m", "iso_cts"])
def test_learned_file_reproduces_the_learner_in_any_model_order(tiny_family, tmp_path, variant):
    """After learning (distill), masks are binary and some flipped; the engine applies the file
    to exactly the weights the learner scored, also with the models in another order (the
    common row of iso_cts stays last)."""
    setup = prepare(
        [tiny_family[name] for name in MODELS], [_prompts(seed) for seed in range(3)], base=tiny_family["base"],
        options=_options(variant, steps=15, lr=0.05, objective="distill"), progress=False,
    )  # fmt: skip
    result = run(setup)
    kept = result.info["kept_components"]
    assert kept["after"] != kept["before"]
    assert all(mask.dtype == torch.bool for mask in result.masks.values())
    for entry in setup.model.entries:
        if entry.valid is not None:  # cells without a component stay off
            assert not bool(result.masks[entry.name][~entry.valid].any())
    file = _write(result, tmp_path / "learned.safetensors")
    learned = {name: tensor.float() for name, tensor in setup.model.hard_weights().items()}
    for order in (MODELS, MODELS[::-1]):
        out = tmp_path / f"merged-{'-'.join(order)}"
        run_merge_in_process(merge_config("adarank", tiny_family, order, parameters={"file": str(file)}), out)
        merged = load_state_dict(out)
        for name, tensor in learned.items():
            # Another order stacks the same columns in another order: polar factors agree to rounding.
            tolerance = 5e-6 if order == MODELS else 3e-5
            torch.testing.assert_close(merged[name], tensor, atol=tolerance, rtol=1e-5, msg=lambda m, order=order, name=name: f"{order} {name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tsv_m", "iso_cts"])
def test_a_file_applied_to_other_weights_is_refused(tiny_family, tmp_path, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ext.modeling import save_model

    result = _learn(tiny_family, variant, steps=0, objective="entropy")
    file = _write(result, tmp_path / "learned.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert open_learned_file(file).fingerprint(name).shape == (mask_rows(variant, 3), 4)
    other = AutoModelForCausalLM.from_pretrained(str(tiny_family["ft2"]), dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(0.01)
    save_model(other, tmp_path / "other_weights", AutoTokenizer.from_pretrained(str(tiny_family["ft2"])))
    config = merge_config("adarank", tiny_family, MODELS, parameters={"file": str(file), "check_models": False})
    config["models"][-1] = {"model": str(tmp_path / "other_weights")}
    with pytest.raises(Exception, match=rf"tensor {name}: the factorisation of these weights does not match"):
        run_merge_in_process(config, tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_bad_options_are_refused(tiny_family):
    with pytest.raises(ValueError, match="variant tsv_m starts from every component .* must be 1"):
        _learn(tiny_family, "tsv_m", steps=0, init_rank_ratio=0.5)
    with pytest.raises(ValueError, match="variant iso_cts starts from every component .* must be 1"):
        _learn(tiny_family, "iso_cts", steps=0, max_rank_ratio=0.5)
    with pytest.raises(ValueError, match="common_space_fraction must be in"):
        _learn(tiny_family, "iso_cts", steps=0, common_space_fraction=0.0)
    with pytest.raises(ValueError, match="variant 'tsv_m' needs --base"):
        learn([tiny_family["ft0"]], [_prompts(0)], options=_options("tsv_m"), progress=False)
