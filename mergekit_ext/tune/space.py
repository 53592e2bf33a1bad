"""The SPACE file of ``mergekit-ext tune``: parsing, validation and the default spaces.

A SPACE file is an ordinary mergekit YAML (``models``, ``base_model``,
``dtype``, optional top-level ``parameters``...) plus a ``tune:`` block; the
format is documented in ``mergekit_ext.tune``'s docstring. ``load_space``
reads and checks everything that can be checked without merging (methods,
parameter names and values, tasks, paths) and raises ``SpaceError`` with one
line naming the file and the culprit.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_ext.evaluate.protocol import grids as _protocol_grids

# --------------------------------------------------------------------------
# Default spaces: what `tune` tries when the SPACE names no methods: one small grid
# per method, kept with every other grid of the method in the protocol's one table
# (mergekit_ext/evaluate/protocol/grids.py, ``tune`` entries). Every method of this
# package is tried (those that need a learned file, such as adarank, are skipped); a
# method of this package missing from the table is tried once with its own defaults.
# task_arithmetic and ties are mergekit's.
DEFAULT_SPACES: Dict[str, Dict[str, Any]] = _protocol_grids.DEFAULT_SPACES
# mergekit's methods tried by default beside every method of this package.
DEFAULT_MERGEKIT_METHODS = ("task_arithmetic", "ties")

# Trials when the SPACE and the command line give no number and the space is
# not a finite grid (a finite grid is tried in full by default).
DEFAULT_TRIALS = 30

# Bounds mergekit's own ParameterSpecs do not state (they only say `float`).
MERGEKIT_BOUNDS: Dict[str, Tuple[float, float]] = {"density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 1.0)}

TUNE_KEYS = ("methods", "tasks", "include_path", "reference", "metric", "limit", "trials", "seed", "prune", "halving", "halving_fraction")

# Successive halving on items (``halving.py``), a quarter of each validation task first:
# on by default, because it compares every trial on the same random items of every task,
# so the order of the tasks cannot decide. The per-task pruner (halving off) assumes the
# first tasks rank settings as the later ones do: on the real-LLM smol zoo of seed 2 it
# stopped TSV-M λ 1.0 after 3 of 5 tasks, though over all five it is the best setting on
# validation (0.710 against the 0.680 tune then chose); with halving it was scored in full
# and chosen (benchmarks/results/tune-halving-smol-s2.md). The price: on hard zoo seeds 3-5
# (tune-hard-unseen.md) halving scored 10 % more validation items and spent 20 % more
# seconds in trials than the per-task pruner, with the same choices.
DEFAULT_HALVING = True
DEFAULT_HALVING_FRACTION = 0.25


class SpaceError(ValueError):
    """A SPACE file that cannot be tuned; the message is one line naming the file and the culprit."""


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------
# Parameter domains.


@dataclass(frozen=True)
class Choice:
    """A finite list of values to try."""

    values: Tuple[Any, ...]

    def describe(self) -> str:
        return "[" + ", ".join(format_value(v) for v in self.values) + "]"


@dataclass(frozen=True)
class Range:
    """A continuous (or integer) interval sampled by TPE; ``step`` discretizes it."""

    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    integer: bool = False

    def describe(self) -> str:
        extra = (", log" if self.log else "") + (f", step {format_value(self.step)}" if self.step else "")
        return f"{format_value(self.low)}..{format_value(self.high)}{extra}"


@dataclass(frozen=True)
class Fixed:
    """One value, not searched."""

    value: Any

    def describe(self) -> str:
        return format_value(self.value)


Domain = Union[Choice, Range, Fixed]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={format_value(value)}" for name, value in params.items())


def setting_label(method: str, params: Mapping[str, Any]) -> str:
    """``ties(density=0.5, lambda=1)``: how a setting is named in reports and in the grid."""
    return f"{method}({format_params(params)})"


@dataclass
class MethodSpace:
    """One method's search space: a domain per parameter (searched or fixed)."""

    name: str
    parameters: Dict[str, Domain] = field(default_factory=dict)
    filled: Dict[str, Any] = field(default_factory=dict)  # required values the SPACE left out (weight: 1.0)

    @property
    def finite(self) -> bool:
        return not any(isinstance(d, Range) for d in self.parameters.values())

    def grid(self) -> List[Dict[str, Any]]:
        """Every setting of a finite space (fixed values included), in file order."""
        names = list(self.parameters)
        axes = [d.values if isinstance(d, Choice) else (d.value,) for d in (self.parameters[n] for n in names)]  # type: ignore[union-attr]
        return [dict(zip(names, combo)) for combo in itertools.product(*axes)]

    def searched(self) -> List[str]:
        return [n for n, d in self.parameters.items() if not isinstance(d, Fixed)]

    def describe(self) -> str:
        if not self.parameters:
            return "defaults"
        return ", ".join(f"{n}: {d.describe()}" for n, d in self.parameters.items())


