"""How a tuning run works beside the space: ``RunOptions`` and the evaluation and merge settings they give."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mergekit_ext.tune import HEARTBEAT_INTERVAL
from mergekit_ext.tune.scoring import EvalSettings
from mergekit_ext.tune.space import TuneSpace
from mergekit_ext.tune.storage import STUDY_NAME


@dataclass
class RunOptions:
    """How a tuning run works beside the space: storage, workers, output, evaluation."""

    storage: Optional[str] = None
    study_name: str = STUDY_NAME
    n_jobs: int = 1
    keep: bool = False
    progress: bool = True
    batch_size: int = 64
    device: str = "cpu"
    threads: Optional[int] = None
    heartbeat: int = HEARTBEAT_INTERVAL
    echo: Callable[[str], None] = field(default=print, repr=False)


def evaluation_settings(space: TuneSpace, options: RunOptions, out_dir: Path) -> EvalSettings:
    return EvalSettings(
        include_path=space.include_path,
        limit=space.limit,
        metric=space.metric,
        batch_size=options.batch_size,
        device=options.device,
        threads=options.threads,
        cache_dir=out_dir / "evals",
    )


def engine_options(options: RunOptions):
    from mergekit_ext.engine import quiet_options

    return quiet_options(device=options.device) if options.device != "cpu" else quiet_options()
