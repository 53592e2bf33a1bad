"""The demo zoo: the `test` preset builds, caches, reloads its tokenizer and has real experts."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from conftest import load_model

from mergekit_ext.zoo import (
    PRESETS,
    TASKS,
    ZooError,
    build_zoo,
    load_zoo,
    make_document,
    multiple_choice_accuracy,
)
from mergekit_ext.zoo import format as zoo_format


@pytest.mark.slow
def test_zoo_layout_and_manifest(test_zoo):
    manifest = json.loads((test_zoo.root / "manifest.json").read_text())
    assert manifest["format"] == zoo_format.ZOO_FORMAT
    assert len(test_zoo.tasks) >= 4
    assert (test_zoo.base / "config.json").is_file()
    for task in test_zoo.tasks:
        assert (test_zoo.expert(task) / "model.safetensors").is_file()
        assert (test_zoo.adapter(task) / "adapter_config.json").is_file()
        for split in ("validation", "test"):
            documents = test_zoo.documents(task, split)
            assert documents and all(0 <= d["label"] < len(d["choices"]) for d in documents)
        # lm-eval task YAML with absolute data paths for both splits.
        config = yaml.safe_load((test_zoo.task_dir / f"zoo_{task}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        assert config["dataset_path"] == "json" and config["test_split"] == "test"
        assert all(p.startswith("/") and open(p).readline() for p in files.values())
        assert yaml.safe_load((test_zoo.task_dir / f"zoo_{task}_val.yaml").read_text())["test_split"] == "validation"
    # Held-out queries are disjoint between validation and test.
    for task in test_zoo.tasks:
        validation = {d["query"] for d in test_zoo.documents(task, "validation")}
        assert not validation & {d["query"] for d in test_zoo.documents(task, "test")}


@pytest.mark.slow
def test_rebuild_is_a_no_op(test_zoo):
    manifest = test_zoo.root / "manifest.json"
    before = manifest.stat().st_mtime_ns, (test_zoo.base / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = build_zoo(test_zoo.root, preset="test", progress=False)
    assert time.perf_counter() - started < 5
    assert again.manifest == test_zoo.manifest
    assert (manifest.stat().st_mtime_ns, (test_zoo.base / "model.safetensors").stat().st_mtime_ns) == before


@pytest.mark.slow
def test_refuses_other_zoo_or_foreign_folder(test_zoo, tmp_path):
    with pytest.raises(ZooError, match="different zoo"):
        build_zoo(test_zoo.root, preset="demo", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ZooError, match="not a zoo"):
        build_zoo(foreign, preset="test", progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ZooError, match="unknown zoo preset"):
        build_zoo(tmp_path / "x", preset="huge")
    with pytest.raises(ZooError, match="not a built zoo"):
        load_zoo(tmp_path / "x")


def test_documents_are_deterministic_and_well_formed():
    import random

    for task in TASKS.values():
        first = [make_document(task, random.Random(7)) for _ in range(3)]
        assert first == [make_document(task, random.Random(7)) for _ in range(3)]
        for _ in range(50):
            document = make_document(task, random.Random(_))
            assert len(set(document["choices"])) == 4
    assert len(PRESETS["bench"].tasks) == 8 and len(PRESETS["demo"].tasks) >= 4


@pytest.mark.slow
def test_tokenizer_round_trip(test_zoo):
    """AutoTokenizer reloads the saved tokenizer as the same tokenizer (no silent re-tokenization)."""
    from transformers import AutoTokenizer

    from mergekit_ext.modeling import char_tokenizer

    original = char_tokenizer()
    for folder in (test_zoo.base, test_zoo.expert(test_zoo.tasks[0]), test_zoo.adapter(test_zoo.tasks[0])):
        reloaded = AutoTokenizer.from_pretrained(str(folder))
        assert reloaded.get_vocab() == original.get_vocab()
        for task in test_zoo.tasks:
            for document in test_zoo.documents(task, "test")[:10]:
                text = document["query"] + " " + document["choices"][0]
                ids = reloaded(text)["input_ids"]
                assert ids == original(text)["input_ids"]
                assert len(ids) == len(text)  # one token per character, no BOS added
                assert reloaded.decode(ids) == text
        assert reloaded.pad_token_id == 0 and reloaded.eos_token == "</s>"


@pytest.mark.slow
def test_experts_beat_base_on_their_own_task(test_zoo):
    """Recomputed from the saved folders, not read from the manifest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(test_zoo.base))
    base = load_model(test_zoo.base)
    gains = {}
    for task in test_zoo.tasks:
        documents = test_zoo.documents(task, "test")
        base_accuracy = multiple_choice_accuracy(base, tokenizer, documents)
        expert_accuracy = multiple_choice_accuracy(load_model(test_zoo.expert(task)), tokenizer, documents)
        assert expert_accuracy == pytest.approx(test_zoo.manifest["metrics"]["experts"][task][task]["test"])
        assert base_accuracy == pytest.approx(test_zoo.manifest["metrics"]["base"][task]["test"])
        gains[task] = expert_accuracy - base_accuracy
    # The test preset trains for seconds (measured: +0.17 to +0.32 on 60 items); the demo preset's gains are +0.2 to +0.35.
    assert all(gain > 0.1 for gain in gains.values()), gains
    assert sum(gains.values()) / len(gains) > 0.15, gains


