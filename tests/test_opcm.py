"""OPCM kernels and `merge_method: opcm` in the stock mergekit-yaml."""

from __future__ import annotations

import pytest
import torch
from conftest import merge_config

from mergekit_ext.methods.opcm.kernel import opcm_merge, project_task_vector, split_rank
from mergekit_ext.methods.opcm.method import opcm
from mergekit_ext.modeling import load_state_dict
from mergekit_ext.tensors import is_block_matrix


def paper_projection(merged_delta, task_delta, alpha, zero_diagonal):
    """docs/methods.md#opcm written out: full SVD, rotate, zero block (and diagonal), rotate back."""
    u, s, vh = torch.linalg.svd(merged_delta, full_matrices=True)
    v = vh.T
    rank = int(((torch.cumsum(s, 0) / s.sum()) > alpha).float().argmax())
    rotated = u.T @ task_delta @ v
    rotated[:rank, :rank] = 0
    if zero_diagonal:
        rotated.diagonal().zero_()
    return u @ rotated @ v.T


def random_pair(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator), torch.randn(rows, cols, generator=generator)


def test_split_rank_hand_computed():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum/sum = 0.4, 0.7, 0.9, 1.0
    assert split_rank(s, 0.3) == 0
    assert split_rank(s, 0.5) == 1
    assert split_rank(s, 0.8) == 2
    assert split_rank(s, 0.95) == 3
    assert split_rank(torch.zeros(3), 0.5) == 0


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_projection_equals_full_svd_formula(shape, zero_diagonal):
    merged_delta, task_delta = random_pair(*shape, seed=sum(shape))
    ours = project_task_vector(merged_delta, task_delta, alpha=0.5, zero_diagonal=zero_diagonal)
    reference = paper_projection(merged_delta, task_delta, 0.5, zero_diagonal)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_zero_diagonal_makes_update_orthogonal(shape):
    merged_delta, task_delta = random_pair(*shape, seed=7)
    projected = project_task_vector(merged_delta, task_delta, alpha=0.5, zero_diagonal=True)
    cosine = float((projected * merged_delta).sum() / (projected.norm() * merged_delta.norm()))
    assert abs(cosine) < 1e-5
    # The flag matters: keeping the diagonal leaves a component along D̄.
    kept = project_task_vector(merged_delta, task_delta, alpha=0.5, zero_diagonal=False)
    kept_cosine = float((kept * merged_delta).sum() / (kept.norm() * merged_delta.norm()))
    assert abs(kept_cosine) > 1e-3
    # And the raw task vector was not orthogonal to begin with, after the block removal alone.
    assert not torch.allclose(projected, kept)


def test_zero_merged_direction_keeps_update():
    _, task_delta = random_pair(6, 9, seed=3)
    projected = project_task_vector(torch.zeros(6, 9), task_delta)
    torch.testing.assert_close(projected, task_delta)


def test_one_model_gives_that_model():
    base, model = random_pair(8, 10, seed=11)
    for project in (True, False):
        assert torch.equal(opcm_merge(base, [model], project=project), model)
    half = model.to(torch.bfloat16)
    assert torch.equal(opcm_merge(base.to(torch.bfloat16), [half], project=True), half)


def test_kernel_steps_and_scaling_from_formulas():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(10, 14, generator=generator)
    models = [base + 0.1 * torch.randn(10, 14, generator=generator) for _ in range(3)]
    taus = [model - base for model in models]
    accumulator = taus[0].clone()
    for tau in taus[1:]:
        accumulator = accumulator + paper_projection(accumulator, tau, 0.5, True)
    mean_norm = sum(float(tau.norm()) for tau in taus) / 3
    expected = base + accumulator * (mean_norm / float(accumulator.norm()))
    torch.testing.assert_close(opcm_merge(base, models, project=True), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        opcm_merge(base, models, project=True, scaling="none"), base + accumulator, rtol=1e-4, atol=1e-5
    )
    # A non-matrix tensor is a plain sum, rescaled the same way.
    total = sum(taus)
    expected_plain = base + total * (mean_norm / float(total.norm()))
    torch.testing.assert_close(opcm_merge(base, models, project=False), expected_plain, rtol=1e-4, atol=1e-5)
    # Order matters for OPCM (the first model is never projected).
    assert not torch.allclose(opcm_merge(base, models[::-1], project=True), opcm_merge(base, models, project=True))


