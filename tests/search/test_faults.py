"""Fault injection with real worker processes on the real PostgreSQL and Optuna's gRPC proxy.

The faults: a worker's launcher killed outright, the proxy killed and restarted under live
workers, a worker cut off from the database past the grace period while it trains, and the
database gone for good. Database outages go through a TCP relay the test cuts (the shared
server is never restarted); proxy outages kill and restart the proxy process. Liveness runs
fast: heartbeat 1 s, grace 4 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.cli import main
from search.storage import is_budget_exhausted, open_storage
from tests.conftest import CliProcesses
from tests.search.relay import TcpRelay
from tests.search.test_worker import (
    ENDLESS_EPOCHS,
    assert_budget_met_exactly,
    count,
    create,
    in_trial,
    retries_of,
    start_worker,
    trials_of,
    wait_until,
)

pytestmark = pytest.mark.postgres

HEARTBEAT_S = 1
GRACE_S = 4
WORKER_TIMEOUT = 240
PASSWORD = "hunter2"
"""Put in the storage URLs the workers get; the server trusts local connections and ignores it."""
PROXY_TRIAL_EPOCHS = 200
"""A trial of some 20 s: long enough to train through a proxy outage and the proxy's restart."""
CUT_OFF_EPOCHS = 150
"""A trial of some 15 s: long enough for its worker to be cut off past the grace period and
have the trial failed as stale before its training ends."""
SHORT_EPOCHS = 40


@pytest.fixture
def cli(search_env: dict[str, str], tmp_path: Path) -> Iterator[CliProcesses]:
    """As the shared fixture, with this module's liveness settings."""
    env = {**search_env, "CVAE_SEARCH_HEARTBEAT": str(HEARTBEAT_S), "CVAE_SEARCH_GRACE": str(GRACE_S)}
    processes = CliProcesses(env, tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def observer(pg_url: str) -> RDBStorage:
    """A plain Optuna storage on the test database: it reads, and never fails or retries a trial."""
    return RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True})


@pytest.fixture
def liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's commands (``status``) judge staleness as the workers do."""
    monkeypatch.setenv("CVAE_SEARCH_HEARTBEAT", str(HEARTBEAT_S))
    monkeypatch.setenv("CVAE_SEARCH_GRACE", str(GRACE_S))


@pytest.fixture
def relay() -> Iterator[TcpRelay]:
    r = TcpRelay(("127.0.0.1", 5432))
    try:
        yield r
    finally:
        r.cut()


def through(url: str, relay: TcpRelay | None = None) -> str:
    """``url`` with a password, and through ``relay`` when given."""
    u = make_url(url).set(password=PASSWORD)
    if relay is not None:
        u = u.set(host="127.0.0.1", port=relay.port)
    return u.render_as_string(hide_password=False)


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whichever process adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(cli: CliProcesses, url: str, port: int) -> Any:
    proxy = cli.start("proxy", "--port", str(port), name="proxy")

    def listening() -> bool:
        assert proxy.poll() is None, cli.output(proxy)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60, "the proxy to listen")
    return proxy


# --- 10, 14: a launcher killed outright ------------------------------------------------------------


def test_a_launcher_killed_outright_takes_its_workers_along_and_their_trials_are_retried(
    cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, observer: RDBStorage
) -> None:
    name = "launcher-killed"
    create(tiny_study(name, n_trials=4, epochs=ENDLESS_EPOCHS), pg_url)
    launcher = start_worker(cli, name, through(pg_url), cli.logs / "artifacts", "--processes", "2")
    wait_until(lambda: in_trial(observer, name, 2), 120, "both worker processes in a trial")
    workers = children_of(launcher.pid)
    assert len(workers) == 2
    for pid in workers:  # the URL and its password reach them through the environment
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"postgresql" not in cmdline and PASSWORD.encode() not in cmdline, cmdline

    os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
    launcher.wait(timeout=10)
    wait_until(lambda: all(ended(pid) for pid in workers), 20, "the worker processes to end with it")

    trials = trials_of(observer, name)
    assert count(trials, TrialState.RUNNING) == 0
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2
    for t in stopped:
        reason = t.user_attrs["fail_reason"]
        assert reason == "interrupted: the worker received SIGTERM (its parent process ended)"
        (retry,) = retries_of(trials, t)
        assert retry.state == TrialState.WAITING
        assert retry.params == t.params


# --- 11, 12, 9: the proxy restarted under live workers ---------------------------------------------