@pytest.mark.slow
def test_lora_adapters_load_with_peft_and_match_recorded_accuracy(test_zoo):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(test_zoo.base))
    config = json.loads((test_zoo.adapter(test_zoo.tasks[0]) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(test_zoo.base)
    lora_b = []
    for task in test_zoo.tasks[:2]:
        model = PeftModel.from_pretrained(load_model(test_zoo.base), str(test_zoo.adapter(task))).eval()
        accuracy = multiple_choice_accuracy(model, tokenizer, test_zoo.documents(task, "test"))
        assert accuracy == pytest.approx(test_zoo.manifest["metrics"]["adapters"][task]["test"])
        lora_b.append({k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k})
    # Trained adapters differ from each other and from the zero init.
    assert any(v.abs().sum() > 0 for v in lora_b[0].values())
    assert any(not torch.equal(lora_b[0][k], lora_b[1][k]) for k in lora_b[0])


@pytest.mark.slow
def test_task_arithmetic_at_recorded_lambda_is_reproducible(test_zoo):
    """The build's TA numbers come from mergekit's engine; recompute one independently."""
    from transformers import AutoTokenizer

    from mergekit_ext.modeling import load_state_dict

    tokenizer = AutoTokenizer.from_pretrained(str(test_zoo.base))
    scale = test_zoo.manifest["metrics"]["task_arithmetic"]["lambda"]
    base_state = load_state_dict(test_zoo.base)
    experts = [load_state_dict(test_zoo.expert(task)) for task in test_zoo.tasks]
    merged = {name: tensor + scale * sum(e[name] - tensor for e in experts) for name, tensor in base_state.items()}
    model = load_model(test_zoo.base)
    model.load_state_dict(merged)
    task = test_zoo.tasks[0]
    recorded = test_zoo.manifest["metrics"]["task_arithmetic"]["grid"][f"{scale:g}"][task]["test"]
    assert multiple_choice_accuracy(model, tokenizer, test_zoo.documents(task, "test")) == pytest.approx(recorded)


@pytest.mark.slow
def test_zoo_command_on_a_built_zoo_prints_the_build_report(test_zoo):
    from click.testing import CliRunner

    from mergekit_ext.cli import main

    result = CliRunner().invoke(main, ["zoo", str(test_zoo.root), "--preset", "test", "--quiet"])
    assert result.exit_code == 0, result.output
    for word in ("base", "expert", "LoRA", "TA", *test_zoo.tasks):
        assert word in result.output
    assert CliRunner().invoke(main, ["zoo", "--help"]).exit_code == 0
    refused = CliRunner().invoke(main, ["zoo", str(test_zoo.root), "--preset", "demo", "--quiet"])
    assert refused.exit_code != 0 and "different zoo" in refused.output


@pytest.mark.slow
def test_moved_zoo_rewrites_its_task_yamls(test_zoo, tmp_path):
    import shutil

    moved = tmp_path / "moved-zoo"
    shutil.copytree(test_zoo.root, moved, ignore=shutil.ignore_patterns("evals"))
    zoo = load_zoo(moved)
    assert zoo.base == moved / "base"
    files = yaml.safe_load((zoo.task_dir / f"zoo_{zoo.tasks[0]}.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert all(path.startswith(str(moved)) for path in files.values())
    # The original zoo is untouched.
    original = yaml.safe_load((test_zoo.task_dir / f"zoo_{zoo.tasks[0]}.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert all(path.startswith(str(test_zoo.root)) for path in original.values())


@pytest.mark.slow
def test_a_manifest_of_another_format_is_refused_by_name(test_zoo, tmp_path):
    import shutil

    old = tmp_path / "old-zoo"
    shutil.copytree(test_zoo.root, old, ignore=shutil.ignore_patterns("evals"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "mergekit-ext-zoo/1"  # a pre-release format string
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match="manifest.json is not a mergekit-ext/zoo/1 manifest"):
        load_zoo(old)


# --------------------------------------------------------------------------
# The generation preset (`hard`) at test size: `hard-test`.


@pytest.fixture(scope="module")
def hard_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "zoo-hard-test", preset="hard-test", progress=False)


def _weight_hashes(root):
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*.safetensors"))}


def test_generation_tasks_are_deterministic_distinct_and_well_formed():
    import random

    from mergekit_ext.zoo.tasks import (
        GENERATION_STOP,
        GENERATION_TASKS,
        HARD_ALPHABET,
        MAX_ANSWER,
        make_item,
        training_pair,
    )

    assert len(GENERATION_TASKS) >= 8 and PRESETS["hard"].tasks == tuple(GENERATION_TASKS)
    prompts_alphabets = {}
    for task in GENERATION_TASKS.values():
        assert [make_item(task, random.Random(3)) for _ in range(2)] == [make_item(task, random.Random(3)) for _ in range(2)]
        rng = random.Random(0)
        documents = [make_item(task, rng) for _ in range(200)]
        for document in documents:
            assert set(document) == {"prompt", "answer"}
            assert 1 <= len(document["answer"]) <= MAX_ANSWER and GENERATION_STOP not in document["answer"]
            assert set(document["prompt"] + document["answer"]) <= set(HARD_ALPHABET)
        context, continuation = training_pair(task, random.Random(1))
        assert continuation.endswith(GENERATION_STOP) and not continuation.startswith(" ")
        # distinct input formats: the first characters of the prompt name the task
        prompts_alphabets[task.name] = {d["prompt"][:2] for d in documents}
    formats = list(prompts_alphabets.values())
    assert all(not (a & b) for i, a in enumerate(formats) for b in formats[i + 1 :]), prompts_alphabets


@pytest.mark.slow
def test_hard_preset_builds_with_generation_yamls(hard_zoo):
    manifest = hard_zoo.manifest
    assert manifest["format"] == zoo_format.ZOO_FORMAT  # unchanged format string, the kind is recorded per task
    assert manifest["preset"]["kind"] == "generation" and hard_zoo.task_kind == "generation"
    assert hard_zoo.metric == "exact_match,none" and hard_zoo.chance is None
    for task in hard_zoo.tasks:
        entry = manifest["tasks"][task]
        assert entry["kind"] == "generation" and entry["metric"] == "exact_match"
        config = yaml.safe_load((hard_zoo.task_dir / f"zoo_{task}.yaml").read_text())
        assert config["output_type"] == "generate_until"
        assert config["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 16}
        assert config["target_delimiter"] == "" and config["doc_to_text"] == "{{prompt}}"
        assert config["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": False, "ignore_punctuation": False}]
        validation = {d["prompt"] for d in hard_zoo.documents(task, "validation")}
        assert validation and not validation & {d["prompt"] for d in hard_zoo.documents(task, "test")}
    # the tokenizer has the hard alphabet (the dup/mirror symbols are real tokens, not <unk>)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hard_zoo.base))
    assert tokenizer.unk_token_id not in tokenizer("dup{@$%}:@@$$%%\n", add_special_tokens=False)["input_ids"]
    # an old multiple-choice manifest (no kind fields) still reads as multiple choice
    assert PRESETS["demo"].kind == "multiple_choice"


@pytest.mark.slow
def test_hard_tasks_score_through_lm_eval_generation_path(hard_zoo):
    """lm-eval's generate_until exact_match equals the in-process greedy scorer, per (model, task)."""
    from transformers import AutoTokenizer

    from mergekit_ext.evaluate import lm_eval_results
    from mergekit_ext.zoo import exact_match, greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(str(hard_zoo.base))
    tasks = [hard_zoo.lm_eval_task(t) for t in hard_zoo.tasks]
    nonzero = 0
    for path in (hard_zoo.base, hard_zoo.expert(hard_zoo.tasks[0])):
        results = lm_eval_results(path, tasks, hard_zoo.task_dir)
        model = load_model(path)
        for task, lm_task in zip(hard_zoo.tasks, tasks):
            documents = hard_zoo.documents(task, "test")
            assert results[lm_task]["n-samples"]["effective"] == len(documents)
            ours = exact_match(model, tokenizer, documents)
            assert results[lm_task]["exact_match,none"] == pytest.approx(ours), (path.name, task)
            nonzero += ours > 0
    assert nonzero >= 3  # the comparison is not vacuous
    # the grouped, cached greedy decoding equals transformers' own unbatched greedy generate
    model = load_model(hard_zoo.expert(hard_zoo.tasks[0]))
    prompts = [d["prompt"] for d in hard_zoo.documents(hard_zoo.tasks[0], "test")[:6]]
    ours = greedy_generate(model, tokenizer, prompts)
    for prompt, text in zip(prompts, ours):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=9, do_sample=False, pad_token_id=0)
        theirs = tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).split("\n")[0]
        assert text == theirs


@pytest.mark.slow
def test_exact_match_is_case_and_whitespace_exact_as_configured(hard_zoo):
    """The task YAML's exact_match, run through lm-eval's own task object, and the in-process scorer agree on near misses."""
    from lm_eval.tasks import TaskManager, get_task_dict

    # a task whose answers have letters, so that the upper-cased answer is a near miss
    task, document = next((t, d) for t in hard_zoo.tasks for d in hard_zoo.documents(t, "test") if d["answer"].upper() != d["answer"])
    name = hard_zoo.lm_eval_task(task)
    manager = TaskManager(include_path=str(hard_zoo.task_dir), include_defaults=False)
    lm_task = manager.load([name])["tasks"][name] if hasattr(manager, "load") else get_task_dict([name], manager)[name]
    answer = document["answer"]
    assert lm_task.process_results(document, [answer]) == {"exact_match": 1.0}
    for near_miss in (answer.upper(), answer + " ", " " + answer, answer + "\t", answer[:-1]):
        assert near_miss != answer
        assert lm_task.process_results(document, [near_miss]) == {"exact_match": 0.0}, repr(near_miss)


@pytest.mark.slow
def test_hard_build_is_deterministic_and_reports_exact_match(hard_zoo, tmp_path):
    again = build_zoo(tmp_path / "again", preset="hard-test", progress=False)
    assert _weight_hashes(again.root) == _weight_hashes(hard_zoo.root)
    assert len(_weight_hashes(hard_zoo.root)) == 1 + 2 * len(hard_zoo.tasks)
    assert again.manifest["metrics"]["base"] == hard_zoo.manifest["metrics"]["base"]
    from mergekit_ext.zoo import format_build_report

    report = format_build_report(hard_zoo)
    for word in ("exact match", "base", "expert", "LoRA", "TA", "gain-normalized", "regime", *hard_zoo.tasks):
        assert word in report
    # a different seed is a different, independent zoo
    other = build_zoo(tmp_path / "seed1", preset="hard-test", seed=1, progress=False)
    assert _weight_hashes(other.root)["base/model.safetensors"] != _weight_hashes(hard_zoo.root)["base/model.safetensors"]


@pytest.mark.slow
def test_compare_on_hard_zoo_reports_exact_match_without_chance(hard_zoo, tmp_path):
    from mergekit_ext.evaluate import compare_on_zoo, format_table, write_report

    report = compare_on_zoo(hard_zoo.root, {"ft": hard_zoo.expert(hard_zoo.tasks[0])}, progress=False)
    assert report["metric"] == "exact_match,none" and report["chance"] is None
    task = hard_zoo.tasks[0]
    assert report["models"]["ft"]["accuracy"][task] == pytest.approx(hard_zoo.manifest["metrics"]["experts"][task][task]["test"])
    assert report["models"]["ft"]["stderr"]  # lm-eval's exact_match_stderr
    assert "exact match" in format_table(report).splitlines()[0]
    paths = write_report(report, tmp_path / "r")
    assert paths["chart"].stat().st_size > 0


@pytest.mark.slow  # builds two zoos
@pytest.mark.parametrize("zoo_fixture", ["test_zoo", "hard_zoo"])
def test_unlabeled_documents_are_fresh_and_reproducible(zoo_fixture, request):
    """`adarank learn --zoo --unlabeled N`: N generator prompts per task, none of them a
    validation or test prompt, none repeated, the same ones on every load of the zoo."""
    from mergekit_ext.methods.adarank.learn import zoo_prompts
    from mergekit_ext.zoo.tasks import TASKS_BY_KIND, document_key

    zoo = load_zoo(request.getfixturevalue(zoo_fixture).root)
    for task in zoo.tasks:
        generator = TASKS_BY_KIND[zoo.kind(task)][task]
        drawn = zoo.unlabeled_documents(task, 40)
        keys = [document_key(generator, document) for document in drawn]
        held_out = {document_key(generator, doc) for split in ("validation", "test") for doc in zoo.documents(task, split)}
        assert len(keys) == 40 and len(set(keys)) == 40 and not held_out & set(keys)
        assert drawn == load_zoo(zoo.root).unlabeled_documents(task, 40)
        prompts = zoo_prompts(zoo, task, unlabeled=40)
        assert prompts[: len(zoo.documents(task, "validation"))] == zoo_prompts(zoo, task)
        assert len(prompts) == len(zoo.documents(task, "validation")) + 40
