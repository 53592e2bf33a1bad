"""A built zoo on disk: ``manifest.json`` (written last), task YAMLs and JSONL splits."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from mergekit_ext import io
from mergekit_ext.zoo.tasks import (
    GENERATION,
    GENERATION_STOP,
    LM_EVAL_MAX_GEN_TOKS,
    MULTIPLE_CHOICE,
    TASKS_BY_KIND,
    document_key,
    draw_distinct,
)

ZOO_FORMAT = "mergekit-ext/zoo/1"
MANIFEST_NAME = "manifest.json"
TASK_PREFIX = "zoo_"


class ZooError(ValueError):
    """A zoo folder that is missing, incomplete or not a zoo."""


@dataclass
class Zoo:
    """A built zoo: absolute paths to everything, read from its manifest."""

    root: Path
    manifest: Dict = field(repr=False)
    # Task YAMLs rendered for a zoo that was moved or copied (outside it: reading never writes).
    rendered_tasks: Optional[Path] = field(default=None, repr=False)

    @property
    def tasks(self) -> List[str]:
        return list(self.manifest["tasks"])

    @property
    def base(self) -> Path:
        return self.root / self.manifest["base"]

    def expert(self, task: str) -> Path:
        return self.root / self.manifest["tasks"][task]["expert"]

    def adapter(self, task: str) -> Path:
        return self.root / self.manifest["tasks"][task]["adapter"]

    @property
    def task_dir(self) -> Path:
        if self.rendered_tasks is not None:
            return self.rendered_tasks
        return self.root / self.manifest["task_yaml_dir"]

    def lm_eval_task(self, task: str, split: str = "test") -> str:
        entry = self.manifest["tasks"][task]
        return entry["lm_eval_task"] if split == "test" else entry["lm_eval_task_validation"]

    def documents(self, task: str, split: str) -> List[Dict]:
        return io.read_jsonl(self.root / self.manifest["tasks"][task][split])

    def unlabeled_documents(self, task: str, count: int) -> List[Dict]:
        """``count`` fresh documents of a task from its generator, none of them a validation
        or test prompt: in-domain unlabeled text, as a user would have (their answers are
        for no one to read). Seeded by the zoo folder's name, so the same zoo draws the same ones."""
        if "chat" in self.manifest:  # a smol zoo: chat tasks, prompts rendered through the template
            return chat_unlabeled_documents(self, task, count)
        generator = TASKS_BY_KIND[self.kind(task)][task]
        held_out = {document_key(generator, doc) for split in ("validation", "test") for doc in self.documents(task, split)}
        drawn = draw_distinct(generator, random.Random(f"{self.root.name}-{task}-unlabeled"), count, held_out)
        if len(drawn) < count:
            raise ZooError(f"{self.root}: task {task} has fewer than {count} prompts outside its validation and test splits")
        return drawn

    @property
    def eval_cache(self) -> Path:
        return self.root / "evals"

    def kind(self, task: str) -> str:
        """``multiple_choice`` or ``generation`` (zoos built before tasks had kinds are multiple choice)."""
        return self.manifest["tasks"][task].get("kind", MULTIPLE_CHOICE)

    @property
    def task_kind(self) -> str:
        """The one kind of all the zoo's tasks (a zoo is built from one preset, so one kind)."""
        kinds = {self.kind(task) for task in self.tasks}
        if len(kinds) != 1:
            raise ZooError(f"{self.root} mixes task kinds {sorted(kinds)}")
        return kinds.pop()

    @property
    def metric(self) -> str:
        """lm-eval's result key of the zoo's score: ``acc,none`` or ``exact_match,none``."""
        return LM_EVAL_METRICS[self.task_kind]

    @property
    def chance(self):
        """The chance level of the metric, or None where there is none (exact match of a generation)."""
        return CHANCE_LEVELS[self.task_kind]


# lm-eval result key per task kind, and the chance level where one exists.
LM_EVAL_METRICS = {MULTIPLE_CHOICE: "acc,none", GENERATION: "exact_match,none"}
CHANCE_LEVELS = {MULTIPLE_CHOICE: 0.25, GENERATION: None}


def load_zoo(directory: str | Path) -> Zoo:
    """Open a built zoo, never writing to it.

    The task YAMLs hold absolute data paths (lm-eval needs them); for a zoo that
    was moved or copied they are rendered afresh into a private temporary folder
    for this process, so a copied or read-only zoo works as it is.
    """
    root = Path(directory).absolute()
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ZooError(f"not a built zoo (no {MANIFEST_NAME}): {root} — build it with `mergekit-ext zoo {directory}`")
    manifest = io.read_json_object(manifest_path, error=ZooError)
    if manifest.get("format") != ZOO_FORMAT:
        raise ZooError(f"{manifest_path} is not a {ZOO_FORMAT} manifest")
    zoo = Zoo(root, manifest)
    if manifest.get("root") != str(root):
        zoo.rendered_tasks = _rendered_task_folder(root, manifest)
    return zoo


_RENDERED: Dict[str, Path] = {}


