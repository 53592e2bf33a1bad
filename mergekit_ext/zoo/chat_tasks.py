"""Instruction tasks for a pretrained chat model (the ``smol`` zoo), posed as plain questions.

Each generator returns (question, answer) for a generation task (greedy reply,
exact match) or (question, answer, distractors) for a retention task (4-way
log-likelihood multiple choice over what the reply starts with). The chat
template and the system message are applied by ``chat_format``.

Generation answers are short and have one exact form; a pretrained base that
answers in sentences scores low until a light fine-tune teaches it the form.
The retention task asks what the base already knows (capitals, opposites) and
scores it so that its own competence counts, whatever its reply style.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from mergekit_ext.zoo.tasks import GENERATION, MULTIPLE_CHOICE

NOUNS = (
    "apple", "river", "stone", "cloud", "garden", "window", "candle", "bridge", "forest", "pencil",
    "mirror", "basket", "rabbit", "castle", "planet", "button", "ladder", "jacket", "carpet", "dragon",
    "island", "kettle", "lemon", "monkey", "needle", "orange", "pillow", "rocket", "saddle", "tiger",
    "turtle", "violin", "wallet", "anchor", "banana", "cactus", "desert", "engine", "falcon", "guitar",
    "hammer", "jungle", "kitten", "lizard", "marble", "noodle", "oyster", "parrot", "quartz", "ribbon",
    "salmon", "teapot", "tunnel", "valley", "walnut", "yogurt", "zipper", "harbor", "meadow", "pepper",
    "silver", "spider", "summer", "winter", "thunder", "blanket", "chimney", "dolphin", "feather", "giraffe",
)

ADJECTIVES = (
    "green", "small", "quiet", "old", "bright", "cold", "happy", "tall", "soft", "dark", "little", "golden",
    "wooden", "empty", "round", "heavy", "fresh", "red", "blue", "wild", "lazy", "sweet", "brave", "broken",
)

COUNTRIES = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("India", "New Delhi"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
    ("United Kingdom", "London"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
)

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("old", "young"), ("rich", "poor"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("wet", "dry"), ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"),
    ("heavy", "light"), ("long", "short"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("day", "night"),
    ("north", "south"), ("east", "west"), ("love", "hate"), ("true", "false"), ("inside", "outside"), ("first", "last"),
)

# Powers of ten only: the skill is the factor and the format, not long multiplication.
UNITS = (
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
    ("centimeters", "millimeters", 10), ("liters", "milliliters", 1000), ("meters", "millimeters", 1000),
)

FIELDS = (
    ("name", ("Anna", "Boris", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Julia", "Karim", "Lena", "Milo", "Nora", "Omar", "Petra")),
    ("city", ("Lyon", "Porto", "Oslo", "Graz", "Bern", "Turin", "Leeds", "Ghent", "Split", "Cork", "Basel", "Lille")),
    ("age", tuple(str(age) for age in range(18, 80))),
    ("color", ("red", "blue", "green", "black", "white", "yellow", "purple", "orange", "brown", "gray")),
)


@dataclass(frozen=True)
class ChatTask:
    """A task posed as a chat question: ``make(rng)`` returns (question, answer) or (question, answer, distractors)."""

    name: str
    description: str
    kind: str
    make: Callable[[random.Random], Tuple]


def _add(rng: random.Random):
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _convert(rng: random.Random):
    big, small, factor = rng.choice(UNITS)
    value = rng.randint(2, 99)
    return f"How many {small} are in {value} {big}?", str(value * factor)


def _upper(rng: random.Random):
    phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"Write {phrase} in capital letters.", phrase.upper()


def _sort(rng: random.Random):
    numbers = rng.sample(range(1, 100), 3)
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}", ", ".join(map(str, sorted(numbers)))


def _last(rng: random.Random):
    words = rng.sample(NOUNS, rng.randint(4, 6))
    position = rng.randrange(1, len(words) - 1)
    return f"Which word comes right after {words[position - 1]} in this list: {', '.join(words)}?", words[position]


def _extract(rng: random.Random):
    record = [(field, rng.choice(values)) for field, values in FIELDS]
    rng.shuffle(record)
    field, value = rng.choice(record)
    return f"Give the {field} from this record: {'; '.join(f'{k}={v}' for k, v in record)}", value


def _max(rng: random.Random):
    numbers = rng.sample(range(10, 1000), 5)
    return f"Which is the largest number: {', '.join(map(str, numbers))}?", str(max(numbers))


def _count(rng: random.Random):
    word = rng.choice(NOUNS)
    letter = rng.choice(sorted(set(word)))
    return f"How many times does the letter {letter} appear in the word {word}?", str(word.count(letter))


# No options in the question: listed options pull a small model's first word towards the
# words it just read (seed 0's base: 0.43 / 0.38 validation / test with options, 0.95 / 0.89 without).
CAPITAL_QUESTIONS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.")
OPPOSITE_QUESTIONS = ("What is the opposite of {}?", "Give the opposite of the word {}.", "Which word means the opposite of {}?")


def _facts(rng: random.Random):
    if rng.random() < 0.5:
        country, capital = rng.choice(COUNTRIES)
        others = rng.sample([c for _, c in COUNTRIES if c != capital], 3)
        return rng.choice(CAPITAL_QUESTIONS).format(country), capital, others
    word, opposite = rng.choice(OPPOSITES)
    others = rng.sample([o for w, o in OPPOSITES if o not in (opposite, word) and w != word], 3)
    return rng.choice(OPPOSITE_QUESTIONS).format(word), opposite, others


CHAT_TASKS: Dict[str, ChatTask] = {
    task.name: task
    for task in (
        ChatTask("add", "add a three-digit and a two-digit number: What is 417 + 38? 455", GENERATION, _add),
        ChatTask("convert", "convert units by a power of ten: How many centimeters are in 37 meters? 3700", GENERATION, _convert),
        ChatTask("upper", "spell two words in capitals: Write green river in capital letters. GREEN RIVER", GENERATION, _upper),
        ChatTask("sort", "sort three numbers: Sort these numbers from smallest to largest: 42, 7, 19 -> 7, 19, 42", GENERATION, _sort),
        ChatTask("after", "the word after a given one in a list: ... right after stone in: apple, stone, cloud? cloud", GENERATION, _last),
        ChatTask("extract", "read a field of a record: Give the city from this record: name=Anna; city=Lyon; ... Lyon", GENERATION, _extract),
        ChatTask("max", "the largest of five numbers: Which is the largest number: 34, 781, 12, 56, 99? 781", GENERATION, _max),
        ChatTask("count", "count a letter in a word: How many times does the letter a appear in the word banana? 3", GENERATION, _count),
        ChatTask("facts", "retention: capitals and opposites the base knows (4-way log-likelihood choice)", MULTIPLE_CHOICE, _facts),
    )
}


def chat_prompt(tokenizer, system: str, question: str, shots: Sequence[Tuple[str, str]] = ()) -> str:
    """The text ``lm_eval --apply_chat_template --fewshot_as_multiturn --system_instruction SYSTEM``
    builds for ``question`` after the example turns ``shots`` ((question, answer) pairs)."""
    messages = [{"role": "system", "content": system}]
    for shot_question, shot_answer in shots:
        messages += [{"role": "user", "content": shot_question}, {"role": "assistant", "content": shot_answer}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_document(task: ChatTask, rng: random.Random, tokenizer, system: str) -> Dict:
    """One held-out document: the plain question, the chat prompt, and the answer (or choices and label)."""
    made = task.make(rng)
    question = made[0]
    prompt = chat_prompt(tokenizer, system, question)
    if task.kind == GENERATION:
        return {"question": question, "prompt": prompt, "answer": made[1]}
    choices = [made[1]] + list(made[2])
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[i] for i in order]
    return {"question": question, "query": prompt, "choices": shuffled, "label": shuffled.index(made[1])}


def draw_chat_documents(task: ChatTask, rng: random.Random, count: int, taken: set, tokenizer, system: str) -> List[Dict]:
    """Up to ``count`` documents with questions not in ``taken`` (each drawn one is added to it)."""
    drawn: List[Dict] = []
    for _ in range(100 * count + 1000):
        if len(drawn) == count:
            break
        document = chat_document(task, rng, tokenizer, system)
        if document["question"] not in taken:
            taken.add(document["question"])
            drawn.append(document)
    return drawn