@dataclass
class TuneSpace:
    """A validated SPACE: the mergekit config to vary, the methods to try, the evaluation."""

    source: Path
    base_config: Dict[str, Any]  # the mergekit YAML without `tune:` and `merge_method:`, absolute paths
    methods: Dict[str, MethodSpace]
    validation_tasks: List[str]
    test_tasks: List[str]
    include_path: Path
    reference: Optional[Dict[str, str]] = None  # test task -> model (normalized accuracy = merged / reference)
    metric: Optional[str] = None
    limit: Optional[int] = None
    trials: Optional[int] = None
    seed: int = 0
    prune: bool = True
    halving: bool = DEFAULT_HALVING
    halving_fraction: float = DEFAULT_HALVING_FRACTION
    defaults_used: bool = False

    @property
    def halves(self) -> bool:
        """Successive halving is on: it needs the pruner (without it every trial is scored in full anyway)."""
        return self.halving and self.prune

    @property
    def finite(self) -> bool:
        return all(space.finite for space in self.methods.values())

    def settings(self) -> List[Tuple[str, Dict[str, Any]]]:
        """The finite grid over every method: (method, parameters) pairs."""
        if not self.finite:
            raise SpaceError(f"{self.source}: the space has ranges; it is not a finite grid")
        return [(name, params) for name, space in self.methods.items() for params in space.grid()]

    @property
    def target_trials(self) -> int:
        if self.trials is not None:
            return min(self.trials, len(self.settings())) if self.finite else self.trials
        return len(self.settings()) if self.finite else DEFAULT_TRIALS

    def config(self, method: str, params: Mapping[str, Any]) -> Dict[str, Any]:
        """The mergekit config of one setting: the SPACE's config with ``merge_method`` and ``parameters``."""
        config = copy.deepcopy(self.base_config)
        own = _parameter_names(method)
        # Top-level parameters hold every tried method's fixed values; each config keeps its method's own.
        parameters = {k: v for k, v in (config.get("parameters") or {}).items() if own is None or k in own}
        parameters.update(self.methods[method].filled)
        parameters.update(params)
        ordered: Dict[str, Any] = {"merge_method": method}
        for key, value in config.items():
            if key != "parameters":
                ordered[key] = value
        if parameters:
            ordered["parameters"] = parameters
        return ordered

    def local_inputs(self) -> List[Path]:
        """Every local folder the search reads: models (and LoRA adapters), base, task YAMLs, references."""
        config = self.base_config
        references = [config.get("base_model"), *(entry.get("model") for entry in config.get("models", []))]
        references += list((self.reference or {}).values())
        paths = [self.include_path]
        for reference in filter(None, references):
            paths += [Path(part) for part in str(reference).split("+") if Path(part).is_absolute() and Path(part).exists()]
        return paths

    def reference_for(self, test_task: str) -> Optional[str]:
        return None if self.reference is None else self.reference.get(test_task)

    def fingerprint(self) -> str:
        """What makes two runs comparable (space, tasks, evaluation); not the trial budget."""
        description = {
            "config": self.base_config,
            "methods": {n: {p: _domain_json(d) for p, d in s.parameters.items()} for n, s in self.methods.items()},
            "validation": self.validation_tasks,
            "test": self.test_tasks,
            "include_path": str(self.include_path),
            "metric": self.metric,
            "limit": self.limit,
        }
        if self.halves:  # the rung's scores are what trials are compared on
            description["halving_fraction"] = self.halving_fraction
        return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_document(self) -> Dict[str, Any]:
        """The validated space as a SPACE document (absolute paths); ``parse_space`` reads it back.

        Stored in the study, so that ``tune report`` needs only the storage URL.
        """
        tune: Dict[str, Any] = {
            "methods": {n: {p: _domain_yaml(d) for p, d in s.parameters.items()} for n, s in self.methods.items()},
            "tasks": {"validation": list(self.validation_tasks), "test": list(self.test_tasks)},
            "include_path": str(self.include_path),
            "seed": self.seed,
            "prune": self.prune,
            "halving": self.halving,
            "halving_fraction": self.halving_fraction,
        }
        for key in ("reference", "metric", "limit", "trials"):
            if getattr(self, key) is not None:
                tune[key] = getattr(self, key)
        return {**copy.deepcopy(self.base_config), "tune": tune}

    def summary(self) -> str:
        lines = [f"space {self.source}" + (" (default methods)" if self.defaults_used else "")]
        for name, space in self.methods.items():
            lines.append(f"  {name}: {space.describe()}")
        lines.append(f"  validation: {', '.join(self.validation_tasks)}")
        lines.append(f"  test: {', '.join(self.test_tasks)}")
        return "\n".join(lines)


