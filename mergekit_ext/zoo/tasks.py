"""The zoo's tasks: seeded generators of lm-eval documents (query, choices, label).

Tasks use distinct prompt formats and alphabets (DESIGN.md, "What makes a zoo that
can judge merges"), because tasks that share one format conflict so strongly that
every merge scores below the base.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"


# --------------------------------------------------------------------------
# Tasks: each item is (query, correct answer, three distractors).

Item = Tuple[str, str, List[str]]


@dataclass(frozen=True)
class ZooTask:
    name: str
    description: str
    make: Callable[[random.Random], Item]


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _distinct(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.sample(alphabet, rng.randint(low, high)))


def _shift(text: str, alphabet: str, offset: int) -> str:
    return "".join(alphabet[(alphabet.index(c) + offset) % len(alphabet)] for c in text)


def _swap_adjacent(rng: random.Random, text: str) -> str:
    position = rng.randrange(len(text) - 1)
    return text[:position] + text[position + 1] + text[position] + text[position + 2 :]


def _replace_one(rng: random.Random, text: str, alphabet: str) -> str:
    position = rng.randrange(len(text))
    replacement = rng.choice([c for c in alphabet if c not in text])
    return text[:position] + replacement + text[position + 1 :]


# Distractors are near misses (one position wrong), so a model that half knows
# a task scores well above chance but well below an expert.


def _reverse(rng: random.Random) -> Item:
    text = _distinct(rng, LOWER, 3, 5)
    answer = text[::-1]
    return f"rev({text}) =", answer, [_swap_adjacent(rng, answer), _swap_adjacent(rng, answer), _replace_one(rng, answer, LOWER)]


def _sort(rng: random.Random) -> Item:
    text = _distinct(rng, DIGITS, 5, 7)
    answer = "".join(sorted(text))
    distractors = [_swap_adjacent(rng, answer)]
    while len(distractors) < 3:
        distractors.append("".join(sorted(_replace_one(rng, text, DIGITS))))
    return f"sort[{text}] ->", answer, distractors


def _duplicate(rng: random.Random) -> Item:
    # Distractors double a near miss of the input, so every choice has the doubled shape.
    text = _distinct(rng, DIGITS, 4, 6)

    def doubled(word: str) -> str:
        return "".join(c + c for c in word)

    return f"dup[{text}] ->", doubled(text), [doubled(_swap_adjacent(rng, text)), doubled(_replace_one(rng, text, DIGITS)), doubled(text[::-1])]


def _next_letter(rng: random.Random) -> Item:
    text = _word(rng, UPPER, 4, 7)
    answer = _shift(text, UPPER, 1)

    def one_off() -> str:
        position = rng.randrange(len(text))
        return answer[:position] + _shift(text[position], UPPER, rng.choice((0, 2, -1))) + answer[position + 1 :]

    return f"NEXT {text} :", answer, [one_off(), one_off(), one_off()]


def _count_hashes(rng: random.Random) -> Item:
    text = _word(rng, "#+*", 10, 16)
    count = min(text.count("#"), 9)
    text = text if text.count("#") <= 9 else text.replace("#", "+", text.count("#") - 9)
    wrong = [value for value in (count + 1, count - 1, count + 2, count - 2, count + 3) if 0 <= value <= 9]
    return f"#?{text}|", str(count), [str(value) for value in wrong[:3]]


def _lower_case(rng: random.Random) -> Item:
    text = _distinct(rng, UPPER, 3, 6)
    answer = text.lower()
    return f"low<{text}> =", answer, [text, answer[::-1], _shift(answer, LOWER, 1)]


def _max_digit(rng: random.Random) -> Item:
    text = _distinct(rng, DIGITS, 4, 7)
    values = sorted(text)
    distractors = [values[0], values[-2], values[len(values) // 2 - 1]]
    return f"max({text}) ?", values[-1], distractors


def _swap_pairs(rng: random.Random) -> Item:
    text = "".join(rng.sample(LOWER, 6))
    answer = "".join(text[i + 1] + text[i] for i in range(0, 6, 2))
    return f"swp/{text}/ =", answer, [text, text[::-1], answer[::-1]]


TASKS: Dict[str, ZooTask] = {
    task.name: task
    for task in (
        ZooTask("reverse", "reverse lowercase letters: rev(abcd) = dcba", _reverse),
        ZooTask("sort", "sort distinct digits: sort[3912] -> 1239", _sort),
        ZooTask("dup", "repeat every digit: dup[372] -> 337722", _duplicate),
        ZooTask("next", "shift uppercase letters by one: NEXT ABZ : BCA", _next_letter),
        ZooTask("count", "count the # among #+*: #?#+#*| 2", _count_hashes),
        ZooTask("lower", "lower-case distinct capitals: low<ABC> = abc", _lower_case),
        ZooTask("max", "largest digit: max(3817) ? 8", _max_digit),
        ZooTask("swap", "swap letters pairwise: swp/abcdef/ = badcfe", _swap_pairs),
    )
}


def make_document(task: ZooTask, rng: random.Random) -> Dict:
    """One lm-eval document: the answer sits at a seeded random position among the choices."""
    while True:
        query, answer, distractors = task.make(rng)
        choices = [answer] + distractors
        if len(set(choices)) == len(choices):
            break
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[i] for i in order]
    return {"query": query, "choices": shuffled, "label": shuffled.index(answer)}


# --------------------------------------------------------------------------
# Generation tasks (the `hard` preset): the model must greedily generate the
# answer followed by GENERATION_STOP; scored by exact match (lm-eval
# ``generate_until``, case- and whitespace-exact). Each task has its own prompt
# format and, as far as a ~90-character vocabulary allows, its own payload
# alphabet:
#
#   task    payload alphabet            prompt            answer
#   rev     lowercase a-m               rev(dkag)=        gakd
#   sort    digits (repeats, 4-7)       sort[39121]->     11239
#   next    uppercase A-L -> B-M        NEXT ABK:         BCL
#   count   # + *  -> digit             #?#+#*+|          2
#   swap    lowercase n-z (4 or 6)      swp/nopq/=        onqp
#   dup     @ $ % & ~ ^                 dup{@$%}:         @@$$%%
#   mirror  ( [ < {  -> closers         mir:<([           ])>
#   caps    uppercase N-Z -> n-z        low<NQZ>=         nqz

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
GENERATION_STOP = "\n"
MAX_ANSWER = 8  # characters; the in-process scorer generates MAX_ANSWER + 1 tokens (answer + stop)
LM_EVAL_MAX_GEN_TOKS = 16  # lm-eval's budget: larger than any answer, so a missing stop never matches
# The `hard` zoo's character vocabulary: the default one plus the dup/mirror/swap symbols.
HARD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 =:+-*<>|#.,?!()[]ABCDEFGHIJKLMNOPQRSTUVWXYZ\n" + "@$%&~^{}/;_"
_LOWER_A, _LOWER_N = "abcdefghijklm", "nopqrstuvwxyz"
_UPPER_A, _UPPER_N = "ABCDEFGHIJKLM", "NOPQRSTUVWXYZ"
_DUP_SYMBOLS = "@$%&~^"
_OPEN, _CLOSE = "([<{", ")]>}"

Pair = Tuple[str, str]  # (prompt, answer)


@dataclass(frozen=True)
class GenerationTask:
    """A task whose answer is generated: ``make(rng)`` returns (prompt, answer)."""

    name: str
    description: str
    make: Callable[[random.Random], Pair]
    kind = GENERATION


def _gen_reverse(rng: random.Random) -> Pair:
    text = _distinct(rng, _LOWER_A, 3, 6)
    return f"rev({text})=", text[::-1]


def _gen_sort(rng: random.Random) -> Pair:
    text = _word(rng, DIGITS, 4, 7)
    return f"sort[{text}]->", "".join(sorted(text))


def _gen_next(rng: random.Random) -> Pair:
    text = _word(rng, _UPPER_A[:-1], 3, 6)
    return f"NEXT {text}:", "".join(chr(ord(c) + 1) for c in text)


def _gen_count(rng: random.Random) -> Pair:
    hashes = rng.randint(0, 9)
    others = rng.randint(max(0, 8 - hashes), 14 - hashes)
    chars = ["#"] * hashes + [rng.choice("+*") for _ in range(others)]
    rng.shuffle(chars)
    return "#?" + "".join(chars) + "|", str(hashes)


def _gen_swap(rng: random.Random) -> Pair:
    text = "".join(rng.sample(_LOWER_N, rng.choice((4, 6))))
    return f"swp/{text}/=", "".join(text[i + 1] + text[i] for i in range(0, len(text), 2))


def _gen_dup(rng: random.Random) -> Pair:
    text = _word(rng, _DUP_SYMBOLS, 2, 4)
    return f"dup{{{text}}}:", "".join(c + c for c in text)


def _gen_mirror(rng: random.Random) -> Pair:
    text = _word(rng, _OPEN, 3, 6)
    return f"mir:{text}", "".join(_CLOSE[_OPEN.index(c)] for c in reversed(text))


def _gen_caps(rng: random.Random) -> Pair:
    text = _distinct(rng, _UPPER_N, 3, 6)
    return f"low<{text}>=", text.lower()


GENERATION_TASKS: Dict[str, GenerationTask] = {
    task.name: task
    for task in (
        GenerationTask("rev", "reverse distinct letters a-m: rev(dkag)= gakd", _gen_reverse),
        GenerationTask("sort", "sort 4-7 digits (repeats allowed): sort[39121]-> 11239", _gen_sort),
        GenerationTask("next", "shift capitals A-L by one: NEXT ABK: BCL", _gen_next),
        GenerationTask("count", "count the # among #+*: #?#+#*+| 2", _gen_count),
        GenerationTask("swap", "swap letters n-z pairwise: swp/nopq/= onqp", _gen_swap),
        GenerationTask("dup", "double every symbol of @$%&~^: dup{@$%}: @@$$%%", _gen_dup),
        GenerationTask("mirror", "close the brackets in reverse: mir:<([ ])>", _gen_mirror),
        GenerationTask("caps", "lower-case distinct capitals N-Z: low<NQZ>= nqz", _gen_caps),
    )
}

TASKS_BY_KIND = {MULTIPLE_CHOICE: TASKS, GENERATION: GENERATION_TASKS}


def task_kind(task) -> str:
    """``multiple_choice`` (ZooTask) or ``generation`` (GenerationTask)."""
    return getattr(task, "kind", MULTIPLE_CHOICE)


def make_generation_document(task: GenerationTask, rng: random.Random) -> Dict:
    """One lm-eval document of a generation task: ``{"prompt", "answer"}``."""
    prompt, answer = task.make(rng)
    if len(answer) > MAX_ANSWER or GENERATION_STOP in answer:
        raise AssertionError(f"{task.name}: answer {answer!r} breaks the generation format")
    return {"prompt": prompt, "answer": answer}


def make_item(task, rng: random.Random) -> Dict:
    """One held-out document of either kind."""
    return make_generation_document(task, rng) if task_kind(task) == GENERATION else make_document(task, rng)


def document_key(task, document: Dict) -> str:
    """The text the model is prompted with (what must never appear in training)."""
    return document["prompt"] if task_kind(task) == GENERATION else document["query"]


def draw_distinct(task, rng: random.Random, count: int, taken: set) -> List[Dict]:
    """Up to ``count`` documents whose prompts are not in ``taken`` and not repeated (each one
    drawn is added to ``taken``). Fewer only when the generator runs dry: 100·count + 1000
    draws are tried, and the caller says what that means."""
    drawn: List[Dict] = []
    for _ in range(100 * count + 1000):
        if len(drawn) == count:
            break
        document = make_item(task, rng)
        key = document_key(task, document)
        if key not in taken:
            taken.add(key)
            drawn.append(document)
    return drawn


def training_pair(task, rng: random.Random) -> Tuple[str, str]:
    """(context, continuation) of one training sequence; loss is on the continuation only.

    Multiple choice: the query and " " + answer (lm-eval's target delimiter);
    generation: the prompt and answer + GENERATION_STOP (no delimiter).
    """
    if task_kind(task) == GENERATION:
        prompt, answer = task.make(rng)
        return prompt, answer + GENERATION_STOP
    query, answer, _ = task.make(rng)
    return query, " " + answer
