"""Every method and command on the architectures people merge: the matrix behind docs/architectures.md's
"Supported architectures" table and tests/test_architectures.py.

For each layout of ``modeling.ARCHITECTURES`` a tiny random base (hidden 32, 2 layers, the char
vocabulary), two perturbed "fine-tunes" and two peft LoRA adapters are built locally; each cell
then runs one method or command as a user would and says:

* ``works``: the command succeeded; a written model has exactly the input's tensor names
  (nothing dropped, no head added to a tied model), loads with transformers and gives finite
  logits; where the method has a cheap identity (below) the output equals it;
* ``refuses``: the command stopped with one line naming what it does not support;
* ``crashes`` (a traceback) or ``wrong`` (a check failed): bugs; the test fails on them.

Identities checked: ``consensus_ta`` with k 0 = θ0 + Σ τt; ``cart`` with rank_ratio 1 = the
average; ``adarank learn`` (variant ta, prior 1, every component, lr 1e-6) = θ0 + Σ τt;
``continual init`` = its one model; ``tall recover`` = θ0 + mt ⊙ Σ τt; ``rmm`` at K = n
reverts an adapter exactly.

    python -m benchmarks.architectures              # writes benchmarks/results/architectures.{json,md}
    python -m benchmarks.architectures --readme     # also re-renders the tables of README.md and docs/
    python -m benchmarks.architectures --cells tune --readme   # rerun some cells, update the file
    python -m benchmarks.architectures --render-only --readme   # re-render from the committed file
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "architectures"
TOKENS = torch.arange(4, 28).reshape(2, 12)
PROMPTS = [f"rev({word}) = " for word in ("abc", "cab", "bca", "acb", "dab", "bad", "cad", "dca")]

# Every method of this package through the stock mergekit-yaml (adarank has its own cell),
# with the parameters that give an identity where there is a cheap one.
STOCK_METHODS = {
    "consensus_ta": {"k": 0},
    "consensus_ties": {},
    "cart": {"rank_ratio": 1.0},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
    "opcm": {},
    "rmm": {},
}
COMMAND_CELLS = ("merge", "adarank", "continual", "tall", "lora merge", "rmm build/revert", "eval", "tune")
CELLS = tuple(f"mergekit-yaml {name}" for name in STOCK_METHODS) + COMMAND_CELLS


@dataclass
class Verdict:
    status: str  # works | refuses | crashes | wrong
    detail: str = ""

    def as_dict(self) -> Dict[str, str]:
        return {"status": self.status, "detail": self.detail}


class CheckFailed(AssertionError):
    pass


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _state(folder) -> Dict[str, torch.Tensor]:
    from mergekit_ext.modeling import load_state_dict

    return load_state_dict(folder)


def _logits(folder, adapter=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _loaded_names(folder) -> set:
    """The tensor names transformers gives a checkpoint once loaded (its own layout; a tied
    head counted once, as the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = set(model.state_dict()) - every  # persistent buffers
    return {name for name, _ in model.named_parameters()} | buffers


def check_model(out, base) -> str:
    """The output has the input's tensor names (or, where mergekit converts the layout, the names
    transformers itself gives the input once loaded), loads, gives finite logits; a note when converted."""
    ours, theirs = set(_state(out)), set(_state(base))
    note = ""
    if ours != theirs:
        if ours != _loaded_names(base):
            raise CheckFailed(f"tensor names differ from the input's: missing {sorted(theirs - ours)[:3]}, extra {sorted(ours - theirs)[:3]}")
        note = f"written in transformers' own layout ({sorted(ours - theirs)[0]} for {sorted(theirs - ours)[0]}, …: mergekit converts the checkpoint's)"
    if not torch.isfinite(_logits(out)).all():
        raise CheckFailed("non-finite logits")
    return note


def _reference_logits(base, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``tensors`` (in the checkpoint's layout) loaded by transformers as ``base`` is."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        for name in ("config.json", "generation_config.json"):
            if (Path(base) / name).is_file():
                shutil.copy(Path(base) / name, folder)
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        return _logits(folder)


def check_equal(out, reference: Dict[str, torch.Tensor], what: str, *, atol: float = 1e-5, base=None) -> None:
    """``out`` equals ``reference`` tensor by tensor; or, where the layouts differ (converted by
    mergekit), by the logits of both loaded by transformers."""
    merged = _state(out)
    if set(merged) != set(reference):
        if base is None:
            raise CheckFailed(f"layouts differ and no base to compare {what} by logits")
        difference = float((_logits(out) - _reference_logits(base, reference)).abs().max())
        if difference > max(atol, 1e-4):
            raise CheckFailed(f"logits are not {what}'s (max difference {difference:.3g})")
        return
    for name, tensor in reference.items():
        if not torch.allclose(merged[name].float(), tensor.float(), atol=atol, rtol=1e-4):
            raise CheckFailed(f"{name} is not {what} (max difference {float((merged[name].float() - tensor.float()).abs().max()):.3g})")


def _one_line(text: str) -> Optional[str]:
    """The refusal line of a command's output, or None when it is not one clear line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or "Traceback" in text:
        return None
    last = lines[-1].strip()
    return last if last.startswith("Error:") else None


class Family:
    """One architecture's base, fine-tunes and adapters, built under ``root``; cells cached."""

    def __init__(self, architecture: str, root: Path):
        from mergekit_ext.modeling import architecture_config, char_tokenizer, save_family

        self.architecture, self.root = architecture, Path(root)
        tokenizer = char_tokenizer()
        self.paths = save_family(self.root / "models", architecture_config(architecture, len(tokenizer)), tokenizer, count=2, scale=0.02)
        self.base = self.paths["base"]
        self.models = [self.paths["ft0"], self.paths["ft1"]]
        self._adapters: Optional[List[Path]] = None
        self._stock: Optional[Dict[str, Verdict]] = None
        self.verdicts: Dict[str, Verdict] = {}
        self.notes: List[str] = []  # check_model's notes for the cell being run

    # -- references
    def task_arithmetic(self) -> Dict[str, torch.Tensor]:
        base = _state(self.base)
        models = [_state(path) for path in self.models]
        return {name: theta0 + sum(model[name] - theta0 for model in models) for name, theta0 in base.items()}

    def average(self) -> Dict[str, torch.Tensor]:
        models = [_state(path) for path in self.models]
        return {name: sum(model[name] for model in models) / len(models) for name in models[0]}

    def adapters(self) -> List[Path]:
        if self._adapters is None:
            from mergekit_ext.modeling import random_lora_adapter

            self._adapters = [random_lora_adapter(self.base, self.root / f"lora{index}", seed=10 + index) for index in range(2)]
        return self._adapters

    # -- cells
    def cell(self, name: str) -> Verdict:
        if name not in self.verdicts:
            self.verdicts[name] = self._run(name)
        return self.verdicts[name]

    def _run(self, name: str) -> Verdict:
        if name.startswith("mergekit-yaml "):
            return self._stock_verdicts()[name.split(" ", 1)[1]]
        runner: Callable[[Path], None] = {
            "merge": self._merge, "adarank": self._adarank, "continual": self._continual, "tall": self._tall,
            "lora merge": self._lora_merge, "rmm build/revert": self._rmm, "eval": self._eval,
            "tune": self._tune,
        }[name]  # fmt: skip
        work = self.root / name.replace(" ", "-").replace("/", "-")
        work.mkdir(parents=True, exist_ok=True)
        self.notes = []
        try:
            runner(work)
        except Refused as refusal:
            return Verdict("refuses", self._portable(str(refusal)))
        except CheckFailed as failure:
            return Verdict("wrong", str(failure))
        except Exception as error:  # a crash of the harness or the command: a bug either way
            return Verdict("crashes", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return Verdict("works", self._note())

    def _check(self, out) -> None:
        note = check_model(out, self.base)
        if note and note not in self.notes:
            self.notes.append(note)

    def _portable(self, text: str) -> str:
        """``text`` with this run's folder written as the architecture's name (the same on every run)."""
        return text.replace(str(self.root), self.architecture)

    def _note(self) -> str:
        return "; ".join(self.notes)

    def _invoke(self, *args) -> str:
        """A ``mergekit-ext`` command in process; a refusal (exit != 0, one Error: line) is raised."""
        from click.testing import CliRunner

        from mergekit_ext.cli import main

        result = CliRunner().invoke(main, [str(argument) for argument in args])
        if result.exit_code == 0:
            return result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        line = _one_line(result.output)
        if line is None:
            raise CheckFailed(f"exit {result.exit_code} without one clear line: {result.output.strip()[-300:]}")
        raise Refused(line[len("Error:") :].strip())

    def _config(self, method: str, parameters: dict, name: Optional[str] = None) -> dict:
        config = {
            "merge_method": method, "dtype": "float32", "base_model": str(self.base),
            "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in self.models],
            "parameters": dict(parameters),
        }  # fmt: skip
        if name is not None:
            config["name"] = name
        return config

    def _stock_verdicts(self) -> Dict[str, Verdict]:
        """All stock methods in one ``mergekit-multi`` run (one process start per architecture);
        when it fails, each method alone through ``mergekit-yaml`` says which."""
        if self._stock is not None:
            return self._stock
        work = self.root / "stock"
        work.mkdir(parents=True, exist_ok=True)
        documents = [self._config(method, parameters, name=method) for method, parameters in STOCK_METHODS.items()]
        (work / "all.yml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
        multi = shutil.which("mergekit-multi") or "mergekit-multi"
        subprocess.run([multi, str(work / "all.yml"), "-I", str(work / "out"), "--quiet", "--no-write-model-card"], capture_output=True, text=True, env=_env())
        verdicts = {}
        for method, parameters in STOCK_METHODS.items():
            out = work / "out" / method
            if not (out / "config.json").is_file():
                verdicts[method] = self._stock_alone(work, method, parameters)
                continue
            verdicts[method] = self._checked(lambda: self._check_stock(method, out))
        self._stock = verdicts
        return verdicts

    def _stock_alone(self, work: Path, method: str, parameters: dict) -> Verdict:
        config_path = work / f"{method}.yml"
        config_path.write_text(yaml.safe_dump(self._config(method, parameters)))
        out = work / f"alone-{method}"
        executable = shutil.which("mergekit-yaml") or "mergekit-yaml"
        result = subprocess.run([executable, str(config_path), str(out), "--quiet", "--no-write-model-card"], capture_output=True, text=True, env=_env())
        if result.returncode == 0:
            return self._checked(lambda: self._check_stock(method, out))
        tail = (result.stderr or result.stdout).strip().splitlines()
        return Verdict("crashes", tail[-1] if tail else f"exit {result.returncode}")

    def _check_stock(self, method: str, out: Path) -> None:
        self._check(out)
        if method == "consensus_ta":
            check_equal(out, self.task_arithmetic(), "θ0 + Σ τt (k 0)", base=self.base)
        elif method == "cart":
            check_equal(out, self.average(), "the average (rank_ratio 1)", base=self.base)

    def _checked(self, check: Callable[[], None]) -> Verdict:
        self.notes = []
        try:
            check()
        except CheckFailed as failure:
            return Verdict("wrong", str(failure))
        return Verdict("works", self._note())

    def _merge(self, work: Path) -> None:
        config = work / "cart.yml"
        config.write_text(yaml.safe_dump(self._config("cart", {})))
        self._invoke("merge", config, work / "out")
        self._check(work / "out")

    def _adarank(self, work: Path) -> None:
        prompts = work / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        file, out = work / "learned.safetensors", work / "out"
        self._invoke(
            "adarank", "learn", *self.models, "--base", self.base, "--prompts", prompts, "--out", file, "--merge-out", out,
            "--variant", "ta", "--prior", "1", "--init-rank-ratio", "1", "--objective", "entropy", "--steps", "1",
            "--lr", "1e-6", "--batch-size", "4", "--quiet",
        )  # fmt: skip
        self._invoke("adarank", "show", file)
        self._check(out)
        check_equal(out, self.task_arithmetic(), "θ0 + Σ τt (step 0, lr 1e-6)", atol=1e-4, base=self.base)

    def _continual(self, work: Path) -> None:
        state = work / "state"
        self._invoke("continual", "init", state, self.models[0], "--base", self.base)
        self._check(state)
        check_equal(state, _state(self.models[0]), "the first model", base=self.base)
        self._invoke("continual", "add", state, self.models[1], "--base", self.base)
        self._check(state)

    def _tall(self, work: Path) -> None:
        bundle, out = work / "bundle", work / "recovered"
        self._invoke("tall", "compress", "--base", self.base, *self.models, bundle, "--tall-lambda", "0.4")
        self._invoke("tall", "recover", bundle, self.models[0].name, out)
        self._check(out)
        base = _state(self.base)
        models = [_state(path) for path in self.models]
        reference = {}
        for name, theta0 in base.items():
            vectors = [model[name] - theta0 for model in models]
            multitask = sum(vectors)
            reference[name] = theta0 + (vectors[0].abs() > 0.4 * (multitask - vectors[0]).abs()) * multitask
        check_equal(out, reference, "θ0 + m ⊙ Σ τt", base=self.base)

    def _lora_merge(self, work: Path) -> None:
        out = work / "adapter"
        self._invoke("lora", "merge", "--base", self.base, "--method", "tsv_m", *self.adapters(), "-r", "4", out, "--quiet")
        if not torch.isfinite(_logits(self.base, out)).all():
            raise CheckFailed("non-finite logits with the merged adapter")

    def _rmm(self, work: Path) -> None:
        bundle, out = work / "bundle", work / "reverted"
        adapters = self.adapters()
        self._invoke("rmm", "build", "--base", self.base, *adapters, "-k", str(len(adapters)), bundle, "--quiet")
        self._invoke("rmm", "revert", bundle, adapters[0].name, out, "--merged", "--quiet")
        self._check(out)
        expected = _logits(self.base, adapters[0])
        if not torch.allclose(_logits(out), expected, atol=1e-4, rtol=1e-4):
            raise CheckFailed("K = n did not revert the adapter exactly")

    def _eval(self, work: Path) -> None:
        tasks = write_check_task(work / "tasks")
        output = self._invoke("eval", self.base, "--tasks", "arch_check", "--include-path", tasks, "--batch-size", "4", "--threads", "1", "--quiet")
        if "arch_check" not in output:
            raise CheckFailed(f"no arch_check score in: {output.strip()[-200:]}")


    def _tune(self, work: Path) -> None:
        """One trial (task arithmetic, one λ) on the check task; the chosen merge written from best.yml."""
        tasks = write_check_task(work / "tasks")
        space = {
            "base_model": str(self.base), "dtype": "float32",
            "models": [{"model": str(path)} for path in self.models],
            "tune": {
                "methods": {"task_arithmetic": {"lambda": [0.5]}},
                "tasks": {"validation": ["arch_check_validation"], "test": ["arch_check"]},
                "include_path": str(tasks), "trials": 1,
            },
        }  # fmt: skip
        (work / "space.yml").write_text(yaml.safe_dump(space, sort_keys=False))
        self._invoke("tune", work / "space.yml", work / "study", "--batch-size", "4", "--threads", "1", "--quiet")
        best = work / "study" / "best.yml"
        if yaml.safe_load(best.read_text()).get("merge_method") != "task_arithmetic":
            raise CheckFailed(f"best.yml does not hold the one trial's method: {best.read_text()[:200]}")
        self._invoke("merge", best, work / "out", "--quiet")
        self._check(work / "out")
        base, combined = _state(self.base), self.task_arithmetic()
        check_equal(work / "out", {name: theta0 + 0.5 * (combined[name] - theta0) for name, theta0 in base.items()}, "θ0 + 0.5 Σ τt", base=self.base)


class Refused(Exception):
    """A command's one-line refusal (its text is the line, without ``Error:``)."""


def write_check_task(folder: Path) -> Path:
    """4-document local lm-eval multiple-choice tasks over the char vocabulary: ``arch_check``
    and, with other sums, ``arch_check_validation`` (tune chooses on it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("arch_check", ((1, 2), (3, 4), (2, 5), (6, 1))), ("arch_check_validation", ((2, 2), (1, 4), (3, 5), (7, 1)))):
        data = folder / f"{name}.jsonl"
        documents = [{"query": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "gold": 0} for a, b in pairs]
        data.write_text("".join(json.dumps(document) + "\n" for document in documents))
        task = {
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}],
        }  # fmt: skip
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


# ---------------------------------------------------------------------------
# The result file and the docs table


def run_matrix(root: Path, architectures=None, cells=CELLS, progress: bool = True) -> Dict:
    from mergekit_ext.modeling import ARCHITECTURES

    results: Dict[str, Dict[str, Dict[str, str]]] = {}
    started = time.perf_counter()
    for architecture in architectures or ARCHITECTURES:
        family = Family(architecture, root / architecture)
        results[architecture] = {cell: family.cell(cell).as_dict() for cell in cells}
        if progress:
            print(f"{architecture}: " + ", ".join(f"{cell} {verdict['status']}" for cell, verdict in results[architecture].items()), file=sys.stderr)
    return {
        "format": "mergekit-ext/architectures/1",
        "command": "python -m benchmarks.architectures",
        "architectures": {name: ARCHITECTURES[name] for name in results},
        "cells": list(cells),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def render_table(data: Dict) -> str:
    """The docs table: one row per method or command, one column per architecture."""
    names = list(data["architectures"])
    lines = ["| method / command | " + " | ".join(f"`{name}`" for name in names) + " |", "|---|" + "---|" * len(names)]
    notes: List[str] = []
    for cell in data["cells"]:
        row = []
        for name in names:
            verdict = data["results"][name][cell]
            if verdict["status"] == "works" and not verdict["detail"]:
                row.append("yes")
            elif verdict["status"] == "works":
                note = f"`{name}`: {verdict['detail']}"
                if note not in notes:
                    notes.append(note)
                row.append(f"yes [{notes.index(note) + 1}]")
            else:
                notes.append(f"{cell} on `{name}`: {verdict['status']}: {verdict['detail']}")
                row.append(f"{verdict['status']} [{len(notes)}]")
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    lines.append("")
    lines.extend(f"{index}. {note}" for index, note in enumerate(notes, 1))
    lines.append("")
    lines.append("Layouts: " + "; ".join(f"`{name}` {what}" for name, what in data["architectures"].items()) + ".")
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(data: Dict) -> str:
    return (
        "# Every method and command on the architectures people merge\n\n"
        f"Written by `{data['command']}` ({data['seconds']} s); checked by tests/test_architectures.py.\n"
        "`yes`: output with the input's tensor names, loaded by transformers, finite logits, and the identity "
        "where one is checked (benchmarks/architectures.py).\n\n" + render_table(data)
    )


def updated(previous: Dict, subset: Dict) -> Dict:
    """``previous`` results with a subset run's cells replaced (the run is recorded in ``partial_runs``)."""
    from mergekit_ext.modeling import ARCHITECTURES

    for architecture, row in subset["results"].items():
        previous["results"].setdefault(architecture, {}).update(row)
    previous["architectures"] = {name: ARCHITECTURES[name] for name in ARCHITECTURES if name in previous["results"]}
    previous["cells"] = [cell for cell in CELLS if all(cell in row for row in previous["results"].values())]
    previous.setdefault("partial_runs", []).append(
        {"architectures": list(subset["results"]), "cells": subset["cells"], "seconds": subset["seconds"]}
    )
    return previous


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    parser.add_argument("--readme", action="store_true", help="also re-render the README and docs tables (benchmarks/render_readme.py)")
    parser.add_argument("--architectures", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--cells", default=None, help="comma-separated subset of cells (default: all)")
    parser.add_argument("--render-only", action="store_true", help="re-render OUT.md (and the docs tables with --readme) from OUT.json, running nothing")
    arguments = parser.parse_args(argv)
    from mergekit_ext import io

    if arguments.render_only:
        data = io.read_json_object(arguments.out.with_suffix(".json"))
    else:
        torch.set_num_threads(1)
        cells = tuple(arguments.cells.split(",")) if arguments.cells else CELLS
        with tempfile.TemporaryDirectory(prefix="architectures-") as root:
            data = run_matrix(Path(root), arguments.architectures.split(",") if arguments.architectures else None, cells)
        if (arguments.architectures or arguments.cells) and arguments.out.with_suffix(".json").is_file():
            data = updated(io.read_json_object(arguments.out.with_suffix(".json")), data)

    io.write_json(arguments.out.with_suffix(".json"), data)
    io.write_text(arguments.out.with_suffix(".md"), render_markdown(data))
    if arguments.readme:
        from benchmarks.render_readme import main as render_readme

        render_readme([])
    print(f"wrote {arguments.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
