"""AdaRank: straight-through masks, identities with TA / CART, the learner, the file, the command.

References are written from docs/methods.md#adarank with torch.linalg.svd directly; the
engine tests run mergekit's own engine (stock ``mergekit-yaml`` where noted).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import merge_config, run_merge_in_process, run_mergekit_yaml

from mergekit_ext.methods.adarank import MASK_TEMPERATURE, VARIANT_DEFAULTS
from mergekit_ext.methods.adarank.format import open_learned_file, write_learned_file
from mergekit_ext.methods.adarank.kernel import (
    apply_masks,
    band_rank,
    factorize,
    initial_logits,
    merge_matrix,
    origin_and_vectors,
    straight_through_mask,
)
from mergekit_ext.methods.adarank.learn import LearnOptions, learn, prepare, read_prompts
from mergekit_ext.methods.cart import DEFAULT_LAMBDA as CART_LAMBDA
from mergekit_ext.methods.cart import DEFAULT_RANK_RATIO as CART_RANK_RATIO
from mergekit_ext.methods.cart.kernel import cart_merge
from mergekit_ext.modeling import load_state_dict
from mergekit_ext.tensors import is_block_matrix

MODELS = ("ft0", "ft1", "ft2")


def _prompts(seed, count=24):
    rng = random.Random(seed)
    letters = "abcdefghij"
    return [f"rev({''.join(rng.sample(letters, rng.randint(3, 5)))}) = " for _ in range(count)]


def _pools():
    return [_prompts(seed) for seed in range(len(MODELS))]


def _learn(family, *, steps, variant="ta", seed=0, **options):
    options.setdefault("max_new_tokens", 4)  # the random fine-tunes never stop on their own
    return learn(
        [family[name] for name in MODELS],
        _pools(),
        base=family["base"],
        options=LearnOptions(variant=variant, steps=steps, seed=seed, batch_size=8, **options),
        progress=False,
    )


def _write(result, path):
    return write_learned_file(path, result.masks, result.coefficients, result.info, result.fingerprints)


def _config(family, file, order=MODELS, base=True, **parameters):
    return merge_config("adarank", family, order, parameters={"file": str(file), **parameters}, base=base)


# ---------------------------------------------------------------- kernels


def test_straight_through_forward_is_hard_and_gradient_flows_through_p():
    logits = torch.tensor([[2.0, -3.0, 1e-9, -1e-9, 0.0, 0.1], [-0.1, 5.0, -5.0, 0.3, -0.3, 40.0]], requires_grad=True)
    weights = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    mask = straight_through_mask(logits)
    p = torch.sigmoid(logits.detach() / MASK_TEMPERATURE)
    assert torch.equal(mask.detach(), (p > 0.5).float())  # exactly 0/1 in the forward pass
    (mask * weights).sum().backward()
    torch.testing.assert_close(logits.grad, weights * p * (1 - p) / MASK_TEMPERATURE)
    # The paper's form p·s + ((hard − p)·s).detach() has the same gradient and value.
    paper_logits = logits.detach().clone().requires_grad_(True)
    paper_p = torch.sigmoid(paper_logits / MASK_TEMPERATURE)
    paper = paper_p * weights + (((paper_p > 0.5).float() - paper_p) * weights).detach()
    paper.sum().backward()
    torch.testing.assert_close(paper_logits.grad, logits.grad)
    torch.testing.assert_close(paper.detach(), mask.detach() * weights)


def test_initial_logits_and_band():
    logits = initial_logits(3, (20, 12), band=8, init_rank_ratio=0.25)  # k = int(0.25·12) = 3
    assert logits.shape == (3, 8)
    assert torch.equal(logits[:, :3], torch.full((3, 3), 0.1)) and torch.equal(logits[:, 3:], torch.full((3, 5), -0.1))
    assert bool((initial_logits(2, (20, 12), band=12, init_rank_ratio=1.0) > 0).all())
    assert int((initial_logits(1, (20, 12), band=12, init_rank_ratio=0.01) > 0).sum()) == 1  # max(1, ·), like CART
    assert band_rank((20, 12), 0.5) == 6 and band_rank((20, 12), 1.0) == 12
    with pytest.raises(ValueError, match="max_rank_ratio"):
        band_rank((20, 12), 0)


def _random_family(count=3, shape=(16, 24), seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.slow
def test_step_zero_is_task_arithmetic_and_cart():
    base, models = _random_family()
    shape = base.shape
    # TA: all components on (init ratio 1), coefficients at the prior.
    origin, vectors = origin_and_vectors(base, models, "ta")
    band = band_rank(shape, 1.0)
    u, s, vh = factorize(vectors, band)
    mask = straight_through_mask(initial_logits(3, shape, band, 1.0))
    merged = merge_matrix(origin, u, s, vh, mask, torch.full((3,), 0.7))
    torch.testing.assert_close(merged, base + 0.7 * sum(m - base for m in models), atol=1e-5, rtol=1e-5)
    # CART: origin θavg, top-k on; also with a band narrower than full rank.
    for max_ratio in (1.0, 0.5):
        origin, vectors = origin_and_vectors(None, models, "cart")
        torch.testing.assert_close(origin, torch.stack(models).mean(0))
        band = band_rank(shape, max_ratio)
        u, s, vh = factorize(vectors, band)
        mask = straight_through_mask(initial_logits(3, shape, band, 0.25))
        merged = merge_matrix(origin, u, s, vh, mask, torch.full((3,), 1.3))
        expected = cart_merge(models, rank_ratio=0.25, scale=1.3, svd="full")
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        # And it is not the plain average (the low-rank part is there).
        assert (merged - origin).abs().max() > 0.05
    # Non-matrix tensors are o + Σ coef·v, never masked.
    vectors_1d = [torch.randn(7, generator=torch.Generator().manual_seed(t)) for t in range(3)]
    out = apply_masks(vectors_1d[0], vectors_1d, variant="ta", coefficients=torch.tensor([0.5, 1.0, 2.0]), mask=None)
    torch.testing.assert_close(out, vectors_1d[0] + 1.0 * (vectors_1d[1] - vectors_1d[0]) + 2.0 * (vectors_1d[2] - vectors_1d[0]))


def test_masks_prune_singular_components():
    base, models = _random_family(count=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3]] = True
    mask[1, 1] = True
    out = apply_masks(base, models, variant="ta", coefficients=torch.tensor([0.5, 2.0]), mask=mask)
    expected = base.double().clone()
    for model, kept, coefficient in zip(models, mask, (0.5, 2.0)):
        u, s, vh = torch.linalg.svd((model - base).double(), full_matrices=False)
        expected += coefficient * (u[:, kept] * s[kept]) @ vh[kept]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the base"):
        apply_masks(None, models, variant="ta", coefficients=torch.ones(2), mask=mask)


@pytest.mark.parametrize("variant", ["ta", "cart"])
def test_masks_keeping_most_components_subtract_the_dropped(variant):
    """A row that keeps more components than it drops is applied as coef · (vt − dropped part)
    (the cheaper product); it is the same matrix as summing the kept ones (float64 LAPACK)."""
    base, models = _random_family(count=3)
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 16, generator=generator) < torch.tensor([[0.9], [0.2], [0.7]])
    coefficients = torch.tensor([0.5, 2.0, -1.0])
    out = apply_masks(base, models, variant=variant, coefficients=coefficients, mask=mask)
    origin = base.double() if variant == "ta" else torch.stack([model.double() for model in models]).mean(dim=0)
    expected = origin.clone()
    for model, kept, coefficient in zip(models, mask, coefficients.tolist()):
        u, s, vh = torch.linalg.svd(model.double() - origin, full_matrices=False)
        expected += coefficient * (u[:, kept] * s[kept]) @ vh[kept]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert mask[0].sum() > 8 and mask[1].sum() < 8  # both branches ran


# ---------------------------------------------------------------- through mergekit's engine


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ta", "cart"])
def test_identity_through_stock_mergekit(tiny_family, tmp_path, variant):
    """All logits positive and coefficients at the prior: TA (origin θ0) or full-rank CART (θavg)."""
    result = _learn(tiny_family, steps=0, variant=variant, prior=0.8, init_rank_ratio=1.0)
    assert all(bool(mask.all()) for mask in result.masks.values()) and len(result.masks) == 14
    file = _write(result, tmp_path / "identity.safetensors")
    out = tmp_path / "adarank"
    run_mergekit_yaml(_config(tiny_family, file), out)
    merged = load_state_dict(out)
    base = load_state_dict(tiny_family["base"])
    models = [load_state_dict(tiny_family[name]) for name in MODELS]
    if variant == "ta":
        reference_dir = tmp_path / "ta"
        run_merge_in_process(
            {
                "merge_method": "task_arithmetic",
                "dtype": "float32",
                "base_model": str(tiny_family["base"]),
                "models": [{"model": str(tiny_family[name]), "parameters": {"weight": 1.0}} for name in MODELS],
                "parameters": {"lambda": 0.8},
            },
            reference_dir,
        )
        reference = load_state_dict(reference_dir)
    else:
        reference = {key: torch.stack([model[key] for model in models]).mean(0) for key in base}
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=2e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    # The merge moved away from θ0 (the test can fail).
    assert max(float((merged[key] - base[key]).abs().max()) for key in merged) > 0.01


@pytest.mark.slow
def test_step_zero_cart_through_engine_is_cart(tiny_family, tmp_path):
    result = _learn(tiny_family, steps=0, variant="cart", prior=1.3, init_rank_ratio=0.25, max_rank_ratio=0.5)
    assert max(mask.shape[1] for mask in result.masks.values()) == 16  # band = 0.5 · min(32, 64)
    file = _write(result, tmp_path / "cart0.safetensors")
    run_merge_in_process(_config(tiny_family, file, base=False), tmp_path / "adarank")
    run_merge_in_process(
        {
            "merge_method": "cart",
            "dtype": "float32",
            "models": [{"model": str(tiny_family[name])} for name in MODELS],
            "parameters": {"rank_ratio": 0.25, "lambda": 1.3, "svd": "full"},
        },
        tmp_path / "cart",
    )
    merged, reference = load_state_dict(tmp_path / "adarank"), load_state_dict(tmp_path / "cart")
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def _entropy_by_hand(folder, pools, count):
    """Next-token entropy after each prompt, one unpadded prompt at a time, summed over tasks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    total = 0.0
    with torch.no_grad():
        for pool in pools:
            values = []
            for prompt in pool[:count]:
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
                values.append(float(-(log_probs.exp() * log_probs).sum()))
            total += sum(values) / len(values)
    return total