def _parameter_names(method: str) -> Optional[set]:
    registered = registered_method(method)
    spec = getattr(registered, "spec", None)
    return None if spec is None else {p.name for p in spec.parameters}


def _domain_yaml(domain: Domain) -> Any:
    if isinstance(domain, Choice):
        return list(domain.values)
    if isinstance(domain, Range):
        entry: Dict[str, Any] = {"low": domain.low, "high": domain.high}
        if domain.log:
            entry["log"] = True
        if domain.step is not None:
            entry["step"] = domain.step
        return entry
    return domain.value


def _domain_json(domain: Domain) -> Any:
    if isinstance(domain, Choice):
        return {"choice": list(domain.values)}
    if isinstance(domain, Range):
        return {"low": domain.low, "high": domain.high, "log": domain.log, "step": domain.step, "int": domain.integer}
    return {"fixed": domain.value}


# --------------------------------------------------------------------------
# Loading and validation.


def load_space(path: Union[str, os.PathLike], **overrides: Any) -> TuneSpace:
    """Read and validate a SPACE file; ``overrides`` (trials, include_path, limit, seed, metric, prune, halving, halving_fraction) win.

    Raises ``SpaceError`` (one line: the file and the culprit) before anything is merged.
    """
    import yaml

    source = Path(path).absolute()
    if not source.is_file():
        raise SpaceError(f"{source}: no such SPACE file")
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SpaceError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_space(document, source, **overrides)


def parse_space(document: Any, source: Union[str, os.PathLike] = "<space>", **overrides: Any) -> TuneSpace:
    """Validate a SPACE already read as a dict (``source`` names it in errors)."""
    source = Path(source)
    where = str(source)

    def fail(message: str) -> SpaceError:
        return SpaceError(f"{where}: {message}")

    if not isinstance(document, dict):
        raise fail("a SPACE file is a YAML mapping (a mergekit config plus a `tune:` block)")
    document = dict(document)
    tune = _tune_block(document.pop("tune", None) or {}, overrides, fail)
    top_method = document.pop("merge_method", None)
    base_dir = source.parent if source.name != "<space>" else Path.cwd()
    _resolve_config_models(document, base_dir, fail)

    methods = _parse_methods(tune.get("methods"), top_method, document, fail)
    _check_fixed_parameters(document, methods, fail)
    validation, test = _parse_tasks(tune.get("tasks"), fail)
    space = TuneSpace(
        source=source,
        base_config=document,
        methods=methods,
        validation_tasks=validation,
        test_tasks=test,
        include_path=_parse_include_path(tune.get("include_path"), validation + test, base_dir, fail),
        reference=_parse_reference(tune.get("reference"), validation, test, base_dir, fail),
        defaults_used=tune.get("methods") is None and top_method is None,
        **_parse_run_options(tune, fail),
    )
    _check_configs(space, fail)
    return space