def _rendered_task_folder(root: Path, manifest: Dict) -> Path:
    """Task YAMLs pointing at ``root``'s data, in a temporary folder removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    if str(root) not in _RENDERED:
        folder = Path(tempfile.mkdtemp(prefix="mergekit-ext-zoo-tasks-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        if "chat" in manifest:  # a smol zoo: its own YAMLs (chat stop string, retention tasks)
            rewrite_chat_task_yamls(root, manifest, folder=folder / "tasks")
        else:
            write_task_yamls(root, manifest["tasks"], folder=folder / "tasks")
        _RENDERED[str(root)] = folder / "tasks"
    return _RENDERED[str(root)]


def write_task_yamls(root: Path, tasks: Dict[str, Dict], *, folder: Optional[Path] = None) -> None:
    """The toy zoos' lm-eval YAMLs (generation stops at a newline)."""
    descriptions = {
        name: entry.get("description") or TASKS_BY_KIND[entry.get("kind", MULTIPLE_CHOICE)][name].description
        for name, entry in tasks.items()
    }
    _write_yamls(root, tasks, descriptions, folder=folder, stop=GENERATION_STOP, max_gen_toks=LM_EVAL_MAX_GEN_TOKS, choice_delimiter=None)


def write_chat_task_yamls(root: Path, entries: Dict[str, Dict], *, stop: str, max_gen_toks: int, folder: Optional[Path] = None) -> None:
    """A chat zoo's lm-eval YAMLs: the prompts are already chat-rendered, so lm-eval runs them
    as is; replies stop at the template's end of turn; choices follow the prompt directly."""
    descriptions = {name: entry["description"] for name, entry in entries.items()}
    _write_yamls(root, entries, descriptions, folder=folder, stop=stop, max_gen_toks=max_gen_toks, choice_delimiter="")


def _write_yamls(root: Path, tasks: Dict[str, Dict], descriptions: Dict[str, str], *, folder: Optional[Path], stop: str, max_gen_toks: int, choice_delimiter: Optional[str]) -> None:
    # lm-eval's json loader needs absolute data paths; both splits are listed so
    # either YAML can be read on its own.
    folder = folder if folder is not None else root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in tasks.items():
        data_files = {"validation": str(root / entry["validation"]), "test": str(root / entry["test"])}
        for task_name, split in ((entry["lm_eval_task"], "test"), (entry["lm_eval_task_validation"], "validation")):
            lines = [
                f"# {descriptions[name]}",
                f"task: {task_name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    validation: {json.dumps(data_files['validation'])}",
                f"    test: {json.dumps(data_files['test'])}",
                f"test_split: {split}",
            ]
            if entry.get("kind", MULTIPLE_CHOICE) == GENERATION:
                # Greedy generation until the stop string, exact match with the
                # answer, case- and whitespace-exact (no filters, no regexes).
                lines += [
                    "output_type: generate_until",
                    'doc_to_text: "{{prompt}}"',
                    'doc_to_target: "{{answer}}"',
                    'target_delimiter: ""',
                    "generation_kwargs:",
                    f"  until: [{json.dumps(stop)}]",
                    "  do_sample: false",
                    f"  max_gen_toks: {max_gen_toks}",
                    "metric_list:",
                    "  - metric: exact_match",
                    "    aggregation: mean",
                    "    higher_is_better: true",
                    "    ignore_case: false",
                    "    ignore_punctuation: false",
                ]
            else:
                lines += [
                    "output_type: multiple_choice",
                    'doc_to_text: "{{query}}"',
                    "doc_to_choice: choices",
                    "doc_to_target: label",
                ]
                if choice_delimiter is not None:
                    lines.append(f"target_delimiter: {json.dumps(choice_delimiter)}")
                lines += [
                    "metric_list:",
                    "  - metric: acc",
                    "    aggregation: mean",
                    "    higher_is_better: true",
                ]
            lines += ["metadata:", "  version: 1.0"]
            (folder / f"{task_name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Chat zoos (the smol preset): prompts already rendered through the chat template.


def lm_eval_budget(max_new_tokens: int) -> int:
    """lm-eval's ``max_gen_toks``: more than the scorer's budget, so a reply that has not
    stopped within it still cannot match (the scorer's reply is then wrong too)."""
    return max_new_tokens + 16


def rewrite_chat_task_yamls(root: Path, manifest: Dict, *, folder: Optional[Path] = None) -> None:
    """The YAMLs of a built smol zoo, rendered for its folder ``root`` into ``folder`` (``load_zoo`` after a move)."""
    chat = manifest["chat"]
    entries = {**manifest["tasks"], **manifest.get("retention", {})}
    write_chat_task_yamls(root, entries, stop=chat["end_of_turn"], max_gen_toks=lm_eval_budget(chat["max_new_tokens"]), folder=folder)


def chat_unlabeled_documents(zoo: Zoo, task: str, count: int) -> List[Dict]:
    """``count`` fresh documents of an instruction task (same example turns and rendering as its
    splits), none of them a held-out question or an example turn; seeded by the folder's name."""
    from transformers import AutoTokenizer

    from mergekit_ext.zoo.chat_tasks import CHAT_TASKS, chat_prompt, draw_chat_documents

    entry = zoo.manifest["tasks"][task]
    shots = [tuple(shot) for shot in entry.get("shots", [])]
    taken = {q for q, _ in shots} | {d["question"] for split in ("validation", "test") for d in zoo.documents(task, split)}
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    system = zoo.manifest["chat"]["system"]
    drawn = draw_chat_documents(CHAT_TASKS[task], random.Random(f"{zoo.root.name}-{task}-unlabeled"), count, taken, tokenizer, system)
    if len(drawn) < count:
        raise ZooError(f"{zoo.root}: task {task} has fewer than {count} questions outside its validation and test splits")
    for document in drawn:
        document["prompt"] = chat_prompt(tokenizer, system, document["question"], shots)
    return drawn
