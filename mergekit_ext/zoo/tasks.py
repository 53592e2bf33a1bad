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
