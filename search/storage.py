"""Where studies live: resolving the storage URL and opening it the way workers need.

``--storage URL`` wins, then ``OPTUNA_STORAGE`` (as in Optuna's own CLI), then an embedded
SQLite file in the working directory, so one machine needs no server. PostgreSQL is the
storage for many workers; ``grpc://host:port`` reaches one through Optuna's storage proxy.

:class:`SearchStorage` is the RDB storage as cvae-search uses it:

- connections are checked before use (``pool_pre_ping``; Optuna turns it on for MySQL only),
  so a database restart or an idle connection dropped during a long epoch does not kill a
  worker, and each process keeps a small bounded pool;
- Optuna's heartbeat with a grace period marks the trials of dead workers stale, and
  :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` re-enqueues them with the same
  parameters, up to the study's ``max_retries``;
- a heartbeat sent as a trial system attribute (what a worker behind the gRPC proxy can
  send) is recorded as an Optuna heartbeat rather than stored;
- creating a trial is refused with :class:`BudgetExhausted` once the study's budget of
  live trials (waiting, running, complete, pruned) is taken; the check and the insert happen
  under a database lock, so any number of workers finish exactly the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "BUDGET_ATTR",
    "BudgetExhausted",
    "DEFAULT_STORAGE",
    "HEARTBEAT_ATTR",
    "MAX_RETRIES_ATTR",
    "SearchStorage",
    "StorageSettings",
    "StudyRetry",
    "open_storage",
    "redact",
    "resolve_storage_url",
]

_log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///cvae-search.db"
BUDGET_ATTR = "cvae_search:n_trials"
MAX_RETRIES_ATTR = "cvae_search:max_retries"
HEARTBEAT_ATTR = "cvae_search:heartbeat"
LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


class BudgetExhausted(RuntimeError):
    """The study's trial budget is taken: no new trial may be created."""


def resolve_storage_url(url: str | None) -> str:
    """``url``, else ``$OPTUNA_STORAGE``, else the embedded default file."""
    return url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE


def redact(url: str) -> str:
    """The URL without its password, for logs, exports and reports."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class StorageSettings:
    """Connection and liveness settings of one process; the environment can override them."""

    def __init__(
        self,
        *,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        pool_size: int | None = None,
        connect_timeout: int = 10,
    ) -> None:
        env = os.environ
        self.heartbeat_interval = heartbeat_interval or int(env.get("CVAE_SEARCH_HEARTBEAT", "10"))
        self.grace_period = grace_period or int(
            env.get("CVAE_SEARCH_GRACE", str(3 * self.heartbeat_interval))
        )
        # Two connections cover the trial's session and the heartbeat thread; a third holds
        # the budget lock while the trial row is inserted.
        self.pool_size = pool_size or int(env.get("CVAE_SEARCH_POOL_SIZE", "2"))
        self.connect_timeout = connect_timeout
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat: expected interval >= 1 s and grace > interval, got "
                f"interval={self.heartbeat_interval} grace={self.grace_period}"
            )


class StudyRetry:
    """Optuna's stale-trial retry, with the retry limit the study itself stores."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        limit = study._storage.get_study_system_attrs(study._study_id).get(MAX_RETRIES_ATTR)
        RetryHeartbeatStaleTrialCallback(max_retry=limit)(study, trial)


class SearchStorage(RDBStorage):
    """RDB storage with pre-ping, heartbeat relay and an exact trial budget (module docstring)."""

    def __init__(self, url: str, settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings()
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            engine_kwargs.update(
                pool_size=self.settings.pool_size,
                max_overflow=1,
                pool_recycle=1800,
                connect_args={"connect_timeout": self.settings.connect_timeout},
            )
        elif url.startswith("sqlite"):
            engine_kwargs["connect_args"] = {"timeout": 60}
        super().__init__(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=self.settings.heartbeat_interval,
            grace_period=self.settings.grace_period,
            heartbeat_stale_trial_callback=StudyRetry(),
        )

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_ATTR:
            self.record_heartbeat(trial_id)
            return
        super().set_trial_system_attr(trial_id, key, value)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        budget = self.get_study_system_attrs(study_id).get(BUDGET_ATTR)
        if budget is None:
            return super().create_new_trial(study_id, template_trial)
        with self._budget_lock(study_id):
            live = self.get_n_trials(study_id, state=LIVE_STATES)
            if live >= budget:
                raise BudgetExhausted(f"BudgetExhausted: study {study_id} has its {budget} trials")
            return super().create_new_trial(study_id, template_trial)

    @contextlib.contextmanager
    def _budget_lock(self, study_id: int) -> Iterator[None]:
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            # A session-level advisory lock on its own connection: released by the server
            # if this process dies while holding it.
            key = 0x63766165_0000 + study_id
            with self.engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        elif dialect == "sqlite":
            database = self.engine.url.database
            if not database or database == ":memory:":
                yield
                return
            with open(f"{database}.lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        else:
            _log.warning("no budget lock for %s: concurrent workers may overshoot the budget", dialect)
            yield


def open_storage(url: str | None = None, settings: StorageSettings | None = None) -> BaseStorage:
    """Open the storage a worker, the CLI or the dashboard uses.

    Args:
        url: A SQLAlchemy URL, ``grpc://host:port``, or ``None`` for the environment's or
            the embedded default.
        settings: Connection and heartbeat settings.
    """
    url = resolve_storage_url(url)
    if url.startswith("grpc://"):
        from optuna.storages import GrpcStorageProxy

        host, _, port = url.removeprefix("grpc://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"storage: expected grpc://HOST:PORT, got {url!r}")
        proxy = GrpcStorageProxy(host=host, port=int(port))
        proxy.wait_server_ready(timeout=(settings or StorageSettings()).connect_timeout)
        return proxy
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return SearchStorage(url, settings)
    except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as e:
        raise ConnectionError(f"storage {redact(url)}: cannot connect ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e.__cause__ or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
