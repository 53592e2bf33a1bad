"""AdaRank's learner on chat models: plain prompts posed through the tokenizer's chat template
(on by default when it has one) and greedy teacher answers that end at the end-of-turn token."""

from __future__ import annotations

import pytest
import torch
from conftest import invoke

from mergekit_ext.methods.adarank.format import open_learned_file
from mergekit_ext.methods.adarank.learn import LearnOptions, chat_prompts, end_of_turn_ids, prepare
from mergekit_ext.modeling import char_tokenizer, chat_tokenizer, llama_config, random_model, save_model

PROMPTS = ["abc = ", "cab = ", "bca = ", "acb = "]


def _scripted(tokenizer, hidden=128):
    """A real one-layer Llama whose greedy next token depends only on the current one: the
    layer's outputs are zero, the embedding is one-hot, and the head maps "\\n" and " " to "x",
    "x" to <|im_end|> and <|im_end|> to "y" (everything else: all-zero logits, token 0)."""
    model = random_model(llama_config(len(tokenizer), hidden_size=hidden, layers=1, intermediate_size=16), seed=0)
    ids = tokenizer.convert_tokens_to_ids
    script = {ids("\n"): ids("x"), ids(" "): ids("x"), ids("x"): ids("<|im_end|>"), ids("<|im_end|>"): ids("y")}
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), hidden))
        model.lm_head.weight.zero_()
        for token, following in script.items():
            model.lm_head.weight[following, token] = 1.0
    return model


@pytest.fixture(scope="module")
def chat_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = chat_tokenizer()
    expert = _scripted(tokenizer)
    base = random_model(expert.config, seed=1)
    return {
        "base": save_model(base, root / "base", tokenizer),
        "ft0": save_model(expert, root / "ft0", tokenizer),
        "ft1": save_model(expert, root / "ft1", tokenizer),
        "tokenizer": tokenizer,
    }


def _setup(family, **options):
    options.setdefault("objective", "distill")
    return prepare(
        [family["ft0"], family["ft1"]], [PROMPTS, PROMPTS], base=family["base"],
        options=LearnOptions(variant="ta", steps=0, batch_size=2, max_new_tokens=6, **options), progress=False,
    )  # fmt: skip


def test_end_of_turn_is_the_templates_closing_special_token():
    tokenizer = chat_tokenizer()
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert chat_prompts(tokenizer, ["ab"]) == ["<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"]
    # a rendered conversation (a chat zoo's stored prompt: system, example turns) is not wrapped again
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompts(tokenizer, [rendered, "ab"]) == [rendered, chat_prompts(tokenizer, ["ab"])[0]]
    plain = char_tokenizer()
    plain.chat_template = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(plain) == []  # turns closed by plain text: EOS alone ends answers


def test_teacher_answers_are_posed_as_chat_and_stop_at_end_of_turn(chat_family):
    tokenizer = chat_family["tokenizer"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    setup = _setup(chat_family)  # the tokenizer has a template: on by default
    assert setup.options.chat_template and end in setup.stop_ids
    items = setup.train_pools[0] + setup.held_out_pools[0]
    for item in items:
        prompt = tokenizer.decode(item.sequence.ids[: item.sequence.start])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert item.sequence.answer == [tokenizer.convert_tokens_to_ids("x"), end]  # stopped at <|im_end|>
    # Raw prompts: the answer starts after the prompt's space and runs past <|im_end|> (no stop there).
    raw = _setup(chat_family, chat_template=False)
    assert not raw.options.chat_template and end not in raw.stop_ids
    answer = raw.train_pools[0][0].sequence.answer
    assert answer[:3] == [tokenizer.convert_tokens_to_ids(token) for token in ("x", "<|im_end|>", "y")] and len(answer) == 6


def test_chat_template_requested_without_one_is_refused(tmp_path):
    tokenizer = char_tokenizer()
    model = random_model(llama_config(len(tokenizer), layers=1), seed=0)
    family = {name: save_model(model, tmp_path / name, tokenizer) for name in ("base", "ft0", "ft1")}
    with pytest.raises(ValueError, match="has no chat template"):
        _setup(family, chat_template=True, objective="entropy")
    assert not _setup(family, objective="entropy").options.chat_template  # default: off without one


def test_cli_records_the_choice(chat_family, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for flag, expected in (("--chat-template", True), ("--no-chat-template", False)):
        file = tmp_path / f"{flag}.safetensors"
        result = invoke(
            "adarank", "learn", chat_family["ft0"], chat_family["ft1"], "--base", chat_family["base"], "--prompts", prompts,
            "--out", file, "--variant", "ta", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", flag, "--quiet",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        training = open_learned_file(file).info["training"]
        assert training["chat_template"] is expected
        assert (chat_family["tokenizer"].convert_tokens_to_ids("<|im_end|>") in training["stop_token_ids"]) is expected
