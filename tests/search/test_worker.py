"""End to end: real worker processes (``python -m search.cli worker``) on a real PostgreSQL.

Each test creates its own study with the command line, runs workers as a user or a container
would, and reads the outcome back from the database. Liveness runs fast here (heartbeat 1 s,
grace 3 s; see the ``search_env`` fixture).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search.cli import main
from search.objective import TrialOutcome, suggest_space
from search.storage import HEARTBEAT_ATTR, StudyRetry
from search.worker import WorkerInterrupted, WorkerSummary, _run_trial, _Signals
from tests.conftest import CliProcesses
from tests.search.constructed_studies import make_definition, new_study, sqlite_storage

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings(
        "ignore:Heartbeat of storage is supposed:UserWarning"
    ),  # ask/tell, as a worker
]

WORKER_TIMEOUT = 240
LONG_TRIAL_EPOCHS = 80
"""Some seconds per trial, longer than the grace period: long enough to find a worker in the
middle of one, and to see a trial whose worker lives go stale if its heartbeat stopped."""
ENDLESS_EPOCHS = 20_000
"""Far longer than any test waits: only a stop ends such a trial."""


# --- reading the study back --------------------------------------------------------------------


@pytest.fixture
def observer(pg_url: str) -> RDBStorage:
    """A plain Optuna storage on the test database: it reads, and never fails or retries a trial."""
    return RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True})


def trials_of(storage: RDBStorage, name: str) -> list[FrozenTrial]:
    return storage.get_all_trials(storage.get_study_id_from_name(name))


def count(trials: list[FrozenTrial], state: TrialState) -> int:
    return sum(t.state == state for t in trials)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def running_longer_than(storage: RDBStorage, name: str, seconds: float) -> list[FrozenTrial]:
    # datetime_start is the worker's local clock, and the workers run on this machine.
    now = dt.datetime.now()
    return [
        t
        for t in trials_of(storage, name)
        if t.state == TrialState.RUNNING
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > seconds
    ]


def in_trial(storage: RDBStorage, name: str, workers: int) -> list[FrozenTrial] | None:
    """The running trials once ``workers`` of them have run for over a second, else None."""
    running = running_longer_than(storage, name, 1.0)
    return running if len(running) >= workers else None


def create(study_file: Path, url: str) -> None:
    """``cvae-search create`` (in this process: only the workers need to be processes of their own)."""
    assert main(["create", str(study_file), "--storage", url]) == 0


def start_worker(
    cli: CliProcesses, name: str, url: str, artifacts: Path, *extra: str
) -> subprocess.Popen[bytes]:
    return cli.start(
        "worker", name, "--storage", url, "--artifact-dir", str(artifacts), *extra, name="worker"
    )


def wait_while_live_trials_beat(
    cli: CliProcesses, worker: subprocess.Popen[bytes], name: str, url: str, dead: set[int]
) -> int:
    """Wait for ``worker`` to end; meanwhile only the killed worker's trial (one of ``dead``)
    may go stale, every other running trial must keep beating."""
    probe = RDBStorage(url, heartbeat_interval=1, grace_period=3, engine_kwargs={"pool_pre_ping": True})
    study_id = probe.get_study_id_from_name(name)
    stale: set[int] = set()
    deadline = time.monotonic() + WORKER_TIMEOUT
    while worker.poll() is None:
        stale |= set(probe._get_stale_trial_ids(study_id))
        assert len(stale) <= 1 and stale <= dead, (
            f"trials {sorted(stale)} stopped beating while their worker ran"
        )
        if time.monotonic() > deadline:
            pytest.fail(
                f"{worker.args} still running after {WORKER_TIMEOUT} s:\n{cli.output(worker)[-4000:]}"
            )
        time.sleep(0.25)
    return worker.returncode


def retries_of(trials: list[FrozenTrial], failed: FrozenTrial) -> list[FrozenTrial]:
    return [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]


def assert_budget_met_exactly(trials: list[FrozenTrial], n_trials: int) -> None:
    assert count(trials, TrialState.COMPLETE) + count(trials, TrialState.PRUNED) == n_trials
    assert count(trials, TrialState.RUNNING) == 0
    assert count(trials, TrialState.WAITING) == 0


def assert_killed_trial_was_retried(trials: list[FrozenTrial], reaper_log: str) -> None:
    """One trial was failed through its heartbeat, and its retry ran to completion."""
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state.name) for t in trials]
    dead = failed[0]
    # Failed by the heartbeat check of another process, which says so.
    assert dead.user_attrs["fail_reason"].startswith("stale: no heartbeat for ")
    (retry,) = retries_of(trials, dead)
    assert retry.state == TrialState.COMPLETE
    assert retry.params == dead.params
    assert retry.system_attrs["retry_history"] == [dead.number]
    assert retry.user_attrs["fail_reason"] is None  # inherited, then cleared by its completion
    assert f"trial {dead.number} failed as stale: no heartbeat for " in reaper_log
    assert f"re-enqueued as trial {retry.number}" in reaper_log


# --- several workers ----------------------------------------------------------------------------

SEVERAL = "several-workers"
BASELINES = {
    "calm": {"loss.beta_kl": 0.01, "loss.free_bits": 0.1, "train.lr": 0.002},
    "bold": {"loss.beta_kl": 0.5, "loss.free_bits": 0.9, "train.lr": 0.0005},
}
WILD = {"wild": {"train.lr": 1e6}}
"""A baseline whose loss becomes NaN in its first epoch."""
IMPOSSIBLE = [{"metric": "spatial_correlation", "min": 0.99}]
"""A constraint no trial meets: the study has no feasible trial to export."""


@pytest.fixture(scope="module")
def several_workers(
    pg_url: str,
    tiny_study: Callable[..., Path],
    search_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A study of 8 trials run by three ``worker`` commands started together, with two sound
    baselines, one that diverges, and a constraint no trial meets."""
    cli = CliProcesses(search_env, tmp_path_factory.mktemp("several"))
    try:
        study = tiny_study(SEVERAL, n_trials=8, baselines={**BASELINES, **WILD}, constraints=IMPOSSIBLE)
        created = cli.run("create", str(study), "--storage", pg_url)
        assert created.returncode == 0, created.stderr
        assert "Warning" not in created.stderr, created.stderr  # Optuna's, of the APIs used on purpose
        artifacts = cli.logs / "artifacts"
        # Started separately, as replicas of a container are: nothing tells them apart.
        workers = [start_worker(cli, SEVERAL, pg_url, artifacts) for _ in range(3)]
        codes = [cli.wait(w, WORKER_TIMEOUT) for w in workers]
        yield codes, artifacts, [cli.output(w) for w in workers]
    finally:
        cli.close()