def test_parameters_validated_with_names():
    from mergekit.merge_methods.base import TensorGroup

    base, model = random_pair(4, 4, seed=1)
    group = TensorGroup.from_tensors([base, model, model + 1], base_index=0, name="model.layers.0.mlp.up_proj.weight")
    for bad, fragment in (({"alpha": 1.5}, "alpha"), ({"alpha": 0}, "alpha"), ({"scaling": "global"}, "scaling")):
        with pytest.raises(ValueError, match=rf"opcm: invalid value .* '{fragment}'"):
            opcm([group], parameters=bad)
    (merged,) = opcm([group])
    assert merged.shape == base.shape


def _expected_merge(paths, order, **options):
    """The per-tensor kernel applied to loaded state dicts, models in ``order``."""
    base = load_state_dict(paths["base"])
    models = [load_state_dict(paths[name]) for name in order]
    return {
        name: opcm_merge(
            tensor,
            [model[name] for model in models],
            project=is_block_matrix(name, tensor.shape),
            **options,
        )
        for name, tensor in base.items()
    }


def _config(paths, order, **parameters):
    return merge_config("opcm", paths, order, parameters=parameters)


@pytest.mark.slow
def test_mergekit_yaml_opcm_matches_kernel_in_config_order(tiny_family, tmp_path):
    from conftest import run_merge_in_process, run_mergekit_yaml

    order = ["ft0", "ft1", "ft2"]
    out = tmp_path / "merged"
    run_mergekit_yaml(_config(tiny_family, order, alpha=0.5), out)
    merged = load_state_dict(out)
    expected = _expected_merge(tiny_family, order, alpha=0.5)
    assert merged.keys() == expected.keys()
    projected = [name for name in merged if is_block_matrix(name, merged[name].shape)]
    assert projected and "lm_head.weight" not in projected
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)

    # Reversed YAML order → the kernel's reversed-order result (and not the forward one).
    reverse = order[::-1]
    out_reverse = tmp_path / "merged_reverse"
    run_merge_in_process(_config(tiny_family, reverse, alpha=0.5, zero_diagonal=False, scaling="none"), out_reverse)
    merged_reverse = load_state_dict(out_reverse)
    expected_reverse = _expected_merge(tiny_family, reverse, alpha=0.5, zero_diagonal=False, scaling="none")
    for name in merged_reverse:
        torch.testing.assert_close(merged_reverse[name], expected_reverse[name], rtol=1e-4, atol=1e-6, msg=name)
    name = projected[0]
    forward_unscaled = _expected_merge(tiny_family, order, alpha=0.5, zero_diagonal=False, scaling="none")[name]
    assert not torch.allclose(merged_reverse[name], forward_unscaled, atol=1e-5)


@pytest.mark.slow
def test_mergekit_refuses_bad_alpha_before_writing(tiny_family, tmp_path):
    from conftest import run_merge_in_process

    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"opcm: invalid value 2.0 for parameter 'alpha'"):
        run_merge_in_process(_config(tiny_family, ["ft0", "ft1"], alpha=2.0), out)
    assert not (out / "model.safetensors").exists()


def test_low_rank_merged_direction_gives_a_well_defined_projection():
    # A rank-2 D̄ (like a merged LoRA fine-tune): the SVD basis past rank 2 is arbitrary,
    # so the result must not depend on it (float32 vs float64 SVDs complete it differently).
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(32, 2, generator=generator) @ torch.randn(2, 48, generator=generator)
    task_delta = torch.randn(32, 48, generator=generator)
    single = project_task_vector(low_rank, task_delta)
    double = project_task_vector(low_rank.double(), task_delta.double())
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-4)
    assert abs(float((single * low_rank).sum())) < 1e-4 * float(single.norm() * low_rank.norm())
    # Only the two defined directions lose their diagonal entries.
    u, s, vh = torch.linalg.svd(low_rank.double(), full_matrices=False)
    expected = task_delta.double().clone()
    for i in range(2):
        expected -= (u[:, i] @ task_delta.double() @ vh[i]) * torch.outer(u[:, i], vh[i])
    rank = split_rank(s.float(), 0.5)
    for i in range(rank):
        for j in range(rank):
            if i != j:
                expected -= (u[:, i] @ task_delta.double() @ vh[j]) * torch.outer(u[:, i], vh[j])
    torch.testing.assert_close(double, expected, rtol=1e-8, atol=1e-8)
