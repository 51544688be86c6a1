"""The storage as workers use it, on a real PostgreSQL: budget, study lock, heartbeats, retries,
reconnection, and where the URL comes from."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

import search.storage
from search.storage import (
    BUDGET_ATTR,
    DEFAULT_STORAGE,
    HEARTBEAT_ATTR,
    MAX_RETRIES_ATTR,
    BudgetExhausted,
    SearchStorage,
    StorageSettings,
    StorageUnreachable,
    StudyRetry,
    open_storage,
    reap_stale_trials,
    redact,
    resolve_storage_url,
)
from search.study import claim_worker_slot
from tests.search.relay import TcpRelay

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]

FAST = StorageSettings(heartbeat_interval=1, grace_period=2)
X = optuna.distributions.FloatDistribution(0.0, 1.0)


@pytest.fixture
def storage(pg_url: str) -> SearchStorage:
    return SearchStorage(pg_url, FAST)


@pytest.fixture
def new_study(storage: SearchStorage, request: pytest.FixtureRequest) -> Callable[..., optuna.Study]:
    """A study named after the test, loaded as a worker loads it (through Optuna's cached storage)."""

    def make(budget: int | None = None, max_retries: int | None = None, suffix: str = "") -> optuna.Study:
        name = f"{request.node.name}{suffix}"
        optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
        study = optuna.load_study(study_name=name, storage=storage)
        if budget is not None:
            storage.set_study_system_attr(study._study_id, BUDGET_ATTR, budget)
        if max_retries is not None:
            storage.set_study_system_attr(study._study_id, MAX_RETRIES_ATTR, max_retries)
        return study

    return make


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def heartbeat_of(storage: SearchStorage, trial_id: int) -> object:
    session = storage.scoped_session()
    try:
        beat = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        return None if beat is None else beat.heartbeat
    finally:
        session.close()


# --- a trial's records and counts ---------------------------------------------------------------


@pytest.mark.parametrize("upsert", ["one statement", "a statement per attribute"])
def test_a_trials_attributes_go_in_one_transaction(
    upsert: str,
    storage: SearchStorage,
    new_study: Callable[..., optuna.Study],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if upsert == "a statement per attribute":  # as on a database without multi-row upserts
        monkeypatch.setattr(search.storage, "_UPSERT_DIALECTS", {})
    study = new_study()
    finished = study.ask()
    study.tell(finished, [0.0, 0.0])
    trial_id = study.ask()._trial_id
    storage.set_trial_user_attr(trial_id, "stopped", "an earlier attempt's value")
    commits: list[object] = []

    def count_commit(conn: object) -> None:
        commits.append(conn)

    sqlalchemy.event.listen(storage.engine, "commit", count_commit)
    try:
        storage.set_trial_attrs(
            trial_id,
            {"metrics": {"ks_stat": 0.1}, "stopped": None},
            {"constraints:collapse": -1.0, "artifacts:a1": '{"filename": "samples.png"}'},
        )
    finally:
        sqlalchemy.event.remove(storage.engine, "commit", count_commit)
    assert len(commits) == 1
    trial = storage.get_trial(trial_id)
    assert trial.user_attrs == {"metrics": {"ks_stat": 0.1}, "stopped": None}
    assert trial.constraints == {"collapse": -1.0}
    assert trial.system_attrs["artifacts:a1"] == '{"filename": "samples.png"}'

    # All or nothing: a value that cannot be stored leaves none of the batch behind, and a
    # finished trial takes no more.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_attrs(finished._trial_id, {"metrics": {}}, {})
    assert "metrics" not in storage.get_trial(finished._trial_id).user_attrs
    with pytest.raises(TypeError):
        storage.set_trial_attrs(trial_id, {"losses": {"total": 1.0}, "bad": object()}, {})
    assert "losses" not in storage.get_trial(trial_id).user_attrs


def test_trials_are_counted_by_state_in_the_database(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study()
    done, failed, _running = study.ask(), study.ask(), study.ask()
    study.tell(done, [1.0, 2.0])
    study.tell(failed, state=TrialState.FAIL)
    study.enqueue_trial({})
    assert storage.count_trials(study._study_id) == {
        **dict.fromkeys(TrialState, 0),
        TrialState.COMPLETE: 1,
        TrialState.FAIL: 1,
        TrialState.RUNNING: 1,
        TrialState.WAITING: 1,
    }


# --- the budget ---------------------------------------------------------------------------------


def test_no_trial_is_created_beyond_the_budget(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study(budget=2)
    first = study.ask()
    study.enqueue_trial({"x": 0.5})  # a waiting trial holds a place too
    with pytest.raises(BudgetExhausted):
        study.enqueue_trial({"x": 0.7})
    study.ask()  # takes the waiting trial up: no new place needed
    with pytest.raises(BudgetExhausted):
        study.ask()  # a loaded study creates trials through Optuna's cache
    with pytest.raises(BudgetExhausted):
        storage.create_new_trial(study._study_id)

    study.tell(first, state=TrialState.FAIL)  # a failed trial gives its place back
    study.ask()
    with pytest.raises(BudgetExhausted):
        study.ask()
    assert sorted(states(study)) == ["FAIL", "RUNNING", "RUNNING"]


def test_racing_workers_create_exactly_the_budget(
    pg_url: str, new_study: Callable[..., optuna.Study]
) -> None:
    budget, workers, attempts = 5, 8, 3
    study_id = new_study(budget=budget)._study_id
    # One storage (engine, connections) per thread, as separate worker processes have.
    storages = [SearchStorage(pg_url, FAST) for _ in range(workers)]
    start = threading.Barrier(workers)
    created: list[int] = []
    refused: list[int] = []

    def work(storage: SearchStorage) -> None:
        start.wait()
        for _ in range(attempts):
            try:
                created.append(storage.create_new_trial(study_id))
            except BudgetExhausted:
                refused.append(1)

    threads = [threading.Thread(target=work, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(created) == budget
    assert len(refused) == workers * attempts - budget
    assert storages[0].get_n_trials(study_id) == budget


def test_the_study_lock_holds_off_other_processes_and_is_reentrant(
    pg_url: str, storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study_id = new_study(budget=10)._study_id
    other = SearchStorage(pg_url, FAST)
    done = threading.Event()

    def create_elsewhere() -> None:
        other.create_new_trial(study_id)
        done.set()

    with storage.study_lock(study_id):
        with storage.study_lock(study_id):  # re-entered: the same hold, no deadlock
            storage.create_new_trial(study_id)  # takes the lock once more, in this thread
        thread = threading.Thread(target=create_elsewhere)
        thread.start()
        thread.join(timeout=1.0)
        assert not done.is_set(), "another process created a trial while the study lock was held"
    thread.join(timeout=60)
    assert done.is_set()
    assert storage.get_n_trials(study_id) == 2


# --- heartbeats and retries -----------------------------------------------------------------------


def test_a_heartbeat_attribute_is_recorded_as_a_heartbeat(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study()
    study.enqueue_trial({"x": 0.5})  # waiting: no heartbeat yet
    (waiting,) = study.get_trials()
    assert heartbeat_of(storage, waiting._trial_id) is None

    storage.set_trial_system_attr(waiting._trial_id, HEARTBEAT_ATTR, time.time())  # what the proxy relays

    assert heartbeat_of(storage, waiting._trial_id) is not None
    assert HEARTBEAT_ATTR not in storage.get_trial(waiting._trial_id).system_attrs


def test_a_running_trial_beats_from_its_start_so_a_dead_worker_is_always_found(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study(budget=4, max_retries=1)
    created = study.ask()  # then the worker dies: its heartbeat thread never starts
    created.suggest_float("x", 0.0, 1.0)
    study.enqueue_trial({"x": 0.25})
    popped = study.ask()  # a waiting trial taken up
    assert heartbeat_of(storage, created._trial_id) is not None
    assert heartbeat_of(storage, popped._trial_id) is not None

    time.sleep(FAST.grace_period + 1.5)  # past the grace period with no further beat
    reap_stale_trials(study)

    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    retries = {t.system_attrs["failed_trial"]: t for t in trials[2:]}
    assert set(retries) == {created.number, popped.number}
    assert all(t.state == TrialState.WAITING for t in retries.values())
    assert retries[created.number].params == {"x": created.params["x"]}


def test_a_trial_that_never_beat_is_stale_once_seen_silent_past_the_grace_period(
    pg_url: str, storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    # A creation whose reply was lost and which the worker made again on reconnect leaves a
    # running trial that never beats; a plain RDB storage creates one the same way.
    study = new_study(budget=3, max_retries=1)
    plain = optuna.load_study(study_name=study.study_name, storage=optuna.storages.RDBStorage(pg_url))
    silent = plain.ask({"x": X})
    assert heartbeat_of(storage, silent._trial_id) is None

    reap_stale_trials(study)  # first seen silent: not stale yet
    assert study.get_trials()[0].state == TrialState.RUNNING

    time.sleep(FAST.grace_period + 0.5)
    beating = study.ask()  # started since, beating: not stale
    reap_stale_trials(study)

    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.RUNNING]
    assert trials[1].number == beating.number
    (retry,) = trials[2:]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == silent.number
    assert retry.params == silent.params


def test_a_stale_trial_is_failed_with_its_reason_and_logged(
    storage: SearchStorage, new_study: Callable[..., optuna.Study], caplog: pytest.LogCaptureFixture
) -> None:
    study = new_study(budget=3, max_retries=1)
    optuna.create_study(study_name=f"{study.study_name}-other", storage=storage).ask()  # ids != numbers
    dead = study.ask({"x": X})
    time.sleep(FAST.grace_period + 1.5)

    with caplog.at_level(logging.WARNING, logger="search.storage"):
        assert reap_stale_trials(study) == [dead.number]

    failed, retry = study.get_trials()
    reason = failed.user_attrs["fail_reason"]
    assert failed.state == TrialState.FAIL and reason.startswith("stale: no heartbeat for ")
    assert reason.endswith(f" s (grace period {FAST.grace_period} s)")
    assert f"trial {dead.number} failed as {reason}; re-enqueued as trial {retry.number}" in caplog.text


def test_after_an_outage_of_its_own_a_process_gives_running_trials_the_grace_period_again(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study(budget=3, max_retries=1)
    quiet = study.ask({"x": X})  # its worker was cut off as well, and is about to beat again
    time.sleep(FAST.grace_period + 1.5)
    drop_connections(storage)  # this process's own outage: a call fails, then gets through

    assert reap_stale_trials(study) == []  # it could not have heard the trial's beats meanwhile
    assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(FAST.grace_period + 0.5)  # silent for a whole grace period since
    assert reap_stale_trials(study) == [quiet.number]


def test_a_retry_starts_clean_and_respects_the_studys_retry_limit(
    storage: SearchStorage, new_study: Callable[..., optuna.Study]
) -> None:
    study = new_study(max_retries=1)
    trial = study.ask({"x": X})
    trial.set_constraint("collapse", 1.0)
    trial.set_user_attr("baseline", "v3")
    storage.set_trial_system_attr(trial._trial_id, "artifacts:abc", "{}")
    study.tell(trial, state=TrialState.FAIL)

    StudyRetry()(study, storage.get_trial(trial._trial_id))

    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING
    assert retry.params == trial.params and retry.user_attrs["baseline"] == "v3"
    assert retry.system_attrs["retry_history"] == [trial.number]
    assert retry.constraints == {}
    assert "artifacts:abc" not in retry.system_attrs

    again = study.ask()  # the retry, taken up and failed once more: the limit of 1 is reached
    assert again.number == retry.number
    study.tell(again, state=TrialState.FAIL)
    StudyRetry()(study, storage.get_trial(again._trial_id))
    assert states(study) == ["FAIL", "FAIL"]


def test_a_retry_that_finds_the_budget_taken_is_dropped_not_raised(
    storage: SearchStorage, new_study: Callable[..., optuna.Study], caplog: pytest.LogCaptureFixture
) -> None:
    study = new_study(budget=1)
    trial = study.ask({"x": X})
    study.tell(trial, state=TrialState.FAIL)
    study.ask()  # a new trial took the freed place first

    with caplog.at_level(logging.WARNING, logger="search.storage"):
        StudyRetry()(study, storage.get_trial(trial._trial_id))

    assert sorted(states(study)) == ["FAIL", "RUNNING"]
    assert f"trial {trial.number} not retried" in caplog.text


def test_each_worker_gets_its_own_slot(pg_url: str, new_study: Callable[..., optuna.Study]) -> None:
    name = new_study().study_name
    assert [claim_worker_slot(optuna.load_study(study_name=name, storage=pg_url)) for _ in range(2)] == [0, 1]

    slots: list[int] = []
    studies = [optuna.load_study(study_name=name, storage=SearchStorage(pg_url, FAST)) for _ in range(6)]
    start = threading.Barrier(len(studies))

    def claim(study: optuna.Study) -> None:
        start.wait()
        slots.append(claim_worker_slot(study))

    threads = [threading.Thread(target=claim, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(slots) == [2, 3, 4, 5, 6, 7]


# --- connections ----------------------------------------------------------------------------------


def drop_connections(storage: SearchStorage) -> None:
    """Terminate every other connection to the storage's database, as a restart would."""
    admin = psycopg2.connect(
        storage.engine.url.render_as_string(hide_password=False).replace("+psycopg2", "")
    )
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cur.rowcount > 0
    admin.close()


@pytest.mark.parametrize("copy", ["as opened", "unpickled"])
def test_a_connection_dropped_while_idle_is_replaced(
    copy: str, pg_url: str, new_study: Callable[..., optuna.Study], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No retrying: only the idle ping stands between a dropped connection and an error.
    monkeypatch.setattr(search.storage, "IDLE_PING_S", 0.5)
    storage = SearchStorage(
        pg_url, StorageSettings(heartbeat_interval=1, grace_period=2, reconnect_timeout=0)
    )
    if copy == "unpickled":  # as a storage handed to another process arrives
        storage = pickle.loads(pickle.dumps(storage))
    study = optuna.load_study(study_name=new_study().study_name, storage=storage)
    study.ask()

    drop_connections(storage)
    time.sleep(0.6)

    study.ask()
    assert len(study.get_trials()) == 2


def test_a_connection_dropped_in_a_short_pause_fails_one_attempt_that_is_retried(
    pg_url: str, new_study: Callable[..., optuna.Study], caplog: pytest.LogCaptureFixture
) -> None:
    # Busy connections are not pinged (a round trip per call); the retry covers them instead.
    storage = SearchStorage(pg_url, FAST)
    study = optuna.load_study(study_name=new_study().study_name, storage=storage)
    study.ask()
    drop_connections(storage)

    with caplog.at_level(logging.INFO, logger="search.outages"):
        study.ask()
    assert len(study.get_trials()) == 2
    assert f"storage {redact(pg_url)} unreachable (server closed the connection unexpectedly)" in caplog.text
    assert f"storage {redact(pg_url)} reachable again after " in caplog.text


def test_a_storage_unreachable_past_the_reconnect_budget_fails_with_one_line(
    pg_url: str, new_study: Callable[..., optuna.Study]
) -> None:
    relay = TcpRelay(("127.0.0.1", 5432))
    url = make_url(pg_url).set(port=relay.port, password="s3cr3t").render_as_string(hide_password=False)
    storage = SearchStorage(url, StorageSettings(heartbeat_interval=1, grace_period=2, reconnect_timeout=1))
    study_id = storage.get_study_id_from_name(new_study().study_name)
    relay.cut()

    started = time.monotonic()
    with pytest.raises(StorageUnreachable) as gone:
        storage.get_all_trials(study_id)
    assert time.monotonic() - started < 10
    message = str(gone.value)
    assert message.startswith(f"storage {redact(url)}: unreachable for 1 s (CVAE_SEARCH_RECONNECT); ")
    assert "gave up on get_all_trials (connection to server at" in message and "Connection refused" in message
    assert "\n" not in message and "s3cr3t" not in message


# --- where the storage is -------------------------------------------------------------------------


def test_the_storage_url_comes_from_the_option_then_the_environment_then_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert resolve_storage_url(None) == DEFAULT_STORAGE
    default = open_storage(None, FAST)
    assert isinstance(default, SearchStorage) and (tmp_path / "cvae-search.db").exists()

    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path}/env.db")
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path}/env.db"
    assert resolve_storage_url(f"sqlite:///{tmp_path}/option.db") == f"sqlite:///{tmp_path}/option.db"
    open_storage(f"sqlite:///{tmp_path}/sub/option.db", FAST)
    assert (tmp_path / "sub" / "option.db").exists() and not (tmp_path / "env.db").exists()

    # The driver the project installs, also for a URL written without one.
    assert resolve_storage_url("postgresql://u@db:5432/s") == "postgresql+psycopg2://u@db:5432/s"
    assert resolve_storage_url("postgres://u@db/s") == "postgresql+psycopg2://u@db/s"
    assert resolve_storage_url("postgresql+psycopg2://u@db/s") == "postgresql+psycopg2://u@db/s"


def test_a_bad_storage_url_fails_with_the_reason() -> None:
    with pytest.raises(ValueError, match="expected grpc://HOST:PORT"):
        open_storage("grpc://nohost")
    with pytest.raises(
        ConnectionError, match=r"storage postgresql\+psycopg2://u:\*\*\*@127.0.0.1:1/x: cannot connect"
    ):
        open_storage(
            "postgresql://u:secret@127.0.0.1:1/x", StorageSettings(heartbeat_interval=1, grace_period=2)
        )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:s3cr3t@db:5432/optuna", "postgresql://user:***@db:5432/optuna"),
        ("postgresql+psycopg2://:s3cr3t@db/optuna", "postgresql+psycopg2://:***@db/optuna"),
        (
            "postgresql://db/optuna?user=u&password=s3cr3t&sslmode=require",
            "postgresql://db/optuna?user=u&password=***&sslmode=require",
        ),
        ("postgresql://user@db:5432/optuna", "postgresql://user@db:5432/optuna"),
        ("sqlite:///cvae-search.db", "sqlite:///cvae-search.db"),
        ("grpc://127.0.0.1:13000", "grpc://127.0.0.1:13000"),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cr3t" not in redact(url)
