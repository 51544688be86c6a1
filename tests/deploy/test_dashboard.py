"""optuna-dashboard over a real study, in headless Chromium.

A tiny study runs to completion in PostgreSQL through the command line (``create``, then
``worker``); ``optuna-dashboard`` serves it with the workers' artifact folder. The Pareto-front
plot must hold one point per complete trial at the trials' objective values, and each trial's
page must list its ``samples.png`` and serve the very file the worker stored.

Set ``CVAE_SEARCH_DOCS_IMG=docs/img`` to also refresh the screenshot the documentation shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.deploy.services import REPO, free_port, require, stop, wait_http, write_tiny_study

pytestmark = [pytest.mark.postgres, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
STUDY = "dashboard-tiny"
N_TRIALS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, f"cvae-search {' '.join(args)} failed:\n{done.stderr}"


@pytest.fixture(scope="module")
def served(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """(dashboard URL, study id, artifact folder) for a finished tiny study."""
    require(CHROMIUM.exists(), f"Chromium at {CHROMIUM}")
    root = tmp_path_factory.mktemp("dashboard")
    artifacts = root / "artifacts"
    study_file = write_tiny_study(root, STUDY, N_TRIALS)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OPTUNA_STORAGE": pg_url,
        "CVAE_SEARCH_CACHE": str(root / "cache"),
    }
    _cli("create", str(study_file), env=env, cwd=root)
    _cli("worker", STUDY, "--gpus", "none", "--artifact-dir", str(artifacts), env=env, cwd=root)

    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    cmd = [
        str(dashboard),
        pg_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--artifact-dir",
        str(artifacts),
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        summaries = json.loads(wait_http(f"{base}/api/studies", process))["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == STUDY)
        yield base, study_id, artifacts
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require(CHROMIUM.exists(), f"Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _complete_trials(pg_url: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=STUDY, storage=pg_url)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(trials) == N_TRIALS
    return trials


def test_pareto_front_has_a_point_per_complete_trial(
    served: tuple[str, int, Path], browser: object, pg_url: str, tmp_path: Path
) -> None:
    base, study_id, _ = served
    expected = sorted(tuple(t.values) for t in _complete_trials(pg_url))
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page.goto(f"{base}/dashboard/studies/{study_id}")
    page.wait_for_selector("#graph-pareto-front .scatterlayer .point")

    traces = page.evaluate(
        "() => document.getElementById('graph-pareto-front').data.map(t => [t.x || [], t.y || []])"
    )
    plotted = sorted((x, y) for xs, ys in traces for x, y in zip(xs, ys, strict=True))
    assert len(plotted) == N_TRIALS
    for point, values in zip(plotted, expected, strict=True):
        assert point == pytest.approx(values)
    assert page.locator("#graph-pareto-front .scatterlayer .point").count() == N_TRIALS
    for metric in ("diversity", "ks_stat"):  # the study's metric names label the objectives
        assert page.get_by_text(metric, exact=True).first.is_visible()

    shot = tmp_path / "dashboard-pareto.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    docs_img = os.environ.get("CVAE_SEARCH_DOCS_IMG")
    if docs_img:
        Path(docs_img).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(docs_img) / "dashboard-pareto.png"))
    page.close()


def test_trial_page_lists_samples_png(
    served: tuple[str, int, Path], browser: object, pg_url: str, tmp_path: Path
) -> None:
    base, study_id, artifacts = served
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    for trial in _complete_trials(pg_url):
        page.goto(f"{base}/dashboard/studies/{study_id}/trials?numbers={trial.number}")
        page.get_by_role("heading", name=f"Trial {trial.number} ").wait_for()
        link = page.locator('a[download="samples.png"]')
        link.wait_for()
        href = link.get_attribute("href")
        assert href is not None
        response = page.request.get(base + href)
        assert response.ok
        stored = artifacts / href.rsplit("/", 1)[1]
        assert response.body() == stored.read_bytes()
        assert stored.read_bytes().startswith(PNG_SIGNATURE)
    page.screenshot(path=str(tmp_path / "dashboard-trial.png"))
    page.close()
