"""Tied input/output embeddings (``tie_word_embeddings: true``, no ``lm_head.weight`` in the
checkpoint: Qwen2-0.5B, Llama-3.2-1B, SmolLM2, Gemma): AdaRank's learner, the continual state
and the TALL bundle merge the embedding once, write no head, and the merged model's logits
(loaded by transformers) match a reference merge computed here by hand or by mergekit."""

from __future__ import annotations

import pytest
import torch
from conftest import invoke, load_model, run_merge_in_process, run_mergekit_yaml
from safetensors.torch import load_file, save_file

from mergekit_ext.modeling import char_tokenizer, llama_config, load_state_dict, qwen2_config, save_family

TOKENS = torch.arange(4, 28).reshape(2, 12)
PROMPTS = [f"rev({word}) = " for word in ("abc", "cab", "bca", "acb", "dab", "bad", "cad", "dca")]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tied(request, tmp_path_factory):
    tokenizer = char_tokenizer()
    build = llama_config if request.param == "llama" else qwen2_config
    config = build(len(tokenizer), tie_word_embeddings=True)
    paths = save_family(tmp_path_factory.mktemp(f"tied-{request.param}"), config, tokenizer, count=2, scale=0.05)
    names = set(load_state_dict(paths["base"]))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    return paths


def _logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder)(input_ids=TOKENS).logits


def _reference_logits(base_folder, weights) -> torch.Tensor:
    """Logits of the base architecture with ``weights`` put in (the tie gives the head the embedding)."""
    model = load_model(base_folder)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _check_output(folder, base_folder):
    """Same tensor names as the input (no lm_head copy), loads tied, finite logits."""
    assert set(load_state_dict(folder)) == set(load_state_dict(base_folder))
    model = load_model(folder)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(_logits(folder)).all()


def _task_arithmetic(tied, out, scale):
    run_merge_in_process(
        {
            "merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(tied["base"]),
            "models": [{"model": str(tied[name]), "parameters": {"weight": scale}} for name in ("ft0", "ft1")],
        },
        out,
    )  # fmt: skip
    return out


@pytest.mark.slow  # runs the learner through the CLI, then stock mergekit-yaml
def test_adarank_learn_cli_step_zero_is_task_arithmetic(tied, tmp_path):
    """The command of the issue, on a tied checkpoint; step 0 through stock mergekit-yaml = TA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    file = tmp_path / "learned.safetensors"
    result = invoke(
        "adarank", "learn", tied["ft0"], tied["ft1"], "--base", tied["base"], "--prompts", prompts, "--out", file,
        "--variant", "ta", "--steps", "0", "--prior", "0.8", "--init-rank-ratio", "1", "--max-new-tokens", "4", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "adarank"
    config = {
        "merge_method": "adarank", "dtype": "float32", "base_model": str(tied["base"]),
        "models": [{"model": str(tied["ft0"])}, {"model": str(tied["ft1"])}], "parameters": {"file": str(file)},
    }  # fmt: skip
    run_mergekit_yaml(config, out)
    _check_output(out, tied["base"])
    reference = _task_arithmetic(tied, tmp_path / "ta", 0.8)
    torch.testing.assert_close(_logits(out), _logits(reference), atol=1e-5, rtol=1e-5)
    assert (_logits(out) - _logits(tied["base"])).abs().max() > 1e-3  # the merge moved


def test_adarank_learner_runs_the_tied_head_and_its_file_reproduces_it(tied, tmp_path):
    """The learner's differentiable model uses the merged embedding as its head: after
    training, its logits are the written merge's, loaded by transformers."""
    from mergekit_ext.methods.adarank.format import write_learned_file
    from mergekit_ext.methods.adarank.learn import LearnOptions, prepare, run, write_merged_model

    models = [tied["ft0"], tied["ft1"]]
    options = LearnOptions(variant="ta", steps=4, lr=0.05, batch_size=4, objective="entropy", seed=1)
    setup = prepare(models, [PROMPTS, PROMPTS[::-1]], base=tied["base"], options=options, progress=False)
    embedding = next(entry for entry in setup.model.entries if entry.name == "model.embed_tokens.weight")
    result = run(setup)
    assert not torch.allclose(result.coefficients["model.embed_tokens.weight"], torch.full((2,), options.resolved().prior))
    file = write_learned_file(tmp_path / "learned.safetensors", result.masks, result.coefficients, result.info, result.fingerprints)
    out = write_merged_model(file, models, tmp_path / "merged", base=tied["base"], dtype="float32")
    _check_output(out, tied["base"])
    with torch.no_grad():
        learner = setup.model.logits(TOKENS, torch.ones_like(TOKENS))
        head = setup.model.hard_weights()[embedding.name]
    torch.testing.assert_close(learner, _logits(out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, load_state_dict(out)[embedding.name], atol=1e-6, rtol=1e-6)


def test_adarank_learner_takes_a_tied_checkpoint_that_also_stores_the_head(tied, tmp_path):
    """Some tied checkpoints store lm_head.weight beside the embedding: merged once (as the
    embedding) in the learner, kept in the output as the input has it."""
    import shutil

    from mergekit_ext.methods.adarank.learn import LearnOptions, learn

    copies = {}
    for name in ("base", "ft0", "ft1"):
        copies[name] = shutil.copytree(tied[name], tmp_path / name)
        file = copies[name] / "model.safetensors"
        tensors = load_file(str(file))
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, str(file), metadata={"format": "pt"})
    result = learn(
        [copies["ft0"], copies["ft1"]], [PROMPTS, PROMPTS], base=copies["base"],
        options=LearnOptions(variant="ta", steps=1, batch_size=4, objective="entropy"), progress=False,
    )  # fmt: skip
    assert "lm_head.weight" in result.coefficients and result.masks


