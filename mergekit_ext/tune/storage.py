"""The Optuna storage and the study in it: open (or create) it, refuse one of another space, read it back.

The study lives in an Optuna storage (by default ``OUT_DIR/study.db``, SQLite;
``--storage`` for a database shared by workers). It keeps what ``tune report``
and optuna-dashboard need without the SPACE file.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Union

import optuna

from mergekit_ext.tune import GRACE_FACTOR, HEARTBEAT_INTERVAL, TuneError
from mergekit_ext.tune.sampling import make_pruner, make_sampler
from mergekit_ext.tune.space import TuneSpace

STUDY_NAME = "tune"
MAX_RETRY = 2  # times a trial whose worker died is re-queued


def default_storage(out_dir: Union[str, os.PathLike]) -> str:
    return f"sqlite:///{Path(out_dir).absolute() / 'study.db'}"


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_storage(url: str, heartbeat: int = HEARTBEAT_INTERVAL):
    """An Optuna RDB storage with heartbeats: a trial whose worker dies is failed and re-queued.

    Each worker judges staleness with its own storage object: a trial whose
    last heartbeat is older than ``GRACE_FACTOR * heartbeat`` seconds is
    failed, and Optuna's retry callback queues the same setting again.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    quiet_optuna()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_FACTOR * heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
            except (IntegrityError, ProgrammingError, OperationalError) as error:
                # Workers started together on an empty database race to create Optuna's
                # tables (PostgreSQL: "duplicate key ... pg_type_typname_nsp_index",
                # SQLite: "table ... already exists"); the loser finds them made on its
                # next try.
                schema_race = not isinstance(error, OperationalError) or "already exists" in str(error)
                if attempt == 4 or not schema_race:
                    raise
                time.sleep(0.5 + attempt)
    except ImportError as error:  # the URL names a database whose driver is not installed
        raise TuneError(f"--storage {storage_label(url)}: {' '.join(str(error).split())[:300]}") from None
    except Exception as error:  # SQLAlchemy's errors: bad URL, server unreachable, bad credentials
        reason = " ".join(str(error).split("\n")[0].split())[:300]
        raise TuneError(f"--storage {storage_label(url)}: cannot open the study storage: {reason}") from None



def open_study(space: TuneSpace, storage: Union[str, Any], study_name: str = STUDY_NAME, *, shared: bool = False, heartbeat: int = HEARTBEAT_INTERVAL):
    """Create or load the study; refuse one that was made for another space.

    The study keeps what ``tune report`` and optuna-dashboard need without the
    SPACE file: the validated space itself (``space`` user attr), and per trial
    its setting, validation scores and worker.
    """
    quiet_optuna()
    if isinstance(storage, str):
        storage = make_storage(storage, heartbeat)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=make_sampler(space, shared=shared),
        pruner=make_pruner(space),
        load_if_exists=True,
    )
    fingerprint = space.fingerprint()
    existing = study.user_attrs.get("space_fingerprint")
    if existing is None:
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("space_source", str(space.source))
        study.set_user_attr("validation_tasks", space.validation_tasks)
        study.set_user_attr("test_tasks", space.test_tasks)
        study.set_user_attr("space", space.to_document())
        with contextlib.suppress(Exception):  # optional display name (experimental in Optuna)
            study.set_metric_names(["validation mean"])
    elif existing != fingerprint:
        raise TuneError(
            f"study {study_name!r} in {storage_label(storage)} was made for another space "
            f"({study.user_attrs.get('space_source')}: its methods, models, tasks or --limit differ); "
            "use another OUT_DIR or --study-name"
        )
    return study


def storage_label(storage) -> str:
    url = storage if isinstance(storage, str) else getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "url", None) or type(storage).__name__
    if "@" in url:  # hide credentials of a database URL
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://…@{rest.split('@', 1)[1]}"
    return url


def load_stored_study(storage: str, study_name: str = STUDY_NAME, *, heartbeat: int = HEARTBEAT_INTERVAL):
    """(study, space) of a study some worker made, read from its storage alone (no SPACE file, no worker)."""
    from mergekit_ext.tune.space import SpaceError, parse_space

    quiet_optuna()
    backend = make_storage(storage, heartbeat)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(backend, include_best_trial=False)]
    if study_name not in names:
        raise TuneError(f"{storage_label(storage)} holds no study {study_name!r} (it holds: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=backend)
    document = study.user_attrs.get("space")
    if not isinstance(document, dict):
        raise TuneError(f"study {study_name!r} in {storage_label(storage)} was not made by mergekit-ext tune (it stores no space)")
    try:
        space = parse_space(document, study.user_attrs.get("space_source") or "<stored space>")
    except SpaceError as error:
        raise TuneError(f"study {study_name!r}: its space cannot be used on this machine: {error}") from None
    if space.fingerprint() != study.user_attrs.get("space_fingerprint"):
        raise TuneError(f"study {study_name!r}: its stored space does not match its fingerprint; was it made by another version?")
    return study, space