def _tune_block(tune: Any, overrides: Mapping[str, Any], fail) -> Dict[str, Any]:
    """The ``tune:`` mapping with its keys checked and the command line's overrides applied."""
    if not isinstance(tune, dict):
        raise fail("`tune:` must be a mapping")
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise fail(f"unknown key(s) under tune: {', '.join(unknown)}{_did_you_mean(unknown[0], TUNE_KEYS)} (known: {', '.join(TUNE_KEYS)})")
    tune = dict(tune)
    for key, value in overrides.items():
        if key not in TUNE_KEYS:
            raise TypeError(f"unknown override {key!r}")
        if value is not None:
            tune[key] = value
    return tune


def _resolve_config_models(document: Dict[str, Any], base_dir: Path, fail) -> None:
    """Check the mergekit part of the SPACE and resolve its model references in place (each listed once)."""
    for key in ("slices", "modules"):
        if document.get(key):
            raise fail(f"`{key}:` configs are not supported by tune; list whole models under `models:`")
    models = document.get("models")
    if not models:
        raise fail("no models: list the models to merge under `models:`")
    if not isinstance(models, list):
        raise fail("`models:` must be a list of {model: PATH} entries")
    resolved_models = []
    for index, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not entry.get("model"):
            raise fail(f"models[{index}] has no `model:` (write `- model: PATH`)")
        entry = dict(entry)
        entry["model"] = _resolve_model(entry["model"], base_dir, fail, f"models[{index}]")
        twin = next((i for i, other in enumerate(resolved_models) if other["model"] == entry["model"]), None)
        if twin is not None:
            raise fail(f"models[{index}] repeats models[{twin}] ({entry['model']}); list each model once")
        resolved_models.append(entry)
    document["models"] = resolved_models
    if document.get("base_model"):
        document["base_model"] = _resolve_model(document["base_model"], base_dir, fail, "base_model")
    parameters = document.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise fail("top-level `parameters:` must be a mapping")


def _parse_include_path(include_path: Any, tasks: Sequence[str], base_dir: Path, fail) -> Path:
    """The folder of lm-eval task YAMLs, which must define every task named."""
    if not include_path:
        raise fail("no include_path: give `tune.include_path` (or --include-path), the folder of the lm-eval task YAMLs")
    include_path = _resolve_path(str(include_path), base_dir)
    if not include_path.is_dir():
        raise fail(f"include_path {include_path} is not a folder")
    known_tasks = local_task_names(include_path)
    missing = [t for t in tasks if t not in known_tasks]
    if missing:
        raise fail(f"task(s) {', '.join(missing)} not found in {include_path} (found: {', '.join(sorted(known_tasks)) or 'none'})")
    return include_path


def _parse_run_options(tune: Mapping[str, Any], fail) -> Dict[str, Any]:
    """metric, limit, trials, seed, prune and halving of the ``tune:`` block, checked."""
    metric = tune.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise fail("tune.metric must be a metric name such as acc or exact_match")
    limit = _positive_int(tune.get("limit"), "limit", fail)
    trials = _positive_int(tune.get("trials"), "trials", fail)
    seed = tune.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(f"tune.seed must be an integer, not {seed!r}")
    prune = tune.get("prune", True)
    if not isinstance(prune, bool):
        raise fail(f"tune.prune must be true or false, not {prune!r}")
    halving = tune.get("halving", DEFAULT_HALVING)
    if not isinstance(halving, bool):
        raise fail(f"tune.halving must be true or false, not {halving!r}")
    fraction = tune.get("halving_fraction", DEFAULT_HALVING_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not 0 < fraction < 1:
        raise fail(f"tune.halving_fraction must be a number between 0 and 1 (the share of each validation task scored first), not {fraction!r}")
    return {
        "metric": metric,
        "limit": limit,
        "trials": trials,
        "seed": seed,
        "prune": prune,
        "halving": halving,
        "halving_fraction": float(fraction),
    }


def _positive_int(value: Any, name: str, fail) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"tune.{name} must be a positive integer, not {value!r}")
    return value


def _resolve_path(text: str, base_dir: Path) -> Path:
    """A relative path is taken from the working directory, else from the SPACE file's folder."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    if path.exists() or not (base_dir / path).exists():
        return path.absolute()
    return (base_dir / path).absolute()


def _looks_local(text: str, base_dir: Path) -> bool:
    """``merge``'s rule (a path, not a hub id), also for folders relative to the SPACE file."""
    from mergekit_ext.merge.preflight import _looks_local as merge_looks_local

    return merge_looks_local(text) or os.sep + os.sep in text or ("/" in text and (base_dir / text.split("/", 1)[0]).is_dir())


