"""Where studies live: resolving the storage URL and opening it the way workers need.

``--storage URL`` wins, then ``OPTUNA_STORAGE`` (as in Optuna's own CLI), then an embedded
SQLite file in the working directory, so one machine needs no server. PostgreSQL is the
storage for many workers; ``grpc://host:port`` reaches one through Optuna's storage proxy.

:class:`SearchStorage` is the RDB storage as cvae-search uses it:

- a pooled connection that sat idle for a while is checked before use (a ping, as
  ``pool_pre_ping`` does on every use: a round trip per storage call), so one dropped during
  a long epoch does not kill a worker, and each process keeps a small bounded pool;
- a call that finds the database unreachable (a restart, a failover) is retried for up to
  ``CVAE_SEARCH_RECONNECT`` seconds, then fails with one :class:`StorageUnreachable` line; an
  outage is logged once when it begins and once when it ends, and a worker behind the gRPC
  proxy retries the proxy's ``UNAVAILABLE`` the same way (:class:`ProxyStorage`);
- Optuna's heartbeat with a grace period marks the trials of dead workers stale, and
  :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` re-enqueues them with the same
  parameters, up to the study's ``max_retries``; a trial beats from the moment it runs, so a
  worker that dies before its heartbeat thread starts is found too, and a running trial that
  never beat at all (a creation whose reply was lost and which was made again on reconnect)
  is stale once this process has seen it silent for longer than the grace period;
- a trial is stale only once this process could have seen its heartbeats for a whole grace
  period: after an outage of its own (and, for the proxy, after it starts) a process gives
  every running trial the grace period again, so the workers it could not hear meanwhile are
  not failed while their first beats are on their way;
- a stale trial is failed with a ``fail_reason`` and logged by the process that fails it;
- a heartbeat sent as a trial system attribute (what a worker behind the gRPC proxy can
  send) is recorded as an Optuna heartbeat rather than stored;
- a trial's records (constraints, user attributes, artifact entries) can be written in one
  transaction (:func:`set_trial_attrs`), where Optuna's setters commit one at a time;
- creating a trial is refused with :class:`BudgetExhausted` once the study's budget of
  live trials (waiting, running, complete, pruned) is taken; the check and the insert happen
  under the study's lock (a PostgreSQL advisory lock, a file lock for SQLite), so any number
  of workers finish exactly the budget, and :func:`reap_stale_trials` fails a trial and
  re-enqueues it under the same lock, so the retry cannot lose its place to a new trial.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.orm
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from search.outages import Outages, Reconnecting, StorageUnreachable, retry_calls

__all__ = [
    "BUDGET_ATTR",
    "BudgetExhausted",
    "DEFAULT_STORAGE",
    "FAIL_REASON_ATTR",
    "HEARTBEAT_ATTR",
    "MAX_RETRIES_ATTR",
    "ProxyStorage",
    "SearchStorage",
    "StorageSettings",
    "StorageUnreachable",
    "StudyRetry",
    "describe_failure",
    "check_storage_url",
    "is_budget_exhausted",
    "json_safe",
    "known_experimental",
    "open_storage",
    "reap_stale_trials",
    "record_trial_attrs",
    "redact",
    "resolve_storage_url",
    "search_storage",
    "set_trial_attrs",
]

_log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///cvae-search.db"
BUDGET_ATTR = "cvae_search:n_trials"
MAX_RETRIES_ATTR = "cvae_search:max_retries"
HEARTBEAT_ATTR = "cvae_search:heartbeat"
FAIL_REASON_ATTR = "fail_reason"
_UPSERT_DIALECTS = {
    "postgresql": sqlalchemy.dialects.postgresql.insert,
    "sqlite": sqlalchemy.dialects.sqlite.insert,
}
"""Dialects whose INSERT takes ``ON CONFLICT DO UPDATE`` over many rows in one statement."""
LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
_ATTEMPT_ATTR_PREFIXES = (_CONSTRAINTS_KEY, ARTIFACTS_ATTR_PREFIX)


class BudgetExhausted(RuntimeError):
    """The study's trial budget is taken: no new trial may be created."""