def test_several_workers_finish_exactly_the_budget(several_workers: Any, observer: RDBStorage) -> None:
    codes, artifacts, outputs = several_workers
    assert codes == [0, 0, 0], outputs
    trials = trials_of(observer, SEVERAL)
    assert_budget_met_exactly(trials, 8)
    assert count(trials, TrialState.FAIL) == 1  # the wild baseline
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params), "two workers proposed the same parameters"

    for t in trials:
        if t.state == TrialState.FAIL:
            continue
        assert len(t.values) == 2
        assert {"metrics", "losses", "timings", "runtime", "normalization"} <= set(t.user_attrs)
        assert t.user_attrs["runtime"]["device"] == "cpu"
        files = {
            meta["filename"]: artifacts / meta["artifact_id"]
            for key, value in t.system_attrs.items()
            if key.startswith("artifacts:")
            for meta in [json.loads(value)]
        }
        assert files["samples.png"].read_bytes().startswith(b"\x89PNG")

    for name, overrides in BASELINES.items():
        (trial,) = [t for t in trials if t.user_attrs.get("baseline") == name]
        assert trial.params == {
            "loss.beta_kl": overrides["loss.beta_kl"],
            "loss.free_bits": overrides["loss.free_bits"],
        }
        meta = next(
            json.loads(v)
            for k, v in trial.system_attrs.items()
            if k.startswith("artifacts:") and "config.yaml" in v
        )
        trained = yaml.safe_load((artifacts / meta["artifact_id"]).read_text())
        # train.lr is not searched: only the baseline's own config carries it.
        assert trained["train"]["lr"] == overrides["train.lr"]