def _resolve_model(reference: Any, base_dir: Path, fail, where: str) -> str:
    """An absolute path for a local model (``PATH`` or ``PATH+LORA``); hub ids pass unchanged."""
    if not isinstance(reference, str):
        raise fail(f"{where}: a model is a path string, not {reference!r}")
    parts = [reference]
    if "+" in reference and not _resolve_path(reference, base_dir).exists():
        parts = reference.split("+", 1)
    resolved = []
    for part in parts:
        path = _resolve_path(part, base_dir)
        if path.exists():
            resolved.append(str(path))
        elif _looks_local(part, base_dir):
            raise fail(f"{where}: model {part} not found")
        else:
            resolved.append(part)  # a hub id; mergekit resolves it (offline runs need it cached)
    return "+".join(resolved)


def local_task_names(include_path: Path) -> set:
    """Task names declared by the YAMLs of an lm-eval include folder (``task:`` keys, groups too)."""
    import yaml

    names = set()
    for file in sorted(include_path.rglob("*.yaml")):
        try:
            config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            # lm-eval YAMLs may use its own !function tags; read the name without them.
            config = {}
            for line in file.read_text(encoding="utf-8").splitlines():
                if line.startswith(("task:", "group:")):
                    config[line.split(":", 1)[0]] = line.split(":", 1)[1].strip().strip("'\"")
        if not isinstance(config, dict):
            continue
        for key in ("task", "group"):
            value = config.get(key)
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, list):
                names.update(v for v in value if isinstance(v, str))
    return names


def _parse_tasks(tasks: Any, fail) -> Tuple[List[str], List[str]]:
    if tasks is None:
        raise fail("empty task list: give tune.tasks.validation (to choose on) and tune.tasks.test (to report)")
    if not isinstance(tasks, dict):
        raise fail("tune.tasks must be a mapping {validation: [TASK...], test: [TASK...]}")
    unknown = sorted(set(tasks) - {"validation", "test"})
    if unknown:
        raise fail(f"unknown key(s) under tune.tasks: {', '.join(unknown)} (use validation and test)")
    lists = {}
    for split in ("validation", "test"):
        value = tasks.get(split)
        if isinstance(value, str):
            value = [value]
        if not value:
            raise fail(f"empty task list: tune.tasks.{split} names no task")
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise fail(f"tune.tasks.{split} must be a list of lm-eval task names")
        if len(set(value)) != len(value):
            raise fail(f"tune.tasks.{split} lists a task twice")
        lists[split] = list(value)
    if len(lists["validation"]) != len(lists["test"]):
        raise fail(
            f"tune.tasks.validation has {len(lists['validation'])} task(s) and tune.tasks.test {len(lists['test'])}; "
            "they pair up in order (each validation task is the held-out split of the test task beside it)"
        )
    overlap = sorted(set(lists["validation"]) & set(lists["test"]))
    if overlap:
        raise fail(f"task(s) {', '.join(overlap)} are both validation and test; choosing on the test split would not be honest")
    return lists["validation"], lists["test"]


def _parse_reference(reference: Any, validation: List[str], test: List[str], base_dir: Path, fail) -> Optional[Dict[str, str]]:
    if reference is None:
        return None
    if isinstance(reference, str):
        model = _resolve_model(reference, base_dir, fail, "tune.reference")
        return {task: model for task in test}
    if not isinstance(reference, dict):
        raise fail("tune.reference is a model (one reference for every task) or a mapping {test task: expert model}")
    pair = dict(zip(validation, test))
    resolved: Dict[str, str] = {}
    for task, model in reference.items():
        if task in pair:
            task = pair[task]
        if task not in test:
            raise fail(f"tune.reference: {task!r} is not one of the tasks ({', '.join(test)})")
        resolved[task] = _resolve_model(model, base_dir, fail, f"tune.reference.{task}")
    return resolved


# --------------------------------------------------------------------------
# Methods and their parameters.


def registered_method(name: str):
    """mergekit's registered method called ``name`` (ours registered first), or None."""
    from mergekit.merge_methods import registry

    import mergekit_ext  # noqa: F401  (registers this package's methods)

    for method in registry.registered_methods():
        if method.spec.name == name:
            return method
    return None