def test_workers_behind_the_proxy_ride_out_its_restart_and_keep_their_trials(
    cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, observer: RDBStorage
) -> None:
    port = _free_port()
    cli.env = {**cli.env, "OPTUNA_STORAGE": through(pg_url)}  # the proxy's, off its command line
    proxy = start_proxy(cli, pg_url, port)
    name = "proxy-restart"
    create(tiny_study(name, n_trials=2, epochs=PROXY_TRIAL_EPOCHS), pg_url)
    grpc_url = f"grpc://127.0.0.1:{port}"
    workers = [start_worker(cli, name, grpc_url, cli.logs / "artifacts") for _ in range(2)]
    wait_until(lambda: in_trial(observer, name, 2), 120, "both workers in a trial")
    client = open_storage(grpc_url)
    study_id = client.get_study_id_from_name(name)

    cli.kill_group(proxy)
    answers: list[Any] = []

    def during_the_outage() -> None:
        try:
            answers.append(client.get_study_id_from_name(name))
        except Exception as e:
            answers.append(e)

    asking = threading.Thread(target=during_the_outage)
    asking.start()
    time.sleep(GRACE_S + 2)  # every heartbeat of the running trials is older than the grace period
    restarted = start_proxy(cli, pg_url, port)
    asking.join(timeout=60)
    assert answers == [study_id]  # the call waited for the proxy instead of failing

    for w in workers:
        assert cli.wait(w, WORKER_TIMEOUT) == 0, cli.output(w)
    trials = trials_of(observer, name)
    assert count(trials, TrialState.FAIL) == 0, [(t.number, t.user_attrs.get("fail_reason")) for t in trials]
    assert_budget_met_exactly(trials, 2)

    # An ask once the budget is taken is refused with a status the worker waits on, not an error
    # the proxy logs with a traceback.
    with pytest.raises(Exception) as refused:
        optuna.load_study(study_name=name, storage=client).ask()
    assert is_budget_exhausted(refused.value)
    for p in (proxy, restarted, *workers):
        assert "Traceback" not in cli.output(p), cli.output(p)


# --- 13: a result finished while its worker was cut off ----------------------------------------------


def test_a_result_finished_while_cut_off_past_the_grace_period_is_recorded_on_the_retry(
    cli: CliProcesses,
    tiny_study: Callable[..., Path],
    pg_url: str,
    observer: RDBStorage,
    relay: TcpRelay,
    liveness: None,
) -> None:
    name = "cut-off"
    create(tiny_study(name, n_trials=1, epochs=CUT_OFF_EPOCHS), pg_url)
    artifacts = cli.logs / "artifacts"
    worker = start_worker(cli, name, through(pg_url, relay), artifacts)
    wait_until(lambda: in_trial(observer, name, 1), 120, "the worker in a trial")
    assert children_of(worker.pid) == []  # a single CPU worker trains in its own process

    relay.cut()
    time.sleep(GRACE_S + 1.5)
    assert main(["status", name, "--storage", pg_url]) == 0  # fails the trial as stale
    first, retry = trials_of(observer, name)
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"].startswith("stale: no heartbeat")
    assert retry.state == TrialState.WAITING
    relay.restore()

    assert cli.wait(worker, WORKER_TIMEOUT) == 0, cli.output(worker)
    trials = trials_of(observer, name)
    assert_budget_met_exactly(trials, 1)
    assert len(trials) == 2
    recorded = trials[1]
    assert recorded.state == TrialState.COMPLETE
    assert recorded.user_attrs["result_from_trial"] == first.number
    assert recorded.user_attrs["fail_reason"] is None
    assert recorded.params == first.params
    assert {"metrics", "losses", "history"} <= set(recorded.user_attrs)
    assert len(recorded.values) == 2
    files = {
        meta["filename"]: artifacts / meta["artifact_id"]
        for key, value in recorded.system_attrs.items()
        if key.startswith("artifacts:")
        for meta in [json.loads(value)]
    }
    assert sorted(files) == ["config.yaml", "metrics.json", "samples.png"]
    assert files["samples.png"].read_bytes().startswith(b"\x89PNG")
    log = cli.output(worker)
    assert f"recorded on its retry, trial {recorded.number}" in log
    assert log.count(f"trial {recorded.number} started") == 0  # never trained again


# --- 8: the database gone for good -----------------------------------------------------------------


def test_a_worker_that_loses_the_database_for_good_exits_with_one_line(
    cli: CliProcesses,
    tiny_study: Callable[..., Path],
    pg_url: str,
    observer: RDBStorage,
    relay: TcpRelay,
    liveness: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Another study's trials first, so that this study's trial ids differ from their numbers.
    other = optuna.create_study(study_name="db-gone-before", storage=observer)
    for _ in range(3):
        other.tell(other.ask(), state=TrialState.FAIL)
    name = "db-gone"
    create(tiny_study(name, n_trials=2, epochs=SHORT_EPOCHS), pg_url)
    cli.env = {**cli.env, "CVAE_SEARCH_RECONNECT": "3"}
    worker = start_worker(cli, name, through(pg_url, relay), cli.logs / "artifacts")
    (trial,) = wait_until(lambda: in_trial(observer, name, 1), 120, "the worker in a trial")
    assert trial._trial_id != trial.number

    relay.cut()
    assert cli.wait(worker, 120) != 0
    log = cli.output(worker)
    assert "Traceback" not in log and PASSWORD not in log, log
    errors = [line for line in log.splitlines() if line.startswith("cvae-search worker: error:")]
    redacted = make_url(through(pg_url, relay)).render_as_string(hide_password=True)
    assert len(errors) == 1, log
    assert errors[0].startswith(f"cvae-search worker: error: storage {redacted}: unreachable for 3 s"), log
    assert "gave up on" in errors[0] and "Connection refused" in errors[0]
    # The heartbeat says what happened, of the trial by its number.
    assert f"heartbeat of trial {trial.number} not recorded: storage unreachable (" in log
    assert "invalid data" not in log

    # Its trial is left to the heartbeat check, which fails it like any dead worker's.
    time.sleep(GRACE_S + 1)
    assert main(["status", name, "--storage", pg_url]) == 0
    assert f"stopped sending heartbeats: #{trial.number}" in capsys.readouterr().out
    (failed,) = [t for t in trials_of(observer, name) if t.number == trial.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("stale")
