"""LoRA adapter I/O, adapter-in/adapter-out merging, and model+lora inputs in mergekit-yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import model_logits, random_adapter

from mergekit_ext.adapters import peft_io as lora
from mergekit_ext.adapters.merge import merge_factors
from mergekit_ext.cli import main
from mergekit_ext.modeling import (
    char_tokenizer,
    llama_config,
    load_state_dict,
    random_model,
    save_model,
)

ADAPTER_SPECS = {
    # different ranks, alphas, rsLoRA and target modules on purpose
    "alpha": dict(seed=1, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
    "beta": dict(seed=2, rank=4, alpha=16.0, target_modules=("q_proj", "v_proj"), use_rslora=True),
    "gamma": dict(seed=3, rank=2, alpha=4.0, target_modules=("q_proj", "o_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_family")
    tokenizer = char_tokenizer()
    base = save_model(random_model(llama_config(len(tokenizer)), seed=0), root / "base", tokenizer)
    adapters = {name: random_adapter(base, root / name, **spec) for name, spec in ADAPTER_SPECS.items()}
    return {"base": base, "root": root, "tokenizer": tokenizer, **adapters}


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return model_logits(base, adapter)


def peft_deltas(base: Path, adapter: Path) -> dict:
    """Dense updates as peft computes them (get_delta_weight), keyed by module path."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter))
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            deltas[name] = module.get_delta_weight("default").detach().clone()
    return deltas


@pytest.mark.slow
def test_read_adapter_folds_peft_scale(lora_family):
    for name in ADAPTER_SPECS:
        adapter = lora.read_adapter(lora_family[name])
        reference = peft_deltas(lora_family["base"], lora_family[name])
        assert sorted(reference) == sorted(adapter.modules)
        for module, delta in reference.items():
            torch.testing.assert_close(adapter.delta(module), delta, rtol=1e-5, atol=1e-7)
    # rsLoRA: alpha / sqrt(r), not alpha / r
    beta = lora.read_adapter(lora_family["beta"])
    raw = load_state_dict_adapter(lora_family["beta"])
    module = "model.layers.0.self_attn.q_proj"
    raw_b = raw[f"base_model.model.{module}.lora_B.weight"]
    torch.testing.assert_close(beta.modules[module].b, raw_b * (16.0 / math.sqrt(4)))


def load_state_dict_adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / lora.SAFETENSORS_FILE))


@pytest.mark.slow
def test_written_adapter_loads_in_peft_and_reproduces_logits(lora_family, tmp_path):
    for name in ("beta", "gamma"):
        adapter = lora.read_adapter(lora_family[name])
        modules = dict(adapter.modules)
        if name == "gamma":  # mixed ranks in one written adapter: exercises rank_pattern/alpha_pattern
            module = "model.layers.1.mlp.down_proj"
            modules[module] = modules[module].padded(5)
        written = lora.write_adapter(tmp_path / name, modules, base_model=str(lora_family["base"]))
        config = json.loads((written / lora.CONFIG_FILE).read_text())
        assert config["use_rslora"] is False and config["peft_type"] == "LORA"
        torch.testing.assert_close(
            peft_logits(lora_family["base"], written), peft_logits(lora_family["base"], lora_family[name]), rtol=1e-5, atol=1e-5
        )
        assert lora.read_adapter(written).modules.keys() == modules.keys()