def default_method_names() -> List[str]:
    """Every method of this package (but those needing a learned file), then task_arithmetic and ties."""
    from mergekit_ext import registry

    names = [m.spec.name for m in registry.our_methods() if not registry.needs_learned_file(m.spec.name)]
    return names + [n for n in DEFAULT_MERGEKIT_METHODS if n not in names]


def default_space(name: str) -> Dict[str, Any]:
    return copy.deepcopy(DEFAULT_SPACES.get(name, {}))


def _parse_methods(methods: Any, top_method: Any, document: Dict[str, Any], fail) -> Dict[str, MethodSpace]:
    if methods is None:
        if top_method is not None:
            methods = {top_method: None}
        else:
            methods = {name: None for name in default_method_names()}
    elif isinstance(methods, (list, tuple)):
        if not all(isinstance(m, str) for m in methods):
            raise fail("tune.methods as a list holds method names; write a mapping to give parameters")
        methods = {name: None for name in methods}
    elif isinstance(methods, str):
        methods = {methods: None}
    if not isinstance(methods, dict):
        raise fail("tune.methods must map method names to their parameter spaces")
    if not methods:
        raise fail("tune.methods is empty: name at least one merge method (or leave it out for the defaults)")
    parsed: Dict[str, MethodSpace] = {}
    for name, params in methods.items():
        method = registered_method(str(name))
        if method is None:
            from mergekit.merge_methods import registry

            known = sorted(m.spec.name for m in registry.registered_methods())
            raise fail(f"unknown merge method {name!r}{_did_you_mean(name, known)} (known: {', '.join(known)})")
        if params is None:
            params = default_space(name)
        if not isinstance(params, dict):
            raise fail(f"tune.methods.{name} must map parameter names to values, lists or {{low, high}} ranges")
        parsed[name] = _parse_method_space(method, params, document, fail)
    return parsed


def _parse_method_space(method, params: Mapping[str, Any], document: Dict[str, Any], fail) -> MethodSpace:
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    spec = method.spec
    name = spec.name
    by_name = {p.name: p for p in spec.parameters}
    if spec.contract.base == BasePolicy.REQUIRED and not document.get("base_model"):
        raise fail(f"merge method {name!r} needs a base_model")
    space = MethodSpace(name)
    for param_name, raw in params.items():
        parameter = by_name.get(param_name)
        if parameter is None:
            known = ", ".join(by_name) or "none"
            raise fail(f"merge method {name!r} has no parameter {param_name!r}{_did_you_mean(param_name, by_name)} (its parameters: {known})")
        where = f"tune.methods.{name}.{param_name}"
        if parameter.scope != ParameterScope.SHARED:
            for index, entry in enumerate(document["models"]):
                if param_name in (entry.get("parameters") or {}):
                    raise fail(f"{where} is tuned, but models[{index}] sets {param_name!r} itself; remove it there to tune it")
        space.parameters[param_name] = _parse_domain(parameter, raw, where, fail)
    shared = document.get("parameters") or {}
    for parameter in spec.parameters:
        if not parameter.required or parameter.name in space.parameters or parameter.name in shared:
            continue
        per_model = parameter.scope != ParameterScope.SHARED and all(
            parameter.name in (entry.get("parameters") or {}) for entry in document["models"]
        )
        if per_model:
            continue
        if parameter.name == "weight":
            space.filled["weight"] = 1.0  # mergekit's task-arithmetic family requires it; 1.0 is the plain sum
            continue
        raise fail(f"merge method {name!r} requires parameter {parameter.name!r}: give it under tune.methods.{name} or `parameters:`")
    return space


