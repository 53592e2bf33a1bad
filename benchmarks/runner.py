"""The one benchmark runner: (label, merge_method, parameters) rows in, merges out.

Every benchmark (speed, quality) describes what to merge as a list of
``MergeSpec`` rows and hands them to the functions here, so every method,
ours and mergekit's, goes through the same engine on the same inputs:

* ``run_yaml`` runs the stock ``mergekit-yaml`` command in a child process and
  measures its wall time and peak resident memory (``os.wait4`` returns the
  child's own ``ru_maxrss``, so each merge is measured alone);
* ``run_in_process`` runs the same config through ``engine.run_merge_atomic`` (mergekit's ``run_merge``)
  (cheaper for the many small merges of the quality benchmark).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(__file__).resolve().parent / "work"

# mergekit's built-in baselines the benchmarks compare against.
MERGEKIT_BASELINES = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "model_stock")


@dataclass(frozen=True)
class MergeSpec:
    """One row of a benchmark: a label, a registered merge method, its parameters.

    ``parameters`` go to the config's top-level ``parameters`` (mergekit applies
    per-model ones to every model). ``use_base`` None asks the method's
    contract: a base model is passed when the method requires one.
    """

    label: str
    method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    use_base: Optional[bool] = None


def ensure_registered() -> None:
    """Register this checkout's methods with mergekit (the explicit route)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from mergekit_ext.registry import register_all

    register_all()


def our_method_names() -> List[str]:
    """Names of every method this package registers that runs with defaults alone, in documentation order.

    Methods that apply a learned file (``adarank``) are left out.
    """
    ensure_registered()
    from mergekit_ext.registry import needs_learned_file, our_methods

    return [method.spec.name for method in our_methods() if not needs_learned_file(method.spec.name)]


def method_spec(name: str):
    ensure_registered()
    from mergekit.merge_methods import registry

    return registry.get(name).spec


def needs_base(name: str) -> bool:
    from mergekit.merge_methods.base import BasePolicy

    return method_spec(name).contract.base == BasePolicy.REQUIRED


def merge_config(spec: MergeSpec, base: Optional[Path], models: Sequence[Path], *, dtype: str = "bfloat16") -> Dict[str, Any]:
    """A mergekit YAML config (as a dict) for ``spec`` over absolute model paths."""
    use_base = needs_base(spec.method) if spec.use_base is None else spec.use_base
    if use_base and base is None:
        raise ValueError(f"{spec.label}: method {spec.method} needs a base model and none was given")
    config: Dict[str, Any] = {
        "merge_method": spec.method,
        "models": [{"model": str(Path(path).absolute())} for path in models],
        "dtype": dtype,
    }
    if use_base:
        config["base_model"] = str(Path(base).absolute())
    if spec.parameters:
        config["parameters"] = dict(spec.parameters)
    return config


def child_env(threads: Optional[int] = None) -> Dict[str, str]:
    """Environment for merge subprocesses: this checkout first on the path, offline."""
    env = dict(os.environ)
    # the checkout's startup hook too, so that stock mergekit-yaml registers this checkout's methods
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "startup"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    return env


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mib: float
    returncode: int
    cpu_s: float = 0.0  # user + system time of the child: steadier than wall time on a busy machine
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_measured(command: Sequence[str], *, log_path: Path, env: Optional[Dict[str, str]] = None, timeout_s: Optional[float] = None) -> Measurement:
    """Run ``command`` as a child process; its wall time and its own peak RSS.

    Output goes to ``log_path`` (a pipe could fill and stall the child).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid != 0:
                break
            if deadline is not None and time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    tail = log_path.read_text(errors="replace")[-2000:]
    return Measurement(
        wall_s=wall,
        peak_rss_mib=usage.ru_maxrss / 1024.0,
        returncode=process.returncode,
        cpu_s=usage.ru_utime + usage.ru_stime,
        log_tail=tail,
    )


def run_yaml(
    config: Mapping[str, Any],
    out: Path,
    *,
    threads: Optional[int] = None,
    device: Optional[str] = None,
    timeout_s: Optional[float] = None,
    extra_args: Sequence[str] = (),
    copy_tokenizer: bool = False,
) -> Measurement:
    """Run the stock ``mergekit-yaml`` on ``config`` writing ``out``; measured.

    The tokenizer is copied only when asked (a model to evaluate needs it; a speed run does not)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    config_path = out.parent / f"{out.name}.yml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    executable = shutil.which("mergekit-yaml") or "mergekit-yaml"
    command = [executable, str(config_path), str(out), "--no-write-model-card", "--quiet", *([] if copy_tokenizer else ["--no-copy-tokenizer"]), *extra_args]
    if device and device != "cpu":
        command += ["--device", device]
    return run_measured(command, log_path=out.parent / f"{out.name}.log", env=child_env(threads), timeout_s=timeout_s)


def run_in_process(config: Mapping[str, Any], out: Path, *, device: str = "cpu") -> float:
    """Run ``config`` through mergekit's engine in this process; returns wall seconds."""
    from mergekit_ext.engine import quiet_options, run_merge_atomic

    start = time.perf_counter()
    run_merge_atomic(config, out, options=quiet_options(device=device), overwrite=True)
    return time.perf_counter() - start


def machine_description() -> Dict[str, Any]:
    """What the numbers were measured on: cores, memory, CPU model, library versions."""
    import platform

    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    from importlib.metadata import version

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "commit": commit,
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(out_dir: str | os.PathLike, name: str, result: Mapping[str, Any], markdown: str, *, echo: bool = True) -> Path:
    """Write ``name.json`` and ``name.md`` into ``out_dir`` (JSON via a temporary file); print the Markdown if ``echo``."""
    from mergekit_ext.io import write_json

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", dict(result))
    (folder / f"{name}.md").write_text(markdown)
    if echo:
        print(markdown)
    return folder


def zoo_context(zoo) -> Dict[str, Any]:
    """The header every zoo benchmark's result starts with: machine, zoo folder, preset."""
    return {
        "machine": machine_description(),
        "zoo": str(zoo.root),
        "preset": zoo.manifest.get("preset", {}).get("name"),
    }


def add_zoo_arguments(parser, *, name: str, zoo_required: bool = True) -> None:
    """The options every zoo benchmark (quality, continual, LoRA) shares."""
    parser.add_argument("--zoo", required=zoo_required, help="a zoo built by `mergekit-ext zoo DIR --preset demo|bench`")
    parser.add_argument("--device", default="cpu", help="torch device for merging and lm-eval (cpu, cuda)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for merges and lm-eval (default: torch's); 1 lets two benchmarks share a 2-core "
        "machine without the threads of one spinning against the other's",
    )
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default=name, help="basename of the result files")
    parser.add_argument("--keep", action="store_true", help="keep merged models in the work dir")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
