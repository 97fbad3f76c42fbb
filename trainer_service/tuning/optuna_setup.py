"""Optuna wired to a `StudyConfig`: the RDB storage in the job store's database, the sampler and the pruner.

Storage: in the job store's database, SQLite or PostgreSQL (so every trainer replica and every trial worker shares
the studies). On SQLite, Optuna's tables (`studies`, `trials`, `trial_params`, `alembic_version`, …; see
optuna/storages/_rdb/models.py) live in the same file as the job store, whose tables all carry a `vt_` prefix and
whose schema version is `PRAGMA user_version`, which Alembic never touches: neither side sees the other's tables.
The file is in WAL mode (whichever side opens it first sets it; the mode is persistent), and Optuna's connections
wait up to 30 s for a lock instead of failing at once while the job store writes. Python 3.11's sqlite3 begins a
transaction only at the first write, so Optuna's read-then-write sessions take the write lock through the busy
handler rather than failing on a stale read snapshot.

Pruning: a trial reports the objective once per epoch with `trial.report(value, step=epochs_done)`, where
`epochs_done` counts from 1. Optuna's pruners count resource in steps, so `min_resource` epochs are step
`min_resource`, and Hyperband's `max_resource` is the most epochs a trial trains.

Every process that samples must open the study with `load_study` (one process asking is best: samplers with the
same seed in two processes propose the same values). A storage does not survive pickling with its settings
intact; open it again with `open_storage` in each process.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import optuna
import sqlalchemy as sa
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, CmaEsSampler, GPSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from visiontune.database import normalize_url

from trainer_service.tuning.space import grid_search_space
from trainer_service.tuning.study_config import PrunerType, SamplerType, StudyConfig

__all__ = [
    "DIRECTION_ATTR",
    "LOCK_TIMEOUT_S",
    "METRIC_ATTR",
    "AskTellGridSampler",
    "create_study",
    "load_study",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "sampler_seed",
    "storage_url",
]

# Study user attributes the worker process reads (the StudyConfig itself stays in the job store).
METRIC_ATTR: Final = "metric"
DIRECTION_ATTR: Final = "direction"
# How long an Optuna connection waits for the job store (or another process) to release the write lock.
LOCK_TIMEOUT_S: Final = 30.0
# Any constant: the key of the advisory lock creating Optuna's tables holds on PostgreSQL ("vt" + "optuna" in ASCII).
_SCHEMA_LOCK: Final = 0x76746F7074756E61


def storage_url(database: str | Path) -> str:
    """SQLAlchemy's URL of the job store's database: a URL as it is (psycopg 3 for PostgreSQL), a path as an absolute
    `sqlite:////abs/path` (so a process's cwd is moot)."""
    if isinstance(database, Path):
        return "sqlite:///" + str(database.absolute())
    return normalize_url(database).render_as_string(hide_password=False)


def open_storage(database: str | Path) -> RDBStorage:
    """Optuna's RDB storage in the job store's database (a URL, or a SQLite file's path), creating Optuna's tables
    when missing."""
    url = storage_url(database)
    if not url.startswith("sqlite"):
        # Optuna creates its tables and enum types without a lock: replicas starting together on a fresh database
        # would both CREATE TYPE and one fail. The first takes the lock and creates them; the others wait, then find
        # them made. A dropped connection (a database restart) is replaced before use, not handed to Optuna.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
        engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
                try:
                    return RDBStorage(url, engine_kwargs=engine_kwargs)
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
        finally:
            engine.dispose()
    path = Path(sa.make_url(url).database or "")
    path.parent.mkdir(parents=True, exist_ok=True)
    # WAL lets readers run beside one writer; it is persistent, so this is a no-op once the job store set it.
    with contextlib.closing(sqlite3.connect(path, timeout=LOCK_TIMEOUT_S)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": LOCK_TIMEOUT_S}})


class AskTellGridSampler(GridSampler):
    """optuna's GridSampler for ask-and-tell: its `after_trial` calls `study.stop()` once the grid is done, which
    raises RuntimeError outside `study.optimize` (so the last `study.tell` would fail). Here the runner stops: a GRID
    study's `max_trials` is at most the grid's size (`validate_study`)."""

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        return None


def sampler_seed(config: StudyConfig) -> int:
    """The study's seed folded into 32 bits: samplers seed numpy's RandomState, which refuses more; the proto's is
    a uint64."""
    return config.seed % 2**32


def make_sampler(config: StudyConfig) -> BaseSampler:
    seed = sampler_seed(config)
    match config.sampler:
        case SamplerType.TPE:
            # Multivariate TPE models the parameters jointly (optuna's default for one objective, made explicit);
            # constant liar keeps parallel trials from proposing the same point while others run (no-op when serial).
            return TPESampler(seed=seed, multivariate=True, constant_liar=True)
        case SamplerType.GAUSSIAN_PROCESS:
            return GPSampler(seed=seed)
        case SamplerType.RANDOM:
            return RandomSampler(seed=seed)
        case SamplerType.GRID:
            return AskTellGridSampler(grid_search_space(config), seed=seed)
        case SamplerType.CMA_ES:
            # Categorical parameters are sampled independently (at random): documented in SamplerType, so the
            # per-trial warning would only be noise in the log.
            return CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise AssertionError(f"unhandled sampler {config.sampler}")


def make_pruner(config: StudyConfig) -> BasePruner:
    p = config.pruner
    match p.type:
        case PrunerType.NONE:
            return NopPruner()
        case PrunerType.HYPERBAND:
            return HyperbandPruner(
                min_resource=p.min_resource, max_resource=config.max_trial_epochs, reduction_factor=p.reduction_factor
            )
        case PrunerType.SUCCESSIVE_HALVING:
            return SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
        case PrunerType.MEDIAN:
            # MedianPruner prunes from step n_warmup_steps on; steps are 1-based epochs, so that is min_resource.
            return MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_resource)
    raise AssertionError(f"unhandled pruner {p.type}")


def create_study(storage: RDBStorage, study_id: str, config: StudyConfig) -> optuna.Study:
    """The study named `study_id`, created or (after a restart) loaded, with the metric and direction as user
    attributes so a worker process needs no StudyConfig to read them."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_id,
        direction=config.direction.value,
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        load_if_exists=True,
    )
    study.set_user_attr(METRIC_ATTR, config.metric.value)
    study.set_user_attr(DIRECTION_ATTR, config.direction.value)
    return study


def load_study(storage: RDBStorage, study_id: str, config: StudyConfig) -> optuna.Study:
    """The existing study named `study_id` with `config`'s sampler and pruner; KeyError when it does not exist."""
    return optuna.load_study(
        study_name=study_id, storage=storage, sampler=make_sampler(config), pruner=make_pruner(config)
    )
