"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# --- PostgreSQL --------------------------------------------------------------------------------

PG_SERVER_ENV = "CVAE_SEARCH_TEST_PG"
PG_SERVER_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards), as a SQLAlchemy URL.

    The server is ``$CVAE_SEARCH_TEST_PG`` (a maintenance database URL on it). Unreachable, the
    tests that need it skip, or fail when ``CI=true``.
    """
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    server = os.environ.get(PG_SERVER_ENV, PG_SERVER_DEFAULT)
    try:
        admin = psycopg2.connect(server, connect_timeout=5)
    except psycopg2.OperationalError as e:
        message = f"PostgreSQL at {server} ({PG_SERVER_ENV}) is unreachable: {' '.join(str(e).split())}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    admin.autocommit = True
    name = f"cvae_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(server).set(drivername="postgresql+psycopg2", database=name)
    admin.close()
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        # A fresh connection: a test may have restarted the server since.
        admin = psycopg2.connect(server, connect_timeout=5)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A synthetic-data cache of the test module's own, set in this process's environment."""
    folder = tmp_path_factory.mktemp("synthetic-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVAE_SEARCH_CACHE", str(folder))
        yield folder


# --- search service processes -------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def search_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for every worker process of the session (each set is written once)."""
    return tmp_path_factory.mktemp("search-cache")


@pytest.fixture(scope="session")
def search_env(search_cache: Path) -> dict[str, str]:
    """Environment of a ``python -m search.cli`` process: fast liveness (heartbeat 1 s, grace 3 s),
    one thread per process (the machine has two cores), the session's data cache."""
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(
        PYTHONPATH=pythonpath,
        CVAE_SEARCH_CACHE=str(search_cache),
        CVAE_SEARCH_HEARTBEAT="1",
        CVAE_SEARCH_GRACE="3",
        CVAE_SEARCH_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    return env


class CliProcesses:
    """``python -m search.cli ...`` processes of one test, each in its own process group
    (as a container holds a worker); whatever is still running at teardown is killed."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str = "cli") -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}-{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "search.cli", *args],
                env=self.env,
                cwd=self.logs,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one command to its end; its output is in the result."""
        return subprocess.run(
            [sys.executable, "-m", "search.cli", *args],
            env=self.env,
            cwd=self.logs,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @staticmethod
    def output(proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        """The exit status; a process still running after ``timeout`` fails the test with its log."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.args} still running after {timeout} s; its log:\n{self.output(proc)[-4000:]}")

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and all it started (a worker and its children), as ``docker kill``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.kill_group(proc)
            else:  # children of a finished worker parent, if any were left
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def cli(search_env: dict[str, str], tmp_path: Path) -> Iterator[CliProcesses]:
    """Start ``python -m search.cli`` processes in ``tmp_path``; leftovers are killed afterwards."""
    processes = CliProcesses(search_env, tmp_path)
    try:
        yield processes
    finally:
        processes.close()


TINY_DOWNSTREAM = {
    "downstream.channels": 4,
    "downstream.n_res_blocks": 1,
    "downstream.steps": 8,
    "downstream.val_checks": 2,
    "downstream.seeds": [0, 1],
    "downstream.n_generated": 1,
    "downstream.batch_size": 8,
}
"""Dotted overrides for an SRDRN comparison of a few seconds (two seeds, 8 steps an arm)."""


def tiny_config_dict(epochs: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """About a second of training on the CPU (a 16x16 synthetic grid, factor 4)."""
    cfg: dict[str, Any] = {
        "data": {
            "source": "synthetic",
            "synthetic": {"n_days": 96, "height": 16, "width": 16},
            "upscale_factor": 4,
        },
        "model": {"latent_dim": 8, "channels": 8, "n_res_blocks": 1},
        "train": {"epochs": epochs, "batch_size": 16, "device": "cpu"},
        "eval": {"n_samples": 4, "max_days": 16, "plot_days": 1},
    }
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write a study file into a new folder, its ``base:`` a tiny training config written beside it.

    Call it as ``tiny_study(name, n_trials=4, epochs=2, baselines={"b": {"train.lr": 0.01}},
    **study_fields)``: each baseline sets its dotted values on the study's base; other keyword
    arguments are study-file fields (``collapse=None``, ``constraints=[...]``, ...). By default
    two parameters are searched (``loss.beta_kl`` in log space, ``loss.free_bits``) and the
    collapse rule is off, so a trial trains all its epochs.
    """

    def write(
        name: str,
        *,
        n_trials: int = 4,
        epochs: int = 2,
        baselines: dict[str, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> Path:
        folder = tmp_path_factory.mktemp(name)
        (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_config_dict(epochs)))
        study: dict[str, Any] = {
            "name": name,
            "base": "tiny.yaml",
            "space": {
                "loss.beta_kl": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
                "loss.free_bits": {"type": "float", "low": 0.0, "high": 1.0},
            },
            "n_trials": n_trials,
            "collapse": None,
            "baselines": [],
        }
        for b, overrides in (baselines or {}).items():
            study["baselines"].append({"name": b, "set": overrides})
        study.update(fields)
        path = folder / "study.yaml"
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        return path

    return write