def test_a_person_can_follow_the_workers(several_workers: Any, observer: RDBStorage) -> None:
    _, _, outputs = several_workers
    log = "\n".join(outputs)
    assert "Warning" not in log and "Traceback" not in log, log
    trials = trials_of(observer, SEVERAL)
    for t in trials:
        baseline = t.user_attrs.get("baseline")
        if baseline:
            assert f"trial {t.number} started: baseline {baseline}\n" in log
        else:
            started = f"trial {t.number} started: beta_kl={t.params['loss.beta_kl']:.4g} "
            assert started + f"free_bits={t.params['loss.free_bits']:.4g}\n" in log
        if t.state == TrialState.FAIL:  # the wild baseline
            assert f"trial {t.number} failed after " in log and ": diverged" in log
            continue
        diversity, ks = t.values
        ended = f"trial {t.number} complete in "
        line = next(line for line in log.splitlines() if ended in line)
        assert f": diversity={diversity:.4g} ks_stat={ks:.4g}; infeasible (" in line
        assert "spatial_correlation>=0.99" in line  # the constraint no trial meets
        assert line.endswith("; 2/2 epochs")
    progress = [line for line in log.splitlines() if "search.worker: progress: " in line]
    assert len(progress) == len(trials)  # one as each trial ends
    assert any("complete, 1 failed" in line and "ETA " in line for line in progress)
    assert any(
        line.endswith(": 8/8 complete, 1 failed, 0 running, 0 waiting; budget finished") for line in progress
    )


def test_optunas_own_cli_reads_the_study(
    several_workers: Any, pg_url: str, search_env: dict[str, str]
) -> None:
    def optuna_cli(command: str) -> list[dict[str, Any]]:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("optuna")),
                command,
                "--study-name",
                SEVERAL,
                "--storage",
                pg_url,
                "-f",
                "json",
            ],
            env=search_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    listed = optuna_cli("trials")
    assert len(listed) == 9  # with the failed wild baseline
    assert sum(row["state"] == "COMPLETE" and len(row["values"]) == 2 for row in listed) == 8
    # Optuna's front holds feasible trials only; tiny models may well all be collapsed.
    best = optuna_cli("best-trials")
    assert {row["number"] for row in best} <= {row["number"] for row in listed}


def test_a_diverging_trial_fails_without_retry_and_the_workers_go_on(
    several_workers: Any, observer: RDBStorage
) -> None:
    trials = trials_of(observer, SEVERAL)
    (wild,) = [t for t in trials if t.state == TrialState.FAIL]
    assert wild.user_attrs["baseline"] == "wild"
    assert wild.user_attrs["fail_reason"].startswith("diverged")
    assert retries_of(trials, wild) == []
    assert count(trials, TrialState.COMPLETE) == 8  # its place went to another trial


def test_export_without_a_feasible_trial_fails_with_one_line(
    several_workers: Any, cli: CliProcesses, pg_url: str
) -> None:
    out = cli.logs / "best.yaml"
    result = cli.run("export", SEVERAL, "--storage", pg_url, "-o", str(out))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr
    assert message[0].startswith("cvae-search export: error:") and "feasible" in message[0]
    assert not out.exists()


# --- failures -----------------------------------------------------------------------------------


def test_a_killed_worker_s_trial_is_failed_by_heartbeat_and_retried(
    cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, observer: RDBStorage
) -> None:
    name = "killed-worker"
    create(tiny_study(name, n_trials=3, epochs=LONG_TRIAL_EPOCHS), pg_url)
    artifacts = cli.logs / "artifacts"
    doomed = start_worker(cli, name, pg_url, artifacts)
    survivor = start_worker(cli, name, pg_url, artifacts)
    # Both workers in the middle of a trial: the one killed certainly leaves one RUNNING.
    busy = wait_until(lambda: in_trial(observer, name, 2), 120, "both workers in a trial")
    cli.kill_group(doomed)

    # The killed worker's trial: one of those running just before the kill, or just after it.
    dead = {t._trial_id for t in busy + running_longer_than(observer, name, 0.0)}
    assert wait_while_live_trials_beat(cli, survivor, name, pg_url, dead) == 0, cli.output(survivor)
    trials = trials_of(observer, name)
    assert_budget_met_exactly(trials, 3)
    assert_killed_trial_was_retried(trials, cli.output(survivor))


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_a_worker_cleanly_and_requeues_its_trial(
    processes: int, cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, observer: RDBStorage
) -> None:
    name = f"sigterm-{processes}"
    create(tiny_study(name, n_trials=4, epochs=ENDLESS_EPOCHS), pg_url)
    worker = start_worker(cli, name, pg_url, cli.logs / "artifacts", "--processes", str(processes))
    wait_until(lambda: in_trial(observer, name, processes), 120, "every process in a trial")

    worker.send_signal(signal.SIGTERM)  # the parent, which forwards it to its worker processes
    assert cli.wait(worker, 60) == 0, cli.output(worker)
    with pytest.raises(ProcessLookupError):  # no worker process outlived its parent
        os.killpg(worker.pid, 0)

    trials = trials_of(observer, name)
    assert count(trials, TrialState.RUNNING) == 0
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == processes
    for t in stopped:
        assert "SIGTERM" in t.user_attrs["fail_reason"]
        (retry,) = retries_of(trials, t)
        assert retry.state == TrialState.WAITING
        assert retry.params == t.params


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the one swallowed
def test_a_stop_swallowed_by_a_finalizer_comes_again() -> None:
    # A signal whose handler runs inside a weakref callback (or a __del__) raises there, and
    # Python ignores exceptions from those: the worker would train on.
    signals = _Signals()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals.install()
    try:
        signals.set_training(True)
        thing = set()
        finalizer = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGTERM))  # noqa: F841
        with pytest.raises(WorkerInterrupted, match="SIGTERM"):
            del thing  # the handler runs in the callback; its exception is ignored there
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # training
                time.sleep(0.05)
        assert signals.stop.is_set()
    finally:
        signals.set_training(False)
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- PostgreSQL restarted mid-study ---------------------------------------------------------------