@pytest.mark.slow
def test_truncated_adapter_is_refused(lora_family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lora_family["alpha"], broken)
    weights = broken / lora.SAFETENSORS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(lora.AdapterError, match=r"adapter_model\.safetensors.*truncated or corrupt"):
        lora.read_adapter(broken)
    # the command refuses it too, naming the file, and writes nothing
    result = CliRunner().invoke(
        main, ["lora", "merge", "--base", str(lora_family["base"]), "--method", "task_arithmetic", str(broken), str(lora_family["beta"]), "-r", "4", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "truncated or corrupt" in result.output and "broken" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unsupported_and_mismatched_adapters_are_refused(lora_family, tmp_path):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(lora_family["alpha"], dora)
    config = json.loads((dora / lora.CONFIG_FILE).read_text())
    config["use_dora"] = True
    (dora / lora.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(lora.AdapterError, match="DoRA"):
        lora.read_adapter(dora)

    # an adapter trained on a wider model does not fit this base
    tokenizer = lora_family["tokenizer"]
    other_base = save_model(random_model(llama_config(len(tokenizer), hidden_size=48), seed=5), tmp_path / "other_base", tokenizer)
    foreign = random_adapter(other_base, tmp_path / "foreign", seed=9)
    result = CliRunner().invoke(
        main, ["rmm", "build", "--base", str(lora_family["base"]), str(lora_family["alpha"]), str(foreign), "-k", "1", str(tmp_path / "bundle")]
    )
    assert result.exit_code == 1
    message = result.output
    assert "foreign" in message and "q_proj" in message and "(48, 48)" in message and "(32, 32)" in message
    assert not (tmp_path / "bundle").exists()


def dense_reference(lora_family, names, method, parameters):
    """The intended merge: mergekit's merge_tensors on θ0 + ΔW per module, minus θ0."""
    from mergekit.merge_methods import merge_tensors

    adapters = [lora.read_adapter(lora_family[name]) for name in names]
    base_state = load_state_dict(lora_family["base"])
    result = {}
    for module in lora.module_union(adapters):
        base = base_state[lora.weight_name(module)]
        models = [base + (a.delta(module) if module in a.modules else 0) for a in adapters]
        merged = merge_tensors([base, *models], method, parameters=parameters, ids=["base", *names], base_index=0, name=lora.weight_name(module))
        result[module] = merged - base
    return result


@pytest.mark.slow
@pytest.mark.parametrize("method,params,parameters", [
    ("task_arithmetic", ["--param", "weight=0.5,1.0,0.8"], {"weight": {"alpha": 0.5, "beta": 1.0, "gamma": 0.8}}),
    ("consensus_ta", ["--param", "k=1"], {"k": 1}),
])
def test_lora_merge_matches_dense_merge_up_to_truncation(lora_family, tmp_path, method, params, parameters):
    from conftest import low_rank_approximation

    names = ["alpha", "beta", "gamma"]
    reference = dense_reference(lora_family, names, method, parameters)
    for rank in (3, 32):  # truncated, and full rank (exact)
        out = tmp_path / f"{method}-{rank}"
        result = CliRunner().invoke(
            main, ["lora", "merge", "--base", str(lora_family["base"]), "--method", method, *[str(lora_family[n]) for n in names], "-r", str(rank), str(out), *params]
        )
        assert result.exit_code == 0, result.output + repr(result.exception)
        merged = peft_deltas(lora_family["base"], out)  # loads in peft
        assert sorted(merged) == sorted(reference)
        for module, dense in reference.items():
            expected = dense if rank == 32 else low_rank_approximation(dense, rank)
            torch.testing.assert_close(merged[module], expected, rtol=1e-4, atol=1e-5)
    assert any(d.abs().max() > 1e-3 for d in reference.values())


@pytest.mark.slow
def test_lora_merge_against_peft_add_weighted_adapter(lora_family, tmp_path):
    """Same adapters, same ranks: our task_arithmetic merge equals peft's 'svd' combination.
    peft before 0.22 let the merged adapter inherit use_rslora from the first adapter (issue
    3761: alpha = r then scales it by sqrt(r)); the expected inflation follows the merged config."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    rank = 3
    for names in (["alpha", "beta"], ["beta", "alpha"]):
        out = tmp_path / "-".join(names)
        result = CliRunner().invoke(
            main, ["lora", "merge", "--base", str(lora_family["base"]), "--method", "task_arithmetic", *[str(lora_family[n]) for n in names], "-r", str(rank), str(out)]
        )
        assert result.exit_code == 0, result.output
        ours = peft_deltas(lora_family["base"], out)
        model = AutoModelForCausalLM.from_pretrained(str(lora_family["base"]), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(lora_family[names[0]]), adapter_name=names[0])
        model.load_adapter(str(lora_family[names[1]]), adapter_name=names[1])
        model.add_weighted_adapter(names, [1.0, 1.0], "merged", combination_type="svd", svd_rank=rank)
        inflation = math.sqrt(rank) if model.peft_config["merged"].use_rslora else 1.0
        compared = 0
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and "merged" in module.lora_A:
                theirs = module.get_delta_weight("merged")
                torch.testing.assert_close(theirs, ours[name] * inflation, rtol=1e-3, atol=1e-5)
                compared += 1
        assert compared == len(ours) == 4  # q_proj and v_proj in two layers


@pytest.mark.slow
def test_model_plus_lora_inputs_in_mergekit_yaml(lora_family, tmp_path):
    """consensus_ta with `base+adapter` model references in the stock mergekit-yaml."""
    from conftest import run_mergekit_yaml

    from mergekit_ext.methods.consensus.kernel import consensus_merge

    base = str(lora_family["base"])
    names = ["alpha", "beta", "gamma"]
    config = {
        "merge_method": "consensus_ta",
        "base_model": base,
        "models": [{"model": f"{base}+{lora_family[n]}", "parameters": {"weight": 1.0}} for n in names],
        "parameters": {"k": 2, "lambda": 1.0},
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    run_mergekit_yaml(config, out, "--lora-merge-cache", str(tmp_path / "cache"))
    merged = load_state_dict(out)
    base_state = load_state_dict(base)
    adapters = [lora.read_adapter(lora_family[n]) for n in names]
    for module in lora.module_union(adapters):
        name = lora.weight_name(module)
        models = [base_state[name] + (a.delta(module) if module in a.modules else 0) for a in adapters]
        expected = consensus_merge(base_state[name], models, weights=[1.0] * 3, tall_lambdas=[0.4] * 3, k=2, scale=1.0)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])


@pytest.mark.slow
def test_merge_factors_is_task_arithmetic_on_each_factor(lora_family):
    adapters = [lora.read_adapter(lora_family[name]) for name in ("alpha", "beta", "gamma")]
    merged = merge_factors(adapters, "task_arithmetic", parameters={"weight": [1.0, 0.5, 2.0], "lambda": 0.5})
    module = "model.layers.0.self_attn.q_proj"  # in all three; gamma has rank 2 (zero-padded to 4)
    pairs = [adapter.modules[module].padded(4) for adapter in adapters]
    expected_a = 0.5 * (pairs[0].a + 0.5 * pairs[1].a + 2.0 * pairs[2].a)
    expected_b = 0.5 * (pairs[0].b + 0.5 * pairs[1].b + 2.0 * pairs[2].b)
    torch.testing.assert_close(merged[module].a, expected_a)
    torch.testing.assert_close(merged[module].b, expected_b)
    only_gamma = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(merged[only_gamma].b @ merged[only_gamma].a, 0.5 * 2.0 * 0.5 * 2.0 * adapters[2].delta(only_gamma))


@pytest.mark.slow
def test_lora_merge_two_model_methods_and_parameter_errors(lora_family, tmp_path):
    """slerp takes the first adapted model as its 'base' (as in a mergekit YAML); errors name the parameter."""
    runner = CliRunner()
    base, alpha, beta = (str(lora_family[n]) for n in ("base", "alpha", "beta"))
    result = runner.invoke(main, ["lora", "merge", "--base", base, "--method", "slerp", alpha, beta, "-r", "2", str(tmp_path / "a")])
    assert result.exit_code == 1 and "needs parameter(s) t" in result.output
    result = runner.invoke(main, ["lora", "merge", "--base", base, "--method", "task_arithmetic", alpha, beta, "-r", "2", str(tmp_path / "b"), "--param", "nope=1"])
    assert result.exit_code == 1 and "has no parameter 'nope'" in result.output
    result = runner.invoke(main, ["lora", "merge", "--base", base, "--method", "slerp", alpha, beta, "-r", "32", str(tmp_path / "c"), "--param", "t=0"])
    assert result.exit_code == 0, result.output
    # t = 0 is the first model: the merged adapter is the first adapter
    merged = lora.read_adapter(tmp_path / "c")
    first = lora.read_adapter(alpha)
    module = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(merged.delta(module), first.delta(module), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_gpt2_conv1d_adapters_fan_in_fan_out(tmp_path):
    """GPT-2 stores c_attn as [in, out]: updates come out in that layout and written adapters reload."""
    from mergekit_ext.modeling import gpt2_config

    tokenizer = char_tokenizer()
    base = save_model(random_model(gpt2_config(len(tokenizer)), seed=0), tmp_path / "gpt2", tokenizer)
    paths = [random_adapter(base, tmp_path / f"g{i}", seed=30 + i, target_modules=("c_attn", "c_proj")) for i in range(2)]
    adapter = lora.read_adapter(paths[0])
    assert all(f.fan_in_fan_out for f in adapter.modules.values())
    base_state = load_state_dict(base)
    reference = peft_deltas(base, paths[0])
    for module, delta in reference.items():
        assert adapter.delta(module).shape == base_state[lora.weight_name(module)].shape
        torch.testing.assert_close(adapter.delta(module), delta, rtol=1e-5, atol=1e-7)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["lora", "merge", "--base", str(base), "--method", "task_arithmetic", *map(str, paths), "-r", "64", str(out)])
    assert result.exit_code == 0, result.output
    merged = peft_deltas(base, out)
    second = lora.read_adapter(paths[1])
    for module in reference:
        torch.testing.assert_close(merged[module], adapter.delta(module) + second.delta(module), rtol=1e-4, atol=1e-5)