def _check_value(parameter, value: Any, where: str, fail) -> Any:
    """The method's own ``ParameterSpec.validate`` (ours name method and parameter), then known bounds."""
    try:
        checked = parameter.validate(value)
    except ValueError as error:  # pydantic's ValidationError is a ValueError too
        errors = getattr(error, "errors", None)
        if callable(errors):
            reason = "; ".join(item.get("msg", "") for item in errors())
            raise fail(f"{where}: invalid value {value!r}: {reason}") from None
        raise fail(f"{where}: {' '.join(str(error).split())}") from None
    if isinstance(checked, float) and not math.isfinite(checked):
        raise fail(f"{where}: invalid value {value!r}: {parameter.name} must be a finite number")
    bounds = MERGEKIT_BOUNDS.get(parameter.name)
    if bounds is not None and isinstance(checked, (int, float)) and not isinstance(checked, bool):
        low, high = bounds
        if not low <= checked <= high:
            raise fail(f"{where}: invalid value {value!r}: {parameter.name} must lie in [{low:g}, {high:g}]")
    return checked


def _check_fixed_parameters(document: Dict[str, Any], methods: Dict[str, "MethodSpace"], fail) -> None:
    """Top-level and per-model ``parameters:``: each name belongs to a tried method, each value passes its checks."""
    specs = {name: {p.name: p for p in registered_method(name).spec.parameters} for name in methods}
    sections = [("parameters", document.get("parameters") or {})]
    sections += [(f"models[{i}].parameters", entry.get("parameters") or {}) for i, entry in enumerate(document["models"])]
    for where, parameters in sections:
        if not isinstance(parameters, dict):
            raise fail(f"{where} must be a mapping")
        for name, value in parameters.items():
            owners = [method for method, by_name in specs.items() if name in by_name]
            if not owners:
                known = sorted({p for by_name in specs.values() for p in by_name})
                raise fail(f"{where}: no tried method has a parameter {name!r}{_did_you_mean(name, known)} (their parameters: {', '.join(known)})")
            if not _is_scalar(value):
                continue  # mergekit's per-layer lists and filters: left to mergekit's own validation
            for method in owners:
                _check_value(specs[method][name], value, f"{where}.{name}", fail)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _parse_domain(parameter, raw: Any, where: str, fail) -> Domain:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"low", "high", "log", "step"})
        if unknown or "low" not in raw or "high" not in raw:
            raise fail(f"{where}: a range is {{low: X, high: Y}} (optionally log: true, step: S); got {raw}")
        low = _check_value(parameter, raw["low"], f"{where}.low", fail)
        high = _check_value(parameter, raw["high"], f"{where}.high", fail)
        if isinstance(low, bool) or not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
            raise fail(f"{where}: a range needs numeric bounds")
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise fail(f"{where}: a range needs low < high (got {low:g} and {high:g})")
        log = raw.get("log", False)
        step = raw.get("step")
        if not isinstance(log, bool):
            raise fail(f"{where}.log must be true or false")
        if log and low <= 0:
            raise fail(f"{where}: a log range needs low > 0")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
            raise fail(f"{where}.step must be a positive number")
        if log and step is not None:
            raise fail(f"{where}: a range is either log or stepped, not both")
        integer = isinstance(low, int) and isinstance(high, int) and _rejects_fraction(parameter)
        return Range(low=low, high=high, log=log, step=step, integer=integer)
    if isinstance(raw, list):
        if not raw:
            raise fail(f"{where}: an empty list of values")
        if not all(_is_scalar(v) for v in raw):
            raise fail(f"{where}: list values must be numbers, strings or booleans")
        if len(set(map(repr, raw))) != len(raw):
            raise fail(f"{where}: a value is listed twice")
        for value in raw:
            _check_value(parameter, value, where, fail)
        return Choice(tuple(raw))
    if not _is_scalar(raw):
        raise fail(f"{where}: give a value, a list of values or a {{low, high}} range")
    _check_value(parameter, raw, where, fail)
    return Fixed(raw)


def _rejects_fraction(parameter) -> bool:
    try:
        parameter.validate(0.5)
    except Exception:
        return True
    return False


def _check_configs(space: TuneSpace, fail) -> None:
    """One sample config per method through mergekit's own config validation."""
    from mergekit_ext.engine import validate_config

    for name, method_space in space.methods.items():
        sample = {}
        for param, domain in method_space.parameters.items():
            if isinstance(domain, Choice):
                sample[param] = domain.values[0]
            elif isinstance(domain, Range):
                sample[param] = domain.low
            else:
                sample[param] = domain.value
        try:
            validate_config(space.config(name, sample), source=f"the {name} config")
        except ValueError as error:
            raise fail(" ".join(str(error).split())) from None