def _restart_command() -> list[str] | None:
    versions = sorted(
        Path("/etc/postgresql").glob("*/main"), key=lambda p: [int(x) for x in p.parent.name.split(".")]
    )
    if shutil.which("pg_ctlcluster") is None or not versions or os.geteuid() != 0:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].parent.name, "main", "restart"]


def _server_is_up() -> bool:
    ready = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], timeout=10)
    return ready.returncode == 0


@pytest.fixture
def restart_postgres(pg_url: str) -> Any:
    """Restarts the local PostgreSQL server; waits for it to be up again at teardown."""
    command = _restart_command()
    if command is None or "127.0.0.1" not in pg_url:
        reason = "restarting PostgreSQL needs root, pg_ctlcluster and the local server at 127.0.0.1"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)

    def restart() -> None:
        subprocess.run(command, check=True, timeout=120, capture_output=True)

    yield restart
    deadline = time.monotonic() + 60
    while not _server_is_up():
        if time.monotonic() > deadline:
            pytest.fail("PostgreSQL did not come back within 60 s of the restart")
        time.sleep(0.5)


def test_workers_carry_on_through_a_postgresql_restart(
    cli: CliProcesses,
    tiny_study: Callable[..., Path],
    pg_url: str,
    observer: RDBStorage,
    restart_postgres: Callable[[], None],
) -> None:
    name = "pg-restart"
    # Short trials: the workers spend much of their time in storage calls, so the restart
    # catches them there, not only their heartbeat threads.
    create(tiny_study(name, n_trials=12), pg_url)
    artifacts = cli.logs / "artifacts"
    workers = [start_worker(cli, name, pg_url, artifacts) for _ in range(2)]

    done_before = wait_until(
        lambda: count(trials_of(observer, name), TrialState.COMPLETE), 120, "a complete trial"
    )
    restart_postgres()

    for w in workers:
        assert cli.wait(w, WORKER_TIMEOUT) == 0, cli.output(w)
    assert done_before < 12  # the restart came in the middle of the study
    assert_budget_met_exactly(trials_of(observer, name), 12)


# --- the gRPC storage proxy -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_behind_the_grpc_proxy(
    cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, observer: RDBStorage
) -> None:
    port = _free_port()
    proxy = cli.start("proxy", "--storage", pg_url, "--port", str(port), name="proxy")

    def listening() -> bool:
        assert proxy.poll() is None, cli.output(proxy)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60, "the proxy to listen")
    name = "proxied"
    create(tiny_study(name, n_trials=3, epochs=LONG_TRIAL_EPOCHS), pg_url)
    grpc_url = f"grpc://127.0.0.1:{port}"
    artifacts = cli.logs / "artifacts"
    doomed = start_worker(cli, name, grpc_url, artifacts)
    survivor = start_worker(cli, name, grpc_url, artifacts)
    busy = wait_until(lambda: in_trial(observer, name, 2), 120, "both workers in a trial")
    cli.kill_group(doomed)

    dead = {t._trial_id for t in busy + running_longer_than(observer, name, 0.0)}
    # Only the proxy can fail the dead worker's trial: the survivor has no heartbeat storage.
    assert wait_while_live_trials_beat(cli, survivor, name, pg_url, dead) == 0
    trials = trials_of(observer, name)
    assert_budget_met_exactly(trials, 3)
    assert_killed_trial_was_retried(trials, cli.output(proxy))
    assert proxy.poll() is None
    # The workers' heartbeats went into Optuna's heartbeat table, not into the trials.
    assert not any(HEARTBEAT_ATTR in t.system_attrs for t in trials)
    # Without a database connection of their own, the workers record each attribute through
    # the proxy: the same records as a direct worker's.
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert {"metrics", "losses", "runtime", "history"} <= set(t.user_attrs)
            assert len(t.constraints) == 3  # |mass_bias| and spatial_correlation's two bounds
            assert sum(k.startswith("artifacts:") for k in t.system_attrs) == 3


