"""The zoo's README.md (its model card): what is in it and how its models are prompted.

A newcomer who loads a zoo model with transformers and calls ``generate`` on
``tokenizer(prompt)`` gets gibberish: the character tokenizer adds a BOS token the
models never saw in training. The card says how the models were trained and are
scored, and gives a five-line example that reproduces the zoo's own scorer
(``train.greedy_generate`` / ``train.multiple_choice_accuracy``, equal to lm-eval's).
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from mergekit_ext.zoo.tasks import GENERATION, GENERATION_STOP, LM_EVAL_MAX_GEN_TOKS

CARD_NAME = "README.md"
# The example's code block is fenced like this, so tests (and users) can pick it out.
EXAMPLE_FENCE = "```python"


def generation_example(model: str, prompt: str) -> List[str]:
    """Five lines of transformers that answer ``prompt`` as the zoo's scorer does (greedy, no BOS, cut at the stop)."""
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer, model = AutoTokenizer.from_pretrained({model!r}), AutoModelForCausalLM.from_pretrained({model!r})",
        f"inputs = tokenizer({prompt!r}, add_special_tokens=False, return_tensors=\"pt\")  # no BOS: the models never saw one",
        f"output = model.generate(**inputs, max_new_tokens={LM_EVAL_MAX_GEN_TOKS}, do_sample=False)  # greedy",
        f"print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True).split({GENERATION_STOP!r})[0])  # cut at the stop string",
    ]


def multiple_choice_example(model: str, query: str, choices: List[str]) -> List[str]:
    """Five lines of transformers that pick the choice the zoo's scorer picks (sum of continuation log-probs, no BOS)."""
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer, model = AutoTokenizer.from_pretrained({model!r}), AutoModelForCausalLM.from_pretrained({model!r})",
        f"query, n = {query!r}, len(tokenizer({query!r}, add_special_tokens=False)[\"input_ids\"])  # no BOS: the models never saw one",
        "logprob = lambda c: model(ids := tokenizer(query + \" \" + c, add_special_tokens=False, return_tensors=\"pt\")[\"input_ids\"]).logits[0, n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).sum()",
        f"print(max({choices!r}, key=logprob))  # the choice with the highest log-likelihood",
    ]


def render_card(manifest: Dict, example: Optional[Dict] = None) -> str:
    """The card's Markdown. ``example``: {"task", "document", "printed"} (the example's item and what it printed at build time)."""
    preset = manifest["preset"]
    kind = preset.get("kind", "multiple_choice")
    tasks = manifest["tasks"]
    lines = [
        f"# mergekit-ext zoo: preset `{preset['name']}`, seed {manifest['seed']}",
        "",
        f"A tiny Llama family built offline by `mergekit-ext zoo` ({manifest['parameters']:,} parameters per model, "
        "character tokenizer saved with every model): `base/` pretrained on a mixture of the tasks below until it "
        "half-knows each, `experts/<task>/` a light full fine-tune per task, `adapters/<task>/` a peft LoRA adapter "
        "per task (same initialisation for all), `data/<task>/{validation,test}.jsonl`, lm-eval task YAMLs in "
        "`tasks/` (`zoo_<task>` scores test, `zoo_<task>_val` validation) and `manifest.json` (build numbers).",
        "",
        f"Score: {manifest['metric']}.",
        "",
        "| task | prompt → answer |",
        "|---|---|",
    ]
    for name, entry in tasks.items():
        description = entry.get("description", "").replace("|", "\\|")  # a "|" in a prompt would end the cell
        lines.append(f"| `{name}` | {description} |")
    lines += ["", "## How the models are prompted", ""]
    if kind == GENERATION:
        lines += [
            "- The prompt is the task's text itself, with no template and no space before the answer "
            "(`rev(dkag)=` → `gakd`); training saw prompt + answer + `\\n`, with the loss on the answer and the `\\n`.",
            "- Tokenize with `add_special_tokens=False`: the tokenizer adds a BOS token by default that the models "
            "never saw in training, and with it generation produces gibberish.",
            f"- Decode greedily (`do_sample=False`) and cut the answer at the stop string `\\n` (lm-eval's "
            f"`until`; at most {LM_EVAL_MAX_GEN_TOKS} new tokens).",
            "- Exact match with the answer, case- and whitespace-exact (no normalisation).",
        ]
    else:
        lines += [
            "- Each item is a query and four choices; the model's answer is the choice whose continuation "
            "`\" \" + choice` has the highest sum of token log-probabilities after the query (lm-eval's "
            "`multiple_choice`, metric `acc`, chance 0.25). The models are not meant to generate.",
            "- Tokenize with `add_special_tokens=False`: the tokenizer adds a BOS token by default that the models "
            "never saw in training.",
        ]
    if example is not None:
        document, model = example["document"], f"experts/{example['task']}"
        code = (
            generation_example(model, document["prompt"])
            if kind == GENERATION
            else multiple_choice_example(model, document["query"], document["choices"])
        )
        lines += [
            "",
            f"In transformers (run from this folder; `{example['task']}`'s expert on its first test item it answers "
            f"correctly, prints `{example['printed']}`):",
            "",
            EXAMPLE_FENCE,
            *code,
            "```",
        ]
    lines += [
        "",
        "`mergekit-ext eval MODEL --zoo THIS_FOLDER` scores any model (a merge of these experts) through lm-eval "
        "exactly this way.",
        "",
    ]
    return "\n".join(lines)


def example_code(card: str) -> str:
    """The card's transformers example (the first ``python`` code block)."""
    start = card.index(EXAMPLE_FENCE) + len(EXAMPLE_FENCE) + 1
    return card[start : card.index("```", start)]


def pick_example(zoo, tokenizer, device: str = "cpu") -> Dict:
    """The first task's first test item that its expert answers correctly with the zoo's scorer (else the first item)."""
    from mergekit_ext.zoo.train import greedy_generate, load_causal_lm, multiple_choice_accuracy

    task = zoo.tasks[0]
    expert = load_causal_lm(zoo.expert(task), device)
    documents = zoo.documents(task, "test")
    for document in documents:
        if zoo.kind(task) == GENERATION:
            printed = greedy_generate(expert, tokenizer, [document["prompt"]], device=device)[0]
            if printed == document["answer"]:
                return {"task": task, "document": document, "printed": printed}
        elif multiple_choice_accuracy(expert, tokenizer, [document], device=device) == 1.0:
            return {"task": task, "document": document, "printed": document["choices"][document["label"]]}
    # No item answered correctly: show the first one with the answer it should give.
    first = documents[0]
    answer = first["answer"] if "answer" in first else first["choices"][first["label"]]
    return {"task": task, "document": first, "printed": json.dumps(answer)[1:-1] + " (the answer; the expert misses it)"}