@pytest.mark.slow
def test_learner_lowers_entropy_is_deterministic_and_file_reproduces_it(tiny_family, tmp_path):
    result = _learn(tiny_family, steps=25, lr=0.02, seed=3, objective="entropy")
    info = result.info
    assert info["entropy_after"]["total"] < info["entropy_before"]["total"] - 1e-3
    assert sum(result.history[-5:]) / 5 < sum(result.history[:5]) / 5
    kept = info["kept_components"]
    assert kept["after"] != kept["before"]  # some masks flipped
    coefficients = torch.stack(list(result.coefficients.values()))
    assert not torch.allclose(coefficients, torch.full_like(coefficients, VARIANT_DEFAULTS["ta"]["prior"]))
    again = _learn(tiny_family, steps=25, lr=0.02, seed=3, objective="entropy")
    assert again.history == result.history
    for name in result.masks:
        assert torch.equal(again.masks[name], result.masks[name])
    for name in result.coefficients:
        assert torch.equal(again.coefficients[name], result.coefficients[name])
    # The written file, applied by mergekit's engine, is the model the learner scored.
    file = _write(result, tmp_path / "learned.safetensors")
    out = tmp_path / "merged"
    run_merge_in_process(_config(tiny_family, file), out)
    by_hand = _entropy_by_hand(out, _pools(), 8)
    assert by_hand == pytest.approx(info["entropy_after"]["total"], abs=1e-4)
    assert by_hand != pytest.approx(info["entropy_before"]["total"], abs=1e-4)
    # Model order in the config does not matter: the file's models are matched by path.
    out_reversed = tmp_path / "merged_reversed"
    run_merge_in_process(_config(tiny_family, file, order=MODELS[::-1]), out_reversed)
    forward, backward = load_state_dict(out), load_state_dict(out_reversed)
    for key in forward:
        torch.testing.assert_close(forward[key], backward[key], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_mismatched_file_gives_clear_errors(tiny_family, tmp_path):
    result = _learn(tiny_family, steps=0)
    file = _write(result, tmp_path / "good.safetensors")
    metadata = open_learned_file(file).info
    with pytest.raises(Exception, match=r"learned for 3 models, but this merge has 2"):
        run_merge_in_process(_config(tiny_family, file, order=("ft0", "ft1")), tmp_path / "two")
    # A model that the file was not learned for.
    import shutil

    copy = shutil.copytree(tiny_family["ft2"], tmp_path / "ft2_copy")
    config = _config(tiny_family, file, order=("ft0", "ft1"))
    config["models"].append({"model": str(copy)})
    with pytest.raises(Exception, match=r"ft2_copy is not one of the models .*good.safetensors.*check_models: false"):
        run_merge_in_process(config, tmp_path / "other")
    config["parameters"]["check_models"] = False  # the same weights elsewhere: config order
    run_merge_in_process(config, tmp_path / "moved")
    assert (tmp_path / "moved" / "model.safetensors").is_file()
    matrix = next(name for name in result.masks if "mlp.up_proj" in name)
    # Missing tensor.
    coefficients = dict(result.coefficients)
    del coefficients[matrix]
    missing = write_learned_file(tmp_path / "missing.safetensors", result.masks, coefficients, result.info)
    with pytest.raises(Exception, match=rf"missing.safetensors has no coefficients for tensor {matrix}"):
        run_merge_in_process(_config(tiny_family, missing), tmp_path / "m")
    # Wrong mask shape.
    masks = dict(result.masks)
    masks[matrix] = masks[matrix][:, :5]
    wrong = write_learned_file(tmp_path / "wrong.safetensors", masks, result.coefficients, result.info)
    with pytest.raises(Exception, match=rf"wrong.safetensors: mask of {matrix} has shape \[3, 5\]"):
        run_merge_in_process(_config(tiny_family, wrong), tmp_path / "w")
    # TA file without a base; a missing file; a file that is not ours.
    with pytest.raises(Exception, match="variant 'ta', which needs base_model"):
        run_merge_in_process(_config(tiny_family, file, base=False), tmp_path / "nobase")
    with pytest.raises(Exception, match="learned file not found"):
        run_merge_in_process(_config(tiny_family, tmp_path / "nope.safetensors"), tmp_path / "nofile")
    with pytest.raises(Exception, match="not an AdaRank file"):
        run_merge_in_process(_config(tiny_family, tiny_family["base"] / "model.safetensors"), tmp_path / "foreign")
    # Missing `file` parameter is refused by mergekit itself.
    config = _config(tiny_family, file)
    del config["parameters"]["file"]
    with pytest.raises(Exception, match="file"):
        run_merge_in_process(config, tmp_path / "noparam")
    assert metadata["tasks"] == 3 and metadata["variant"] == "ta"
    assert [entry["path"] for entry in metadata["models"]] == [str(tiny_family[name]) for name in MODELS]
    assert all(len(entry["content_hash"]) == 64 for entry in metadata["models"])


@pytest.mark.slow
def test_learner_refuses_bad_options(tiny_family):
    with pytest.raises(ValueError, match="init_rank_ratio 0.5 is above max_rank_ratio 0.2"):
        _learn(tiny_family, steps=0, init_rank_ratio=0.5, max_rank_ratio=0.2)
    with pytest.raises(ValueError, match="one prompt pool per model"):
        learn([tiny_family["ft0"]], _pools(), base=tiny_family["base"], progress=False)
    with pytest.raises(ValueError, match="needs --base"):
        learn([tiny_family["ft0"]], _pools()[:1], options=LearnOptions(variant="ta"), progress=False)


@pytest.mark.slow  # prepares a learner on three tiny models: about 2 s of CPU
def test_learner_architecture_holds_no_weights_and_needs_every_one(tiny_family, tmp_path):
    """The learner's architecture is built on the meta device (no float32 copy of the
    checkpoint); a checkpoint without a weight the architecture needs is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_ext.methods.adarank.learn import empty_architecture, learner_bytes

    setup = prepare(
        [tiny_family[name] for name in MODELS], _pools(), base=tiny_family["base"],
        options=LearnOptions(variant="ta", steps=0, batch_size=8), progress=False,
    )  # fmt: skip
    assert all(parameter.is_meta for parameter in setup.model.skeleton.parameters())
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in setup.model.skeleton.buffers())
    assert buffers < learner_bytes(setup.model)["model_float32"] / 100  # rotary frequencies only
    assert learner_bytes(setup.model)["architecture"] <= buffers
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["base"], broken)
    files = sorted(broken.glob("*.safetensors"))
    tensors = load_file(str(files[0]))
    dropped = next(name for name in tensors if name.endswith("mlp.down_proj.weight"))
    del tensors[dropped]
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    names = [name for file in files for name in load_file(str(file))]
    with pytest.raises(ValueError, match=f"checkpoint lacks: .*{dropped}"):
        empty_architecture(broken, names, torch.device("cpu"))


def test_read_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt = \n\nsecond\n")
    assert read_prompts(text) == ["first prompt = ", "second"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"plain"\n{"query": "q = "}\n{"prompt": "p"}\n')
    assert read_prompts(jsonl) == ["plain", "q = ", "p"]
    jsonl.write_text('{"label": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        read_prompts(jsonl)


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_cli_learn_show_merge_end_to_end(tiny_family, tmp_path):
    from mergekit_ext.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(_prompts(7)) + "\n")
    file, merged = tmp_path / "learned.safetensors", tmp_path / "merged"
    arguments = [
        "adarank", "learn", *(str(tiny_family[name]) for name in MODELS),
        "--base", str(tiny_family["base"]), "--prompts", str(prompts),
        "--steps", "4", "--batch-size", "4", "--out", str(file), "--merge-out", str(merged), "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert "on held-out prompts" in result.output and "kept singular components" in result.output
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    info = open_learned_file(file).info
    assert info["variant"] == "cart" and info["prior"] == CART_LAMBDA and info["init_rank_ratio"] == CART_RANK_RATIO
    assert info["training"]["steps"] == 4 and info["tasks"] == 3
    # The stock mergekit-yaml with the same file writes the same model.
    out = tmp_path / "stock"
    run_mergekit_yaml(_config(tiny_family, file), out)
    written, stock = load_state_dict(merged), load_state_dict(out)
    assert written.keys() == stock.keys()
    for key in written:
        assert torch.equal(written[key], stock[key]), key
    shown = CliRunner().invoke(main, ["adarank", "show", str(file), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["tasks"] == 3
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code != 0 and "already exists" in again.output
    bad = CliRunner().invoke(main, ["adarank", "learn", str(tiny_family["ft0"]), "--out", str(tmp_path / "x.safetensors")])
    assert bad.exit_code != 0 and "no prompts" in bad.output
    assert not (tmp_path / "x.safetensors").exists()
    # --unlabeled draws from a zoo's generators: without --zoo it is refused by name, before learning.
    stray = CliRunner().invoke(main, [*arguments[:-5], "--unlabeled", "5", "--out", str(tmp_path / "x.safetensors")])
    assert stray.exit_code != 0 and "--unlabeled" in stray.output and "--zoo" in stray.output
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_cli_learn_on_a_zoo_adds_unlabeled_prompts(test_zoo, tmp_path):
    """`learn --zoo` learns on each task's validation prompts plus --unlabeled fresh ones."""
    from mergekit_ext.cli import main

    file = tmp_path / "zoo.safetensors"
    arguments = ["adarank", "learn", "--zoo", str(test_zoo.root), "--objective", "entropy", "--steps", "0", "--out", str(file), "--quiet"]
    result = CliRunner().invoke(main, [*arguments, "--unlabeled", "6"])
    assert result.exit_code == 0, result.output
    training = open_learned_file(file).info["training"]
    pools = [train + held for train, held in zip(training["prompts_per_task"], training["held_out_per_task"])]
    assert pools == [len(test_zoo.documents(task, "validation")) + 6 for task in test_zoo.tasks]


@pytest.mark.slow
def test_matrix_classification_matches_the_engine(tiny_family):
    """The learner masks exactly the tensors the mergekit method treats as matrices."""
    result = _learn(tiny_family, steps=0)
    state = load_state_dict(tiny_family["base"])
    expected = {name for name, tensor in state.items() if is_block_matrix(name, tensor.shape)}
    assert set(result.masks) == expected and "lm_head.weight" not in expected
    assert set(result.coefficients) == set(state)


# ---------------------------------------------------------------- objectives (issue 16)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["entropy", "entropy-answer", "distill"])
@pytest.mark.parametrize("coefficients_only", [False, True])
def test_zero_steps_is_the_base_method_for_every_objective(tiny_family, objective, coefficients_only):
    """Step 0 leaves every mask at its initial value and every coefficient at the prior, so the
    file is the base method's (through the engine: test_identity_through_stock_mergekit)."""
    result = _learn(tiny_family, steps=0, variant="cart", objective=objective, coefficients_only=coefficients_only, max_new_tokens=3)
    state = load_state_dict(tiny_family["base"])
    defaults = VARIANT_DEFAULTS["cart"]
    assert (defaults["prior"], defaults["init_rank_ratio"]) == (CART_LAMBDA, CART_RANK_RATIO)  # CART's own defaults
    for name, mask in result.masks.items():
        expected = initial_logits(3, state[name].shape, mask.shape[1], defaults["init_rank_ratio"]) > 0
        assert mask.dtype == torch.bool and torch.equal(mask, expected), name
    assert all(torch.equal(row, torch.full((3,), defaults["prior"])) for row in result.coefficients.values())
    held = result.info["held_out_objective"]
    assert held["name"] == objective and held["before"] == held["after"]
    assert result.info["training"]["held_out_per_task"] == [8, 8, 8]  # min(batch 8, 24 // 2)


def test_distillation_kl_is_the_coarsened_kl():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 11, generator=generator) * 2, torch.randn(5, 11, generator=generator)
    from mergekit_ext.methods.adarank.learn import distillation_kl

    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    full = (log_p.exp() * (log_p - log_q)).sum(-1)
    for k in (11, 10):  # every token, or all but one (the rest bucket is that token): the exact KL
        top = log_p.topk(k, dim=-1)
        torch.testing.assert_close(distillation_kl(student, top.values, top.indices), full, atol=1e-5, rtol=1e-5)
    top = log_p.topk(3, dim=-1)  # top 3 + the rest: KL of the coarsened distributions
    p3, q3 = top.values.exp(), log_q.gather(-1, top.indices).exp()
    coarse_p = torch.cat([p3, 1 - p3.sum(-1, keepdim=True)], -1)
    coarse_q = torch.cat([q3, 1 - q3.sum(-1, keepdim=True)], -1)
    expected = (coarse_p * (coarse_p.log() - coarse_q.log())).sum(-1)
    torch.testing.assert_close(distillation_kl(student, top.values, top.indices), expected, atol=1e-5, rtol=1e-5)
    assert bool((expected <= full + 1e-6).all())  # a lower bound of the full KL
    assert torch.allclose(distillation_kl(teacher, *log_p.topk(4, dim=-1)), torch.zeros(5), atol=1e-6)