# --- a trial finished elsewhere while its worker was cut off -----------------------------------------


class _Training:
    """What :class:`search.objective.TrialObjective` does to a trial, with ``meanwhile`` (another
    process's doing while this worker trains and is cut off) in place of the training."""

    def __init__(self, study: optuna.Study, meanwhile: Callable[[optuna.Trial], None]) -> None:
        self.definition = make_definition(name=study.study_name)
        self.meanwhile = meanwhile

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        suggest_space(trial, self.definition.space)
        self.meanwhile(trial)
        return TrialOutcome(
            values=[1.0, 0.5],
            user_attrs={"metrics": {"diversity": 1.0, "ks_stat": 0.5}},
            system_attrs={"constraints:collapse": 0.0},
            constraints={"collapse": 0.0},
            stopped=None,
            epochs_run=2,
            epochs=2,
        )


@pytest.fixture
def small_study(tmp_path: Path) -> optuna.Study:
    return new_study(make_definition(name="finished-elsewhere", n_trials=3), sqlite_storage(tmp_path)[1])


def failed_as_stale(study: optuna.Study, trial: optuna.Trial) -> None:
    """What the reaper of another process does to a worker cut off past the grace period."""
    storage = study._storage._backend  # type: ignore[attr-defined]
    assert storage.fail_stale_trial(trial._trial_id, "stale: no heartbeat for 40 s (grace period 30 s)")
    StudyRetry()(study, storage.get_trial(trial._trial_id))


def test_a_result_finished_after_its_trial_was_failed_as_stale_goes_to_the_waiting_retry(
    small_study: optuna.Study, caplog: pytest.LogCaptureFixture
) -> None:
    trial = small_study.ask()
    summary = WorkerSummary()
    with caplog.at_level(logging.INFO, logger="search.worker"):
        _run_trial(
            small_study, trial, _Training(small_study, lambda t: failed_as_stale(small_study, t)), summary
        )  # type: ignore[arg-type]

    assert (summary.completed, summary.failed) == (1, 0)
    first, retry = small_study.get_trials()
    assert first.state == TrialState.FAIL and first.values is None
    assert retry.state == TrialState.COMPLETE and retry.values == [1.0, 0.5]
    assert retry.params == first.params
    assert retry.user_attrs["result_from_trial"] == first.number
    assert retry.user_attrs["fail_reason"] is None and retry.user_attrs["metrics"]["diversity"] == 1.0
    assert retry.constraints == {"collapse": 0.0}
    assert f"its finished result is recorded on its retry, trial {retry.number}" in caplog.text


def test_a_result_whose_retry_has_started_elsewhere_is_dropped_not_counted(
    small_study: optuna.Study, caplog: pytest.LogCaptureFixture
) -> None:
    def failed_and_retried_elsewhere(t: optuna.Trial) -> None:
        failed_as_stale(small_study, t)
        small_study.ask()  # another worker takes the retry up

    trial = small_study.ask()
    summary = WorkerSummary()
    with caplog.at_level(logging.WARNING, logger="search.worker"):
        _run_trial(small_study, trial, _Training(small_study, failed_and_retried_elsewhere), summary)  # type: ignore[arg-type]

    assert (summary.completed, summary.failed) == (0, 0)
    assert [t.state for t in small_study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING]
    assert "its retry has been taken up already; dropping this attempt's result" in caplog.text


def test_a_tell_that_got_through_before_its_reply_was_lost_counts(small_study: optuna.Study) -> None:
    def told_already(t: optuna.Trial) -> None:
        small_study._storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [1.0, 0.5])

    trial = small_study.ask()
    summary = WorkerSummary()
    _run_trial(small_study, trial, _Training(small_study, told_already), summary)  # type: ignore[arg-type]
    assert (summary.completed, summary.failed) == (1, 0)
    assert [t.state for t in small_study.get_trials()] == [TrialState.COMPLETE]
