"""Study files at the edge: an invalid one is refused before the database is touched, and a
worker refuses a definition that differs from the one stored in the study."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import psycopg2
import pytest
import yaml
from psycopg2 import sql
from sqlalchemy.engine import make_url

from model.config import ConfigError
from search.cli import main
from search.definition import StudyDefinition, load_definition
from search.storage import open_storage
from search.study import load_study
from tests.cf_data import cf_config, write_cf_archive
from tests.conftest import CliProcesses, tiny_config_dict

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_database(pg_url: str) -> Iterator[str]:
    """A database of its own on the test server, with nothing in it."""
    server = make_url(pg_url).set(drivername="postgresql", database="postgres")
    admin = psycopg2.connect(server.render_as_string(hide_password=False))
    admin.autocommit = True
    name = f"cvae_empty_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def tables_in(url: str) -> list[str]:
    conn = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


INVALID: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown field": ({"n_trialz": 3}, ["n_trialz", "unknown field"]),
    "bad metric name": (
        {"objectives": [{"metric": "diversty", "direction": "maximize"}]},
        ["objectives[0].metric", "expected a metric name", "diversty"],
    ),
    "space path not in the config": (
        {"space": {"loss.beta_kll": {"type": "float", "low": 0.01, "high": 1.0}}},
        ["space.loss.beta_kll", "not a field of the training config"],
    ),
    "condition on a field declared below": (
        {
            "space": {
                "loss.free_bits": {
                    "type": "float",
                    "low": 0.0,
                    "high": 1.0,
                    "when": {"loss.kl_mode": ["plain"]},
                },
                "loss.kl_mode": {"type": "categorical", "choices": ["plain", "free_bits_batch"]},
            }
        },
        [
            "space.loss.free_bits.when.loss.kl_mode",
            "a categorical parameter declared above it",
            "loss.kl_mode",
        ],
    ),
    "condition on a value that is not a choice": (
        {
            "space": {
                "model.output": {"type": "categorical", "choices": ["regression", "copula"]},
                "model.noise_length": {
                    "type": "float",
                    "low": 0.5,
                    "high": 4.0,
                    "when": {"model.output": ["copulaa"]},
                },
            }
        },
        ["space.model.noise_length.when.model.output", "['regression', 'copula']", "copulaa"],
    ),
    "baseline setting the data": (
        {"baselines": {"other_data": {"data.synthetic.height": 32}}},
        ["baselines[0] (other_data).set.data.synthetic.height", "a field of model, loss, train"],
    ),
    "baseline outside the space": (
        {"baselines": {"strong": {"loss.beta_kl": 5.0}}},
        ["baselines[0] (strong)", "loss.beta_kl=5.0", "outside space.loss.beta_kl"],
    ),
}


REPO = Path(__file__).resolve().parents[2]


def _study_on_user_data(tmp_path: Path, baselines: list[dict[str, Any]]) -> Path:
    """The demo study copied, given a base of the user's own (a 16x16 grid, 8 latent
    dimensions) and the shipped V3/V4 configs, which describe a 128x128 set."""
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(tiny_config_dict(2)))
    study = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    study.update(name="mine", base="mine.yaml", overrides={}, baselines=baselines)
    path = tmp_path / "mine-study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_baseline_runs_its_settings_on_the_studys_data_and_sizes(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = ["loss", "model.encoder_pool", "model.output", "model.prior"]
    path = _study_on_user_data(
        tmp_path,
        [
            {"name": "v3", "config": str(REPO / "configs" / "v3.yaml"), "fields": fields},
            {"name": "v4", "config": str(REPO / "configs" / "v4.yaml"), "fields": fields},
        ],
    )
    definition = load_definition(path)
    for name, kl_mode, beta in (("v3", "plain", 0.01), ("v4", "free_bits_sample", 0.05)):
        cfg = definition.baselines[name]
        assert cfg.data == definition.base.data  # the user's data, not the configs' 128x128 set
        assert (cfg.model.latent_dim, cfg.model.channels) == (8, 8)
        assert (cfg.train.epochs, cfg.eval.max_days) == (2, 16)
        assert (cfg.loss.kl_mode, cfg.loss.beta_kl, cfg.model.encoder_pool) == (kl_mode, beta, "global")
        assert definition.config_for(definition.baseline_params(name), name) == cfg

    assert main(["create", str(path), "--storage", pg_url]) == 0
    out = capsys.readouterr().out
    assert "baseline v3 sets 13 fields on the study's base" in out
    assert "loss.kl_mode='plain'" in out and "loss.beta_kl=0.01" in out
    assert "model.encoder_pool='global'" in out


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        (
            {"name": "b", "config": str(REPO / "configs" / "v3.yaml"), "fields": ["data"]},
            ["baselines[0] (b).fields[0]", "a field or section of model, loss, train", "'data'"],
        ),
        (
            {"name": "b", "config": str(REPO / "configs" / "v3.yaml"), "fields": ["loss.beta_kll"]},
            ["baselines[0] (b).fields[0]", "a field or section of the training config", "loss.beta_kll"],
        ),
        ({"name": "b", "fields": ["loss"]}, ["baselines[0] (b).fields", "a config to take them from"]),
    ],
    ids=["data", "unknown", "no config"],
)
def test_a_baseline_that_would_leave_the_studys_data_or_names_nothing_is_refused(
    tmp_path: Path, baseline: dict[str, Any], expected: list[str]
) -> None:
    path = _study_on_user_data(tmp_path, [baseline])
    with pytest.raises(ConfigError) as e:
        load_definition(path)
    assert str(e.value).startswith(f"{path}: ")
    for part in expected:
        assert part in str(e.value)


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_study_loads_and_its_baselines_enqueue(path: Path) -> None:
    definition = load_definition(path)
    assert definition.name == path.stem
    for name in definition.baselines:
        params = definition.baseline_params(name)
        assert definition.config_for(params, name) == definition.baselines[name]


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_study_file_is_refused_before_the_database_is_touched(
    case: str,
    tiny_study: Callable[..., Path],
    empty_database: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fields, expected = INVALID[case]
    study_file = tiny_study(f"invalid-{case.replace(' ', '-')}", **fields)

    code = main(["create", str(study_file), "--storage", empty_database])

    assert code != 0
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message
    assert message[0].startswith(f"cvae-search create: error: {study_file}: ")
    for part in expected:
        assert part in message[0]
    assert tables_in(empty_database) == []  # not even Optuna's schema


def test_a_worker_refuses_a_study_file_that_differs_from_the_stored_definition(
    tiny_study: Callable[..., Path], pg_url: str, cli: CliProcesses
) -> None:
    name = "stored-definition"
    stored = tiny_study(name, n_trials=3)
    assert main(["create", str(stored), "--storage", pg_url]) == 0
    # The same study, with one searched range widened.
    changed = yaml.safe_load(stored.read_text())
    changed["space"]["loss.free_bits"]["high"] = 2.0
    local = stored.with_name("changed.yaml")
    local.write_text(yaml.safe_dump(changed))

    refused = cli.run("worker", name, "--storage", pg_url, "--study-file", str(local))

    assert refused.returncode != 0
    message = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(message) == 1, refused.stderr
    assert str(local) in message[0] and "differs from the definition stored" in message[0]
    assert "Traceback" not in refused.stderr
    assert optuna.load_study(study_name=name, storage=pg_url).trials == []  # no trial ran


def test_the_same_definition_from_another_folder_is_accepted(
    tiny_study: Callable[..., Path], pg_url: str, tmp_path: Path
) -> None:
    name = "moved-definition"
    stored = tiny_study(name, n_trials=3)
    assert main(["create", str(stored), "--storage", pg_url]) == 0
    copy = tmp_path / "elsewhere"
    shutil.copytree(stored.parent, copy)

    local = load_definition(copy / "study.yaml")
    assert local.digest() == load_definition(stored).digest()
    # What a worker given --study-file checks before it runs anything.
    study, definition = load_study(name, open_storage(pg_url), local=local)
    assert definition.digest() == local.digest() and study.trials == []


def _cf_study(folder: Path, archive: Path, **overrides: Any) -> Path:
    """A study on the CF archive at ``archive``."""
    (folder / "base.yaml").write_text(yaml.safe_dump(cf_config(archive, overrides=overrides)))
    study = {
        "name": "on-cf-data",
        "base": "base.yaml",
        "space": {"loss.beta_kl": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
        "n_trials": 2,
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    return folder / "study.yaml"


def _missing_file(tmp_path: Path, tiny_study: Callable[..., Path]) -> tuple[Path, list[str]]:
    absent = tmp_path / "archive" / "pr_1981-2014.nc"
    study = tiny_study("missing-data", overrides={"data.source": "file", "data.path": str(absent)})
    return study, [f"{study}: base: {absent}: no such file or directory (data.path)"]


def _infinite_rain(tmp_path: Path, tiny_study: Callable[..., Path]) -> tuple[Path, list[str]]:
    import netCDF4

    archive = write_cf_archive(tmp_path / "archive.nc", n_days=60)
    with netCDF4.Dataset(archive, "a") as nc:
        nc["pr"][12, 3, 3] = np.inf
    study = _cf_study(tmp_path, archive)
    return study, [
        f"{study}: base: {archive}: variable 'pr' (data.target_var) has 1 infinite value, "
        "the first on 1990-01-13"
    ]


def _split_past_synthetic_dates(tmp_path: Path, tiny_study: Callable[..., Path]) -> tuple[Path, list[str]]:
    split = {"train": ["2000-01-01", "2000-12-31"], "val": ["2000-03-01", "2000-03-15"]}
    study = tiny_study(
        "synthetic-split",
        overrides={
            "data.split.train": split["train"],
            "data.split.val": split["val"],
            "data.split.test": split["val"],
        },
    )
    return study, [
        f"{study}: base: synthetic set ",
        "data.split.train: the period 2000-01-01 to 2000-12-31 runs past the data, which cover 2000-01-01 to "
        "2000-04-05 (it would hold 96 of its 366 days)",
    ]


@pytest.mark.parametrize(
    "case", [_missing_file, _infinite_rain, _split_past_synthetic_dates], ids=lambda f: f.__name__[1:]
)
def test_create_refuses_bad_data_before_the_storage_is_touched(
    case: Callable[[Path, Callable[..., Path]], tuple[Path, list[str]]],
    tmp_path: Path,
    tiny_study: Callable[..., Path],
    empty_database: str,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    study_file, expected = case(tmp_path, tiny_study)
    sqlite = tmp_path / "storage" / "study.db"

    for url in (empty_database, f"sqlite:///{sqlite}"):
        code = main(["create", str(study_file), "--storage", url])
        assert code != 0
        message = capsys.readouterr().err.strip().splitlines()
        assert len(message) == 1, message
        assert message[0].startswith("cvae-search create: error: ")
        for part in expected:
            assert part in message[0]
    assert tables_in(empty_database) == []
    assert not sqlite.parent.exists()
    assert list(cache.iterdir()) == [], "no synthetic set is generated to check a config"


def test_create_checks_a_synthetic_source_without_generating_it(
    tiny_study: Callable[..., Path], pg_url: str, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_file = tiny_study("checked-synthetic", baselines={"slow": {"train.lr": 1e-4}})

    assert main(["create", str(study_file), "--storage", pg_url]) == 0

    out = capsys.readouterr().out
    assert "data of base, baseline slow: synthetic set " in out
    assert (
        "(generated by the first trial that needs it): 96 days (67 train, 15 val, 14 test), fine 16x16" in out
    )
    assert list(cache.iterdir()) == []


def test_the_digest_leaves_out_missing_predictors_at_its_default(tiny_study: Callable[..., Path]) -> None:
    default = load_definition(tiny_study("fill-default"))
    assert "missing_predictors" not in default.to_dict()["base"]["data"]
    filled = load_definition(tiny_study("fill-default", overrides={"data.missing_predictors": "fill"}))
    assert filled.to_dict()["base"]["data"]["missing_predictors"] == "fill"
    assert filled.digest() != default.digest()
    again = StudyDefinition.from_dict(filled.to_dict())
    assert again.base.data.missing_predictors == "fill" and again.digest() == filled.digest()
    assert StudyDefinition.from_dict(default.to_dict()).base == default.base