def test_continual_state_of_tied_models_is_task_arithmetic(tied, tmp_path):
    """continual --method ta: θ0 + c·Σ τt, written with the embedding once."""
    state = tmp_path / "state"
    assert invoke("continual", "init", state, tied["ft0"], "--base", tied["base"], "--method", "ta", "--coefficient", "0.6").exit_code == 0
    result = invoke("continual", "add", state, tied["ft1"], "--base", tied["base"])
    assert result.exit_code == 0, result.output
    _check_output(state, tied["base"])
    torch.testing.assert_close(_logits(state), _logits(_task_arithmetic(tied, tmp_path / "ta", 0.6)), atol=1e-5, rtol=1e-5)
    # OPCM (the default) on the same tied models: the same names, a loadable model.
    opcm = tmp_path / "opcm"
    assert invoke("continual", "init", opcm, tied["ft0"], "--base", tied["base"]).exit_code == 0
    assert invoke("continual", "add", opcm, tied["ft1"], "--base", tied["base"]).exit_code == 0
    _check_output(opcm, tied["base"])


def test_tall_bundle_of_tied_models_recovers_theta0_plus_masked_multitask_vector(tied, tmp_path):
    bundle = tmp_path / "bundle"
    result = invoke("tall", "compress", "--base", tied["base"], tied["ft0"], tied["ft1"], bundle, "--tall-lambda", "0.4")
    assert result.exit_code == 0, result.output
    out = tmp_path / "recovered"
    assert invoke("tall", "recover", bundle, "ft0", out).exit_code == 0
    _check_output(out, tied["base"])
    base = load_state_dict(tied["base"])
    models = [load_state_dict(tied[name]) for name in ("ft0", "ft1")]
    reference = {}
    for name, theta0 in base.items():
        vectors = [model[name] - theta0 for model in models]
        multitask = sum(vectors)
        mask = vectors[0].abs() > 0.4 * (multitask - vectors[0]).abs()
        reference[name] = theta0 + mask * multitask
    torch.testing.assert_close(_logits(out), _reference_logits(tied["base"], reference), atol=1e-5, rtol=1e-5)