def resolve_storage_url(url: str | None) -> str:
    """``url``, else ``$OPTUNA_STORAGE``, else the embedded default file.

    A PostgreSQL URL without a driver gets ``psycopg2``, the driver the project installs:
    SQLAlchemy 2.1 would otherwise pick ``psycopg`` (version 3).
    """
    url = url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE
    return re.sub(r"^postgres(?:ql)?://", "postgresql+psycopg2://", url)


def redact(url: str) -> str:
    """The URL without its password (in the user part or the query), for logs, exports and reports."""
    url = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


class StorageSettings:
    """Connection and liveness settings of one process; the environment can override them."""

    def __init__(
        self,
        *,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        pool_size: int | None = None,
        connect_timeout: int = 10,
        reconnect_timeout: float | None = None,
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
        # How long a storage call keeps retrying while the database is unreachable.
        self.reconnect_timeout = (
            reconnect_timeout
            if reconnect_timeout is not None
            else float(env.get("CVAE_SEARCH_RECONNECT", "120"))
        )
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat: expected interval >= 1 s and grace > interval, got "
                f"interval={self.heartbeat_interval} grace={self.grace_period}"
            )
        if self.reconnect_timeout < 0:
            raise ValueError(f"CVAE_SEARCH_RECONNECT: expected seconds >= 0, got {self.reconnect_timeout}")


class StudyRetry:
    """Optuna's stale-trial retry, with the retry limit the study itself stores.

    The retry starts clean: the failed attempt's constraints and artifacts are not carried
    over (Optuna ignores a constraint that is set twice). A retry that finds the budget
    taken (a new trial got the freed place first) is dropped with a warning rather than
    raised into the caller, which may be another worker's reaper.

    Returns:
        The number of the waiting trial that retries ``trial``, or ``None`` when none was made.
    """

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> int | None:
        limit = study._storage.get_study_system_attrs(study._study_id).get(MAX_RETRIES_ATTR)
        clean = copy.deepcopy(trial)
        clean.system_attrs = {
            k: v for k, v in trial.system_attrs.items() if not k.startswith(_ATTEMPT_ATTR_PREFIXES)
        }
        try:
            with known_experimental():
                RetryHeartbeatStaleTrialCallback(max_retry=limit)(study, clean)
        except Exception as e:
            if not is_budget_exhausted(e):
                raise
            _log.warning("trial %d not retried: its place in the budget was taken", trial.number)
            return None
        retry = waiting_retry(study, trial.number)
        if retry is None:
            _log.warning("trial %d not retried: it has had its max_retries (%s)", trial.number, limit)
        return None if retry is None else retry.number


def waiting_retry(study: optuna.Study, number: int) -> FrozenTrial | None:
    """The waiting trial that retries trial ``number`` (made by :class:`StudyRetry`), if any."""
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if (t.system_attrs.get("retry_history") or [None])[-1] == number:
            return t
    return None


def is_budget_exhausted(e: BaseException) -> bool:
    """Whether ``e`` is :class:`BudgetExhausted`, also as it arrives through the gRPC proxy."""
    return isinstance(e, BudgetExhausted) or "BudgetExhausted" in str(e)


