"""Consensus TA / TIES: formulas, identities through the real engine, bad input."""

import pytest
import torch
from conftest import merge_config, run_merge_in_process, run_mergekit_yaml
from mergekit.merge_methods import merge_tensors

from mergekit_ext.methods.consensus.kernel import consensus_merge, tall_masks
from mergekit_ext.modeling import load_state_dict


def _by_hand(base, models, lambdas, k, scale):
    """The paper's formulas, written independently of the kernel (TA flavour)."""
    taus = [m.float() - base.float() for m in models]
    mtl = sum(taus)
    votes = sum((t.abs() > lam * (mtl - t).abs()).int() for t, lam in zip(taus, lambdas))
    return base.float() + scale * mtl * (votes >= k)


def test_kernel_matches_formula_and_masks_are_boolean():
    torch.manual_seed(0)
    base = torch.randn(16, 8)
    models = [base + 0.1 * torch.randn(16, 8) for _ in range(4)]
    lambdas = [0.2, 0.4, 0.5, 0.6]
    out = consensus_merge(base, models, weights=[1.0] * 4, tall_lambdas=lambdas, k=2, scale=0.7)
    torch.testing.assert_close(out, _by_hand(base, models, lambdas, 2, 0.7))
    vectors = torch.stack([m - base for m in models])
    masks = tall_masks(vectors, vectors.sum(0), lambdas)
    assert masks.dtype == torch.bool
    # Consensus actually removes something at k=2 on random vectors, and keeps something.
    kept = (_by_hand(base, models, lambdas, 2, 1.0) != base).float().mean()
    assert 0.0 < kept < 1.0


def test_single_task_recovers_itself():
    torch.manual_seed(1)
    base = torch.randn(10, 10)
    model = base + torch.randn(10, 10)
    out = consensus_merge(base, [model], weights=[1.0], tall_lambdas=[0.4], k=1, scale=1.0)
    torch.testing.assert_close(out, model)


def test_bf16_in_bf16_out():
    base = torch.randn(8, 8).bfloat16()
    out = merge_tensors([base, base + 0.1, base - 0.1], "consensus_ta", base_index=0, parameters={"k": 1})
    assert out.dtype == torch.bfloat16


def _config(paths, method, parameters=None, model_parameters=None):
    return merge_config(method, paths, ("ft0", "ft1", "ft2"), parameters=parameters, model_parameters=model_parameters)


@pytest.mark.slow
def test_k0_equals_task_arithmetic_through_stock_mergekit_yaml(tiny_family, tmp_path):
    weights = {"ft0": {"weight": 0.5}, "ft1": {"weight": 1.0}, "ft2": {"weight": 0.8}}
    run_mergekit_yaml(_config(tiny_family, "consensus_ta", {"k": 0, "lambda": 0.6}, weights), tmp_path / "ours")
    run_mergekit_yaml(_config(tiny_family, "task_arithmetic", {"lambda": 0.6}, weights), tmp_path / "ta")
    ours, reference = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "ta")
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_consensus_ties_k0_equals_ties_disjoint_sum(tiny_family, tmp_path):
    run_merge_in_process(_config(tiny_family, "consensus_ties", {"k": 0, "lambda": 0.9}), tmp_path / "ours")
    ties = _config(tiny_family, "ties", {"lambda": 0.9, "normalize": False})
    for model in ties["models"]:
        model["parameters"] = {"weight": 1.0, "density": 0.2}
    run_merge_in_process(ties, tmp_path / "ties")
    ours, reference = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "ties")
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_k_above_model_count_gives_base(tiny_family, tmp_path):
    run_merge_in_process(_config(tiny_family, "consensus_ta", {"k": 4}), tmp_path / "out")
    merged, base = load_state_dict(tmp_path / "out"), load_state_dict(tiny_family["base"])
    for name in base:
        torch.testing.assert_close(merged[name], base[name], rtol=0, atol=0)


@pytest.mark.slow
def test_default_merge_equals_independent_computation(tiny_family, tmp_path):
    lambdas = {"ft0": 0.3, "ft1": 0.4, "ft2": 0.6}
    per_model = {name: {"tall_lambda": value} for name, value in lambdas.items()}
    run_merge_in_process(_config(tiny_family, "consensus_ta", {"lambda": 0.8}, per_model), tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    base = load_state_dict(tiny_family["base"])
    models = [load_state_dict(tiny_family[name]) for name in ("ft0", "ft1", "ft2")]
    for name in base:
        expected = _by_hand(base[name], [m[name] for m in models], list(lambdas.values()), 2, 0.8)
        torch.testing.assert_close(merged[name], expected, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parameters, model_parameters, message",
    [
        ({"k": -1}, {}, "parameter 'k'"),
        ({"k": 1.5}, {}, "parameter 'k'"),
        ({}, {"ft0": {"tall_lambda": "abc"}}, "parameter 'tall_lambda'"),
        ({}, {"ft1": {"tall_lambda": -0.1}}, "parameter 'tall_lambda'"),
        ({"lambda": "x"}, {}, "parameter 'lambda'"),
    ],
)
def test_bad_parameters_fail_before_writing(tiny_family, tmp_path, parameters, model_parameters, message):
    out = tmp_path / "out"
    result = run_mergekit_yaml(_config(tiny_family, "consensus_ta", parameters, model_parameters), out, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(out.glob("*.safetensors")) if out.exists() else True


@pytest.mark.slow
def test_bad_density_names_the_parameter(tiny_family, tmp_path):
    with pytest.raises(Exception, match="consensus_ties: invalid value 0 for parameter 'density'"):
        run_merge_in_process(_config(tiny_family, "consensus_ties", {}, {"ft0": {"density": 0}}), tmp_path / "o")


@pytest.mark.slow
def test_missing_base_is_refused(tiny_family, tmp_path):
    config = _config(tiny_family, "consensus_ta")
    del config["base_model"]
    result = run_mergekit_yaml(config, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "requires a base input" in result.stderr
    assert not (tmp_path / "out").exists()