@pytest.mark.slow
def test_teacher_cache_matches_the_expert(tiny_family):
    """Greedy answers equal unbatched greedy decoding; the cached log-probs are the expert's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ext.methods.adarank.learn import stop_token_ids, teacher_cache

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family["ft1"]))
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in _prompts(1, 6)]
    options = LearnOptions(top_k=5, max_new_tokens=4).resolved()
    items = teacher_cache(tiny_family["ft1"], prompts, stop_ids=stop_token_ids(tokenizer, "\n"), options=options, pad_id=0, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_family["ft1"]), dtype=torch.float32).eval()
    for prompt, item in zip(prompts, items):
        ids = list(prompt)
        with torch.no_grad():
            for j in range(item.sequence.length):
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
                torch.testing.assert_close(item.log_probs[j], log_probs.topk(5).values, atol=1e-5, rtol=1e-5)
                assert int(log_probs.argmax()) == item.sequence.answer[j] == int(item.indices[j, 0])
                ids.append(item.sequence.answer[j])
        assert item.sequence.ids == prompt + item.sequence.answer[:-1] and item.sequence.start == len(prompt)


@pytest.mark.slow
def test_distill_lowers_its_loss_on_the_test_zoo_and_masks_stay_binary(test_zoo):
    from mergekit_ext.methods.adarank.learn import zoo_prompts

    tasks = test_zoo.tasks
    result = learn(
        [test_zoo.expert(task) for task in tasks],
        [zoo_prompts(test_zoo, task) for task in tasks],
        base=test_zoo.base,
        options=LearnOptions(variant="ta", prior=0.4, objective="distill", steps=30, lr=0.01, batch_size=8, max_new_tokens=3),
        task_names=tasks,
        progress=False,
    )
    held = result.info["held_out_objective"]
    assert held["name"] == "distill" and held["after"]["total"] < held["before"]["total"] - 1e-3
    assert sum(result.history[-5:]) / 5 < sum(result.history[:5]) / 5
    kept = result.info["kept_components"]
    assert kept["after"] != kept["before"] and set(kept["by_task"]) == set(tasks)
    assert sum(counts["band"] for counts in kept["by_type"].values()) == kept["band"]
    assert all(mask.dtype == torch.bool for mask in result.masks.values())
    assert set(result.fingerprints) == set(result.masks)


@pytest.mark.slow
def test_coefficients_only_keeps_the_masks(tiny_family):
    result = _learn(tiny_family, steps=10, lr=0.05, objective="distill", coefficients_only=True, max_new_tokens=3)
    assert all(bool(mask.all()) for mask in result.masks.values())  # TA: all on at step 0, still
    coefficients = torch.stack(list(result.coefficients.values()))
    assert not torch.allclose(coefficients, torch.full_like(coefficients, VARIANT_DEFAULTS["ta"]["prior"]))


@pytest.mark.slow
def test_a_file_applied_to_other_weights_is_refused(tiny_family, tmp_path):
    """The merge recomputes each matrix's SVD: other weights (here one model retrained, at
    another path with check_models false) are refused, naming the tensor."""
    import shutil

    from mergekit_ext.methods.adarank.method import check_fingerprint
    from mergekit_ext.modeling import save_model

    result = _learn(tiny_family, steps=0)
    file = _write(result, tmp_path / "learned.safetensors")
    assert open_learned_file(file).fingerprint(next(iter(result.masks))).shape == (3, 4)
    same = shutil.copytree(tiny_family["ft2"], tmp_path / "same_weights")
    config = _config(tiny_family, file, order=("ft0", "ft1"))
    config["models"].append({"model": str(same)})
    config["parameters"]["check_models"] = False
    run_merge_in_process(config, tmp_path / "same")  # the same weights elsewhere: accepted
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = AutoModelForCausalLM.from_pretrained(str(tiny_family["ft2"]), dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(0.01)
    save_model(other, tmp_path / "other_weights", AutoTokenizer.from_pretrained(str(tiny_family["ft2"])))
    config["models"][-1] = {"model": str(tmp_path / "other_weights")}
    with pytest.raises(Exception, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight: the factorisation of these weights does not match"):
        run_merge_in_process(config, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # The tolerance: float32 SVDs of the same weights on other hardware agree to ~1e-6.
    recorded = torch.tensor([[4.0, 2.0, 1.0, 0.5], [3.0, 1.0, 0.2, 0.1]])
    check_fingerprint("w", recorded, recorded * (1 + 1e-5), 1e-3, "f")
    with pytest.raises(Exception, match=r"tensor w: .*task 1.*relative difference 1\.0[0-9]e-02"):
        check_fingerprint("w", recorded, recorded + torch.tensor([[0.0] * 4, [0.0, 0.03, 0.0, 0.0]]), 1e-3, "f")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["entropy", "distill"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_family, objective):
    """--gradient-checkpointing rebuilds each decoder layer's weights in the backward pass
    (counted) and leaves the loss and every gradient unchanged."""
    from mergekit_ext.methods.adarank.learn import prepare

    setup = prepare(
        [tiny_family[name] for name in MODELS], _pools(), base=tiny_family["base"],
        options=LearnOptions(variant="cart", objective=objective, steps=0, batch_size=4, max_new_tokens=3, init_rank_ratio=0.5),
        progress=False,
    )  # fmt: skip
    model = setup.model
    with torch.no_grad():  # move off the initial point so that the masks' gradients differ by component
        model.coefficients.add_(torch.linspace(-0.3, 0.3, model.coefficients.numel()).reshape(model.coefficients.shape))
    batches = [pool[:4] for pool in setup.train_pools]
    gradients = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.layer_builds = 0
        for parameter in model.parameters():
            parameter.grad = None
        loss, _ = setup.objective(model, batches)
        loss.backward()
        gradients.append((float(loss), [parameter.grad.clone() for parameter in model.parameters()]))
        layers = len(model.skeleton.model.layers)
        assert model.layer_builds == (2 * layers if checkpointing else 0)  # built in the forward, again in the backward
    (plain_loss, plain), (checkpointed_loss, checkpointed) = gradients
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6, abs=1e-7)
    assert any(float(gradient.abs().max()) > 0 for gradient in plain[1:])  # the masks get gradient
    for first, second in zip(plain, checkpointed):
        torch.testing.assert_close(second, first, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_cosine_schedule_settles_the_last_steps(tiny_family):
    """--lr-schedule cosine decays Adam's rate to ~0: the last update moves the coefficients far
    less than the first, and far less than the last update of a constant rate does."""
    from mergekit_ext.methods.adarank.learn import run

    setup = prepare(
        [tiny_family[name] for name in MODELS], _pools(), base=tiny_family["base"],
        options=LearnOptions(variant="ta", objective="entropy", steps=12, lr=0.05, batch_size=8, max_new_tokens=3),
        progress=False,
    )  # fmt: skip
    last_moves = {}
    for schedule in ("constant", "cosine"):
        setup.reset(dataclasses.replace(setup.options, lr_schedule=schedule))
        snapshots = [setup.model.coefficients.detach().clone()]
        result = run(setup, on_step=lambda step: snapshots.append(setup.model.coefficients.detach().clone()))
        moves = [float((after - before).abs().max()) for before, after in zip(snapshots, snapshots[1:])]
        assert len(moves) == 12 and moves[0] > 0.02  # Adam's first step moves by about lr
        assert result.info["training"]["lr_schedule"] == schedule
        last_moves[schedule] = moves[-1]
    assert last_moves["cosine"] < 0.1 * last_moves["constant"]
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        LearnOptions(lr_schedule="linear").resolved()


@pytest.mark.slow
def test_reset_switches_the_objective_of_a_prepared_learner(tiny_family):
    """One setup prepared for distill serves every objective (the benchmark's grid): after reset
    the items are the prompts of the teachers' items and measure what a setup prepared for that
    objective measures; a setup without teachers refuses distill, and the options the
    factorisation and prompts were built with cannot change."""
    models = [tiny_family[name] for name in MODELS]

    def prepared(objective):
        options = LearnOptions(variant="ta", objective=objective, steps=0, batch_size=4, max_new_tokens=3)
        return prepare(models, _pools(), base=tiny_family["base"], options=options, progress=False)

    shared = prepared("distill")
    teachers = shared.measure()
    for objective in ("entropy", "entropy-answer"):
        direct = prepared(objective)
        shared.reset(dataclasses.replace(shared.options, objective=objective))
        assert shared.objective.name == objective
        assert shared.train_pools == direct.train_pools and shared.held_out_pools == direct.held_out_pools
        assert shared.measure()[0] == pytest.approx(direct.measure()[0], rel=1e-6)
    shared.reset(dataclasses.replace(shared.options, objective="distill"))
    assert shared.measure()[0] == pytest.approx(teachers[0], rel=1e-6)
    assert shared.measure(model=shared.model) == shared.measure()
    with pytest.raises(ValueError, match="objective distill needs the experts' answers"):
        direct.reset(dataclasses.replace(direct.options, objective="distill"))
    with pytest.raises(ValueError, match="variant can only be set by prepare"):
        shared.reset(dataclasses.replace(shared.options, variant="cart"))