def _disconnect_cause(e: BaseException) -> str | None:
    """Why the database could not be reached or dropped us, if ``e`` (or what it wraps) says so."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
            isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated
        ):
            return _first_line(seen.orig if isinstance(seen, sqlalchemy.exc.DBAPIError) else seen)
        seen = seen.__cause__
    return None


def _unavailable_cause(e: BaseException) -> str | None:
    """Why the gRPC proxy could not be reached, if ``e`` (or what it wraps) is ``UNAVAILABLE``."""
    import grpc

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, grpc.RpcError) and seen.code() == grpc.StatusCode.UNAVAILABLE:
            details = (seen.details() or "").strip().splitlines()
            return f"UNAVAILABLE: {details[0]}" if details else "UNAVAILABLE"
        seen = seen.__cause__
    return None


def describe_failure(e: BaseException) -> str:
    """One line for a failed storage call: the outage it met, or its real cause (Optuna wraps
    every database error in a message about invalid data in the commit)."""
    cause = _disconnect_cause(e) or _unavailable_cause(e)
    return f"storage unreachable ({cause})" if cause else _first_line(e)


class SearchStorage(Reconnecting, RDBStorage):
    """RDB storage with idle pings, reconnection, heartbeat relay and an exact trial budget
    (module docstring)."""

    def __init__(self, url: str, settings: StorageSettings | None = None) -> None:
        url = resolve_storage_url(url)
        self.settings = settings or StorageSettings()
        self._local = threading.local()
        self._outages = Outages(redact(url))
        self._silent_since: dict[int, float] = {}
        self._budgets: dict[int, int] = {}
        self._silent_lock = threading.Lock()
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("postgresql"):
            engine_kwargs.update(
                pool_size=self.settings.pool_size,
                max_overflow=1,
                pool_recycle=1800,
                connect_args={"connect_timeout": self.settings.connect_timeout},
            )
        elif url.startswith("sqlite"):
            engine_kwargs["connect_args"] = {"timeout": 60}
        with known_experimental():
            super().__init__(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=self.settings.heartbeat_interval,
                grace_period=self.settings.grace_period,
                heartbeat_stale_trial_callback=StudyRetry(),
            )
        _ping_when_idle(self.engine, IDLE_PING_S)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_local"], state["_silent_lock"], state["_outages"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)  # a new engine
        self._local = threading.local()
        self._silent_lock = threading.Lock()
        self._outages = Outages(redact(self.url))
        _ping_when_idle(self.engine, IDLE_PING_S)

    def _reconnect_budget_s(self) -> float:
        return self.settings.reconnect_timeout

    @staticmethod
    def _outage_cause(e: BaseException) -> str | None:
        return _disconnect_cause(e)

    def grace_from_now(self) -> None:
        """Judge no trial stale before it has had a whole grace period from now to beat (the
        proxy, when it starts: the heartbeats of the workers behind it could not arrive while
        it was down)."""
        self._outages.watch_from_now()

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_ATTR:
            self.record_heartbeat(trial_id)
            return
        super().set_trial_system_attr(trial_id, key, value)

    def set_trial_attrs(
        self, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
    ) -> None:
        """Set several attributes of a running trial in one transaction.

        Optuna's setters commit one attribute each, and a trial's records (constraints,
        grouped user attributes, artifact entries) are a dozen: on a server that flushes
        every commit to disk that was most of the search's own time per trial
        (benchmarks/RESULTS.md, section 4).
        """
        with _create_scoped_session(self.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            for model_cls, attrs in (
                (models.TrialUserAttributeModel, user_attrs),
                (models.TrialSystemAttributeModel, system_attrs),
            ):
                if attrs:
                    self._upsert_attrs(session, model_cls, trial_id, attrs)

    def _upsert_attrs(
        self,
        session: sqlalchemy.orm.Session,
        model_cls: type[models.TrialUserAttributeModel | models.TrialSystemAttributeModel],
        trial_id: int,
        attrs: Mapping[str, Any],
    ) -> None:
        insert = _UPSERT_DIALECTS.get(self.engine.name)
        if insert is None:  # Optuna's own upsert, one statement an attribute
            for key, value in attrs.items():
                self._set_trial_attr_without_commit(session, model_cls, trial_id, key, value)
            return
        stmt = insert(model_cls).values(
            [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[model_cls.trial_id, model_cls.key],
                set_={"value_json": stmt.excluded.value_json},
            )
        )

    def count_trials(self, study_id: int) -> dict[TrialState, int]:
        """The study's trials by state, counted by the database (no trial is loaded)."""
        with _create_scoped_session(self.scoped_session) as session:
            rows = (
                session.query(models.TrialModel.state, sqlalchemy.func.count(models.TrialModel.trial_id))
                .filter(models.TrialModel.study_id == study_id)
                .group_by(models.TrialModel.state)
                .all()
            )
        counts = dict.fromkeys(TrialState, 0)
        counts.update({state: int(n) for state, n in rows})
        return counts

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:
            self._first_heartbeat(trial_id)
        return changed

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # Optuna's cached storage, which every loaded study uses, calls this method rather
        # than create_new_trial, so the budget is enforced here.
        budget = self._budget(study_id)
        if budget is None:
            trial = super()._create_new_trial(study_id, template_trial)
        else:
            with self.study_lock(study_id):
                counts = self.count_trials(study_id)
                if sum(counts[s] for s in LIVE_STATES) >= budget:
                    raise BudgetExhausted(f"BudgetExhausted: study {study_id} has its {budget} trials")
                trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING:
            self._first_heartbeat(trial._trial_id)
        return trial

    def _budget(self, study_id: int) -> int | None:
        # Written once, when the study is created: a value once read holds, and reading it
        # again would load every study attribute (the definition among them) on each ask.
        if study_id not in self._budgets:
            budget = self.get_study_system_attrs(study_id).get(BUDGET_ATTR)
            if budget is None:
                return None
            self._budgets[study_id] = budget
        return self._budgets[study_id]

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return list(self._stale_trials(study_id))

    def _stale_trials(self, study_id: int) -> dict[int, str]:
        """The running trials that are stale, each with why: Optuna's (last heartbeat older than
        the grace period), and those that never beat and have stayed silent, as this process
        saw them, that long; none while this process has watched for less than the grace
        period (since an outage of its own, or since :meth:`grace_from_now`).

        Every trial this storage starts beats at once, so a silent one has no worker: its
        creation committed but the reply was lost, and the worker made it again on reconnect.
        Optuna's rule never finds such a trial, which would hold a place of the budget forever.
        The silence is timed on this process's clock, since the trial's start time comes from
        another machine's.
        """
        with _create_scoped_session(self.scoped_session) as session:
            now_db = session.execute(sqlalchemy.func.now()).scalar()
            rows = (
                session.query(models.TrialModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .outerjoin(
                    models.TrialHeartbeatModel,
                    models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id,
                )
                .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
                .all()
            )
        assert now_db is not None and self.grace_period is not None
        now_db = now_db.replace(tzinfo=None)  # as Optuna does: PostgreSQL returns an aware time
        grace = self.grace_period
        silent = {trial_id for trial_id, beat in rows if beat is None}
        now = time.monotonic()
        with self._silent_lock:
            seen = self._silent_since
            for trial_id in set(seen) - silent:
                del seen[trial_id]
            for trial_id in silent:
                seen.setdefault(trial_id, now)
        if self._outages.watched_s() <= grace:
            return {}
        stale = {}
        for trial_id, beat in rows:
            if beat is not None and (age := (now_db - beat).total_seconds()) > grace:
                stale[trial_id] = f"stale: no heartbeat for {age:.0f} s (grace period {grace} s)"
        for trial_id in sorted(silent):
            if (quiet := now - seen[trial_id]) > grace:
                stale[trial_id] = (
                    f"stale: running without a heartbeat for {quiet:.0f} s (grace period {grace} s)"
                )
        return stale

    def fail_stale_trial(self, trial_id: int, reason: str) -> bool:
        """Fail running trial ``trial_id`` with ``reason`` as its ``fail_reason``, in one
        transaction; ``False`` if it is no longer running (its worker finished it meanwhile)."""
        with _create_scoped_session(self.scoped_session) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            if trial.state != TrialState.RUNNING:
                return False
            trial.state = TrialState.FAIL
            trial.datetime_complete = datetime.datetime.now()
            self._upsert_attrs(session, models.TrialUserAttributeModel, trial_id, {FAIL_REASON_ATTR: reason})
        return True

    def _first_heartbeat(self, trial_id: int) -> None:
        # Optuna never finds a running trial stale until it has a heartbeat: without this one,
        # a worker dying before its heartbeat thread starts would hold a place forever.
        try:
            self.record_heartbeat(trial_id)
        except StorageUnreachable:
            raise
        except Exception as e:  # the worker's own heartbeat records it a moment later
            _log.warning("first heartbeat of trial id %d not recorded: %s", trial_id, describe_failure(e))

    @contextlib.contextmanager
    def study_lock(self, study_id: int) -> Iterator[None]:
        """Hold the study's lock: no trial of it is created meanwhile by any process.

        Re-entrant within a thread, so a trial can be failed and its retry created inside
        one hold (the retry then cannot lose its place to a new trial).
        """
        held: dict[int, int] = self._local.__dict__.setdefault("locks", {})
        if held.get(study_id):
            held[study_id] += 1
            try:
                yield
            finally:
                held[study_id] -= 1
            return
        with self._acquire(study_id):
            held[study_id] = 1
            try:
                yield
            finally:
                held[study_id] = 0

    @contextlib.contextmanager
    def _acquire(self, study_id: int) -> Iterator[None]:
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            # A session-level advisory lock on its own connection: released by the server
            # if this process dies while holding it, or if the connection drops.
            key = 0x63766165_0000 + study_id
            with self.engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    try:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        conn.commit()
                    except sqlalchemy.exc.DBAPIError as e:
                        # The connection is gone, and the server released the lock with it;
                        # never hand this connection back to the pool.
                        conn.invalidate()
                        _log.warning("study lock %d: connection lost (%s)", study_id, _first_line(e))
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


IDLE_PING_S = 5.0
"""A pooled connection idle this long is pinged before use. A connection that dies while in
use, or in a shorter pause, fails its call, which :meth:`SearchStorage._reconnecting` retries."""


def _ping_when_idle(engine: sqlalchemy.Engine, idle_s: float) -> None:
    @sqlalchemy.event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sqlalchemy.event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as e:
            # The pool drops this connection and checks out a fresh one (up to three tries).
            raise sqlalchemy.exc.DisconnectionError(_first_line(e)) from e


_PUBLIC_CALLS = tuple(n for n in dir(BaseStorage) if not n.startswith("_"))
# Every call that reaches the database, including the private ones Optuna's cached storage uses.
retry_calls(
    SearchStorage,
    (
        *_PUBLIC_CALLS,
        "record_heartbeat",
        "set_trial_attrs",
        "count_trials",
        "fail_stale_trial",
        "_stale_trials",
        "_create_new_trial",
        "_set_trial_param",
        "_get_trials",
        "_get_best_trial_id",
    ),
)


def reap_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the study's trials whose workers stopped beating and re-enqueue them.

    On a :class:`SearchStorage` each is failed with its ``fail_reason`` and logged, under the
    study lock, so a failed trial's retry cannot lose its place to a new trial; elsewhere this
    is Optuna's :func:`~optuna.storages.fail_stale_trials`.

    Returns:
        The numbers of the trials this call failed (on a :class:`SearchStorage`).
    """
    storage = search_storage(study._storage)
    if storage is None:
        if isinstance(study._storage, BaseHeartbeat):
            with known_experimental():
                optuna.storages.fail_stale_trials(study)
        return []
    if not storage._stale_trials(study._study_id):
        return []
    failed = []
    with storage.study_lock(study._study_id):
        for trial_id, reason in storage._stale_trials(study._study_id).items():
            if not storage.fail_stale_trial(trial_id, reason):
                continue
            trial = storage.get_trial(trial_id)
            retry = StudyRetry()(study, trial)
            failed.append(trial.number)
            _log.warning(
                "trial %d failed as %s; %s",
                trial.number,
                reason,
                "not re-enqueued" if retry is None else f"re-enqueued as trial {retry}",
            )
    return failed


@contextlib.contextmanager
def known_experimental() -> Iterator[None]:
    """Optuna's heartbeat and retry are marked experimental; they are what the service is built
    on, so the warning would only repeat on every worker start and every reap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (in nested dicts and lists) as ``None``: Optuna
    stores attributes as JSON, which has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def set_trial_attrs(
    trial: optuna.Trial, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
) -> None:
    """Set a running trial's attributes (see :func:`record_trial_attrs`)."""
    record_trial_attrs(trial.storage, trial._trial_id, user_attrs, system_attrs)


def record_trial_attrs(
    storage: BaseStorage, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
) -> None:
    """Set running trial ``trial_id``'s attributes: in one transaction on a
    :class:`SearchStorage`, one call each elsewhere (behind the gRPC proxy)."""
    search = search_storage(storage)
    if search is not None:
        search.set_trial_attrs(trial_id, user_attrs, system_attrs)
        return
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in system_attrs.items():
        storage.set_trial_system_attr(trial_id, key, value)


RECONNECT_BACKOFF_MAX_MS = 1000
"""How long a gRPC channel waits at most between attempts to reach the proxy again: gRPC's
default grows to two minutes, which would keep a worker cut off long after a restarted proxy
is back, and its trials' heartbeats with it."""


class ProxyStorage(Reconnecting, GrpcStorageProxy):
    """Optuna's gRPC storage proxy client, whose calls ride out a proxy outage: a call that
    finds the proxy ``UNAVAILABLE`` (down, restarting, out of reach) is retried as
    :class:`SearchStorage` retries a database disconnect."""

    def __init__(self, host: str, port: int, settings: StorageSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._outages = Outages(f"grpc://{host}:{port}")
        with known_experimental():
            super().__init__(host=host, port=port)

    def _setup(self) -> None:
        # Optuna's own channel and stub, with a short reconnect backoff (above).
        import grpc
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.client import GrpcClientCache

        self._channel = grpc.insecure_channel(
            f"{self._host}:{self._port}",
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
            ],
        )
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_local"], state["_outages"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._local = threading.local()
        self._outages = Outages(f"grpc://{state['_host']}:{state['_port']}")
        super().__setstate__(state)

    def _reconnect_budget_s(self) -> float:
        return self.settings.reconnect_timeout

    @staticmethod
    def _outage_cause(e: BaseException) -> str | None:
        return _unavailable_cause(e)


retry_calls(ProxyStorage, _PUBLIC_CALLS)


def search_storage(storage: BaseStorage) -> SearchStorage | None:
    """The :class:`SearchStorage` behind ``storage`` (a study's cached storage), if any."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, SearchStorage) else None


_URL_FORMS = "sqlite:///FILE, postgresql+psycopg2://USER@HOST/DB or grpc://HOST:PORT"


def check_storage_url(url: str, *, must_exist: bool = False) -> None:
    """Refuse a storage URL that cannot work, before anything is opened.

    Args:
        url: A resolved storage URL.
        must_exist: Also refuse a SQLite URL whose file does not exist, so that a command
            that only reads a study (``status``, ``export``, ``report``, ``worker``) given a
            mistyped path creates no empty database; only ``create`` and ``demo`` make one.

    Raises:
        ValueError: Not a URL, an unknown scheme, or its driver is not installed.
        FileNotFoundError: ``must_exist`` and the SQLite file is missing.
    """
    if url.startswith("grpc://"):
        return
    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        scheme = url.partition("://")[0]
        raise ValueError(f"storage {redact(url)}: unknown scheme {scheme!r}; expected {_URL_FORMS}") from None
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"storage: expected a URL such as {_URL_FORMS}, got {redact(url)!r}") from None
    except ImportError as e:
        raise ValueError(
            f"storage {redact(url)}: the database driver for {parsed.drivername!r} is not installed ({e})"
        ) from None
    database = parsed.database
    if must_exist and parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        path = Path(database).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"storage {url}: no such SQLite file {path.absolute()}; check --storage (or "
                "$OPTUNA_STORAGE), or create the study there with `cvae-search create`"
            )


def open_storage(
    url: str | None = None, settings: StorageSettings | None = None, *, create: bool = True
) -> BaseStorage:
    """Open the storage a worker, the CLI or the dashboard uses.

    Args:
        url: A SQLAlchemy URL, ``grpc://host:port``, or ``None`` for the environment's or
            the embedded default.
        settings: Connection and heartbeat settings.
        create: Make a SQLite file (and its folder) that does not exist yet; otherwise a
            missing one is an error (:func:`check_storage_url`).
    """
    url = resolve_storage_url(url)
    check_storage_url(url, must_exist=not create)
    if url.startswith("grpc://"):
        host, _, port = url.removeprefix("grpc://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"storage: expected grpc://HOST:PORT, got {url!r}")
        settings = settings or StorageSettings()
        proxy = ProxyStorage(host, int(port), settings)
        proxy.wait_server_ready(timeout=settings.connect_timeout)
        return proxy
    if create and url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return SearchStorage(url, settings)
    except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as e:
        raise ConnectionError(f"storage {redact(url)}: cannot connect ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e.__cause__ or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
