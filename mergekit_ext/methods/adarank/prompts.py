"""The learner's prompts: read from a file or a zoo, posed through a chat template, tokenised;
and the tokens where a greedy answer ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from mergekit_ext import io

# lm-eval puts this between a multiple-choice context and its continuation, so
# the zoo's answer starts after "query ".
ZOO_TARGET_DELIMITER = " "
MAX_PROMPT_CHARS = 4096


def read_prompts(path: str | os.PathLike) -> List[str]:
    """Prompts from a file: JSONL (a string, or an object's "prompt", "query" or "text") or plain text, one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".jsonl":
        prompts = []
        for number, item in enumerate(io.read_jsonl(path), 1):
            if isinstance(item, dict):
                item = next((item[key] for key in ("prompt", "query", "text") if key in item), None)
            if not isinstance(item, str):
                raise ValueError(f'{path}:{number}: expected a string or an object with "prompt", "query" or "text"')
            prompts.append(item)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:  # attention memory grows with the square of the length
            raise ValueError(f"{path}: prompt {number} has {len(prompt):,} characters; AdaRank learns from short prompts (at most {MAX_PROMPT_CHARS:,})")
    return prompts

def zoo_prompts(zoo, task: str, split: str = "validation", unlabeled: int = 0) -> List[str]:
    """A zoo task's prompts (never its answers): a generation task's ``prompt``, or a
    multiple-choice ``query`` followed by lm-eval's target delimiter (where the answer starts);
    then ``unlabeled`` more from the task's generator, none of them a validation or test prompt."""
    documents = zoo.documents(task, split) + (zoo.unlabeled_documents(task, unlabeled) if unlabeled else [])
    return [
        document["prompt"] if "prompt" in document else document["query"] + ZOO_TARGET_DELIMITER
        for document in documents
    ]


def stop_token_ids(tokenizer, stop: Optional[str]) -> List[int]:
    """EOS and, when ``stop`` is one token, that token: where a greedy answer ends."""
    ids = set()
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if stop:
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def chat_template_of(tokenizer) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def chat_prompts(tokenizer, prompts: Sequence[str]) -> List[str]:
    """Each prompt as one user turn followed by the assistant's generation prompt (the text
    ``lm_eval --apply_chat_template`` sends); the template writes any BOS itself. A prompt that
    already ends with the assistant's generation prompt (a chat zoo's stored prompts, with their
    system message and example turns) is already a rendered conversation and is kept as is."""
    opening = _generation_prompt(tokenizer)
    return [
        prompt
        if opening and prompt.endswith(opening)
        else tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]


def _generation_prompt(tokenizer) -> str:
    """The text the template appends to open the assistant's turn (``<|im_start|>assistant\n``), or ""."""
    turn = [{"role": "user", "content": "question"}]
    with_opening = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
    return with_opening[len(without):] if with_opening.startswith(without) else ""


def end_of_turn_ids(tokenizer) -> List[int]:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, …): the first token after a rendered answer, when it is
    a special token; [] when the template closes turns with plain text only."""
    marker = "\u2063answer\u2063"  # text no template rewrites
    conversation = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses this conversation: EOS alone ends answers
        return []
    if marker not in rendered:
        return []
    after = rendered.split(marker, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
    return [ids[0]] if ids and ids[0] in special else []


def encode(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> List[List[int]]:
    """Token ids of each prompt; prompts that encode to nothing are dropped."""
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [ids for ids in encoded if ids]


def answer_stop_ids(tokenizer, stop: Optional[str], *, chat_template: bool) -> List[int]:
    """The tokens a greedy answer ends at: EOS and ``stop`` (when one token), or with a chat
    template EOS and the template's end-of-turn token (a chat answer may span lines)."""
    if chat_template:
        return sorted(set(stop_token_ids(tokenizer, None)) | set(end_of_turn_ids(tokenizer)))
    return stop_token_ids(tokenizer, stop)


def encode_pools(tokenizer, pools: Sequence[Sequence[str]], task_names: Sequence[str], *, chat_template: bool, add_special_tokens: bool) -> List[List[List[int]]]:
    """Each task's non-empty prompts as token ids, posed through the chat template when asked
    (the template writes any special tokens itself)."""
    encoded = []
    for name, pool in zip(task_names, pools):
        pool = [prompt for prompt in pool if prompt]
        if chat_template:
            pool = chat_prompts(tokenizer, pool)
        ids = encode(tokenizer, pool, add_special_tokens and not chat_template)
        if not ids:
            raise ValueError(f"adarank: no non-empty prompts for {name}")
        encoded.append(ids)
    return encoded
