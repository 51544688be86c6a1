"""``cvae-search dashboard`` over real studies, in headless Chromium.

Two studies share one PostgreSQL database. A tiny one runs to completion through the command
line (``create``, then ``worker``), so its trials carry real artifacts. A constructed one tells
the feasibility story the demo tells: collapsed baselines, an infeasible trial that dominates
every feasible one, a feasible front, an exported pick and recorded downstream gains.

The dashboard is started as the README starts it: the virtual environment's ``cvae-search``
by absolute path, with ``PATH`` not holding the environment, and the storage URL (with a
password) in ``OPTUNA_STORAGE`` only.

Set ``CVAE_SEARCH_DOCS_DEMO`` to a ``cvae-search demo`` folder to refresh the documentation's
screenshots from that study (``docs/img``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from search.dashboard import DOWNSTREAM_PLOT, FRONT_PLOT, HYPERVOLUME_PLOT
from search.definition import Collapse, StudyDefinition
from search.export import export_trial
from search.report import hypervolume_history
from search.storage import open_storage
from tests.deploy.services import REPO, free_port, require, stop, wait_http, write_tiny_study
from tests.search.constructed_studies import (
    COLLAPSE,
    MASS,
    add_trial,
    make_definition,
    new_study,
    run_baseline,
    story_baselines,
)

pytestmark = [pytest.mark.postgres, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ENTRY_POINT = Path(sys.executable).parent / "cvae-search"
TINY = "dashboard-tiny"
STORY = "dashboard-story"
N_TRIALS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLLAPSED = "collapsed at epoch 2: spread_norm=0.01 < 0.05, z_usage=0.001 < 0.02"
GAINS = {
    2: {"downstream_mae_gain": 0.08, "downstream_q99_error_gain": 0.21},
    3: {"downstream_mae_gain": 0.05, "downstream_q99_error_gain": -0.02},
}


@dataclass
class Served:
    base: str
    ids: dict[str, int]
    artifacts: Path
    url: str
    secret: str
    process: subprocess.Popen[bytes]
    story: optuna.Study
    definition: StudyDefinition


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


def _with_password(pg_url: str) -> tuple[str, str]:
    """``pg_url`` with a password (one of its own when it has none: trust auth ignores it)."""
    url = make_url(pg_url)
    secret = url.password or f"pw-{secrets.token_hex(8)}"
    return url.set(password=secret).render_as_string(hide_password=False), str(secret)


def _story(url: str, root: Path) -> tuple[optuna.Study, StudyDefinition]:
    """Baselines v3 and v4 collapsed; #2 and #3 the feasible front; #4 dominated; #5 infeasible
    and better than all; #6 infeasible on mass bias. #2 is exported (knee)."""
    definition = make_definition(name=STORY, baselines=story_baselines(), collapse=Collapse())
    study = new_study(definition, open_storage(url))
    run_baseline(study, definition, [0.36, 0.077], constraints={MASS: 0.2, COLLAPSE: 1.5}, stopped=COLLAPSED)
    run_baseline(study, definition, [0.47, 0.098], constraints={MASS: 0.1, COLLAPSE: 1.2}, stopped=COLLAPSED)
    for number, values in ((2, [3.3, 0.035]), (3, [2.9, 0.022])):
        add_trial(study, definition, values, user_attrs={"downstream": {"gains": GAINS[number]}})
    add_trial(study, definition, [2.5, 0.04])
    add_trial(study, definition, [3.6, 0.015], constraints={MASS: -0.05, COLLAPSE: 1.3}, stopped=COLLAPSED)
    add_trial(study, definition, [3.4, 0.02], constraints={MASS: 0.3, COLLAPSE: 0.0})
    export_trial(study, definition, study.trials[2], root / "best.yaml", storage_url=url, rule="knee")
    return study, definition


def _start(url: str, artifacts: Path, cwd: Path, refresh: str = "1") -> tuple[subprocess.Popen[bytes], str]:
    require(ENTRY_POINT.exists(), f"the virtual environment's entry point {ENTRY_POINT}")
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",  # not the virtual environment's bin: it is not activated
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(REPO),
        "OPTUNA_STORAGE": url,
    }
    assert str(ENTRY_POINT.parent) not in env["PATH"].split(os.pathsep)
    cmd = [str(ENTRY_POINT), "dashboard", "--port", str(port), "--artifact-dir", str(artifacts)]
    process = subprocess.Popen(
        cmd + ["--refresh", refresh], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require(CHROMIUM.exists(), f"Chromium at {CHROMIUM}")
    root = tmp_path_factory.mktemp("dashboard")
    artifacts = root / "artifacts"
    study_file = write_tiny_study(root, TINY, N_TRIALS)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OPTUNA_STORAGE": pg_url,
        "CVAE_SEARCH_CACHE": str(root / "cache"),
    }
    _cli("create", str(study_file), env=env, cwd=root)
    _cli("worker", TINY, "--gpus", "none", "--artifact-dir", str(artifacts), env=env, cwd=root)
    url, secret = _with_password(pg_url)
    story, definition = _story(url, root)

    process, base = _start(url, artifacts, root)
    try:
        summaries = json.loads(wait_http(f"{base}/api/studies", process))["study_summaries"]
        ids = {s["study_name"]: s["study_id"] for s in summaries}
        yield Served(base, ids, artifacts, url, secret, process, story, definition)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(CHROMIUM.exists(), f"Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _points(trials: list[FrozenTrial]) -> list[tuple[float, float]]:
    return sorted((t.values[0], t.values[1]) for t in trials)


def _history_page(browser: Any, base: str, study_id: int) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{base}/dashboard/studies/{study_id}")
    page.wait_for_selector("#graph-pareto-front .scatterlayer .point")
    return page


def _pareto_traces(page: Any) -> dict[str, list[tuple[float, float]]]:
    """The dashboard's own Pareto plot, by its hover label (``Infeasible Trial``, ``Best Trial``...)."""
    traces = page.evaluate(
        "() => document.getElementById('graph-pareto-front').data"
        ".map(t => [t.hovertemplate, t.x || [], t.y || []])"
    )
    return {
        template.split("<extra>")[1].split("</extra>")[0]: sorted(zip(xs, ys, strict=True))
        for template, xs, ys in traces
    }


def _best_trials(page: Any) -> list[int]:
    """The trial numbers the History page's Best Trials card lists."""
    heading = page.locator("xpath=//h6[starts-with(text(), 'Best Trial')]").first
    heading.wait_for()
    title = heading.inner_text()
    if title.startswith("Best Trial (number="):  # a single best trial gets a card of its own
        return [int(title.removeprefix("Best Trial (number=").removesuffix(")"))]
    card = heading.locator("xpath=..")
    card.locator("h5").first.wait_for()
    return sorted(int(text.removeprefix("Trial ")) for text in card.locator("h5").all_inner_texts())


def _custom_plot(page: Any, plot_id: str) -> dict[str, Any]:
    selector = f"[id='user-defined-plot:{plot_id}']"
    page.wait_for_selector(f"{selector} .main-svg")
    traces = page.evaluate(
        "(sel) => document.querySelector(sel).data.map(t => ({name: t.name, x: t.x, y: t.y, "
        "symbol: t.marker && t.marker.symbol, text: t.text}))",
        selector,
    )
    return {t["name"]: t for t in traces}


def test_nothing_secret_is_on_any_command_line(served: Served) -> None:
    assert served.secret in served.url
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if served.secret in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    assert not found, found
    assert served.process.poll() is None


def test_pareto_front_has_a_point_per_complete_trial(served: Served, browser: Any, pg_url: str) -> None:
    trials = _complete(optuna.load_study(study_name=TINY, storage=pg_url))
    assert len(trials) == N_TRIALS
    page = _history_page(browser, served.base, served.ids[TINY])
    plotted = sorted(p for points in _pareto_traces(page).values() for p in points)
    assert len(plotted) == N_TRIALS
    for point, values in zip(plotted, _points(trials), strict=True):
        assert point == pytest.approx(values)
    assert page.locator("#graph-pareto-front .scatterlayer .point").count() == N_TRIALS
    for metric in ("diversity", "ks_stat"):  # the study's metric names label the objectives
        assert page.get_by_text(metric, exact=True).first.is_visible()
    page.close()


def test_infeasible_trials_render_infeasible_and_best_trials_is_the_feasible_front(
    served: Served, browser: Any
) -> None:
    study = served.story
    complete = _complete(study)
    infeasible = [t for t in complete if not all(v <= 0 for v in t.constraints.values())]
    assert sorted(t.number for t in infeasible) == [0, 1, 5, 6]
    front = sorted(t.number for t in study.best_trials)  # Optuna's own, constraints considered
    assert front == [2, 3]

    page = _history_page(browser, served.base, served.ids[STORY])
    traces = _pareto_traces(page)
    assert traces["Infeasible Trial"] == _points(infeasible)
    assert traces["Best Trial"] == _points([t for t in complete if t.number in front])
    assert traces["Feasible Trial"] == _points([t for t in complete if t.number == 4])
    assert _best_trials(page) == front, "trial 5 dominates every feasible trial but is infeasible"
    page.close()

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{served.base}/dashboard/studies/{served.ids[STORY]}/trials?numbers=2")
    page.get_by_role("heading", name="Trial 2 ").wait_for()
    chipped = page.locator("li:has-text('Best Trial')").all_inner_texts()  # the trial list's chips
    assert sorted(int(text.split()[1]) for text in chipped) == front
    page.close()


def test_the_projects_plots_show_front_baselines_pick_hypervolume_and_gains(
    served: Served, browser: Any
) -> None:
    study, definition = served.story, served.definition
    page = _history_page(browser, served.base, served.ids[STORY])
    front = _custom_plot(page, FRONT_PLOT)
    by_number = {t.number: t for t in study.trials}

    def xy(trace: dict[str, Any]) -> list[tuple[float, float]]:
        return sorted(zip(trace["x"], trace["y"], strict=True))

    assert xy(front["feasible Pareto front (2)"]) == _points([by_number[2], by_number[3]])
    assert xy(front["infeasible (4)"]) == _points([by_number[n] for n in (0, 1, 5, 6)])
    assert xy(front["baseline"]) == _points([by_number[0], by_number[1]])
    assert front["baseline"]["symbol"] == "star-open" and sorted(front["baseline"]["text"]) == ["v3", "v4"]
    assert xy(front["exported (#2, knee)"]) == _points([by_number[2]])
    assert front["exported (#2, knee)"]["symbol"] == "circle-open"

    history = _custom_plot(page, HYPERVOLUME_PLOT)["hypervolume"]
    expected = hypervolume_history(study, definition)
    assert history["x"] == [n for n, _ in expected]
    assert history["y"] == pytest.approx([hv for _, hv in expected])
    assert expected[-1][1] > 0

    gains = _custom_plot(page, DOWNSTREAM_PLOT)
    assert set(gains) == {"#2", "#3"}
    for number, recorded in GAINS.items():
        shown = dict(zip(gains[f"#{number}"]["x"], gains[f"#{number}"]["y"], strict=True))
        assert shown == pytest.approx(
            {"mae": recorded["downstream_mae_gain"], "q99_error": recorded["downstream_q99_error_gain"]}
        )
    page.close()


def test_the_study_and_trial_notes_appear(served: Served, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{served.base}/dashboard/studies/{served.ids[STORY]}/note")
    page.get_by_text("Reading the front").wait_for()
    for text in ("diversity", "ks_stat", "|mass_bias| <= 0.15", "Best Trials", "The exported trial is #2"):
        assert page.get_by_text(text).first.is_visible(), text
    page.goto(f"{served.base}/dashboard/studies/{served.ids[STORY]}/trials?numbers=5")
    page.get_by_role("heading", name="Trial 5 ").wait_for()
    page.get_by_text(COLLAPSED, exact=False).first.wait_for()
    assert page.get_by_text("Trial 5 (search): infeasible").first.is_visible()
    assert page.get_by_text("violates collapse").first.is_visible()
    page.close()


def test_trial_page_lists_samples_png(served: Served, browser: Any, pg_url: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    for trial in _complete(optuna.load_study(study_name=TINY, storage=pg_url)):
        page.goto(f"{served.base}/dashboard/studies/{served.ids[TINY]}/trials?numbers={trial.number}")
        page.get_by_role("heading", name=f"Trial {trial.number} ").wait_for()
        link = page.locator('a[download="samples.png"]')
        link.wait_for()
        href = link.get_attribute("href")
        assert href is not None
        response = page.request.get(served.base + href)
        assert response.ok
        stored = served.artifacts / href.rsplit("/", 1)[1]
        assert response.body() == stored.read_bytes()
        assert stored.read_bytes().startswith(PNG_SIGNATURE)
    page.close()


def _eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(1.0)
    return check()


def test_the_views_follow_a_new_trial(served: Served, browser: Any) -> None:
    """Last in the module: it adds trial 7, a feasible one that dominates the whole front."""
    study, definition = served.story, served.definition
    add_trial(study, definition, [4.0, 0.01])
    page = browser.new_page(viewport={"width": 1400, "height": 900})

    def front_is_new() -> bool:
        page.goto(f"{served.base}/dashboard/studies/{served.ids[STORY]}")
        plot = _custom_plot(page, FRONT_PLOT)
        return "feasible Pareto front (1)" in plot

    assert _eventually(front_is_new), "the front plot did not follow the new trial"
    assert _best_trials(page) == [7]
    page.close()


@pytest.mark.skipif(
    not os.environ.get("CVAE_SEARCH_DOCS_DEMO"), reason="set CVAE_SEARCH_DOCS_DEMO to a demo folder"
)
def test_docs_screenshots_from_the_demo(browser: Any, tmp_path: Path) -> None:
    demo = Path(os.environ["CVAE_SEARCH_DOCS_DEMO"]).resolve()
    url = f"sqlite:///{demo / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=url)
    front = sorted(t.number for t in study.best_trials)
    process, base = _start(url, demo / "artifacts", tmp_path, refresh="0")
    try:
        study_id = json.loads(wait_http(f"{base}/api/studies", process))["study_summaries"][0]["study_id"]
        page = _history_page(browser, base, study_id)
        assert _best_trials(page) == front
        infeasible = [t for t in _complete(study) if not all(v <= 0 for v in t.constraints.values())]
        assert _pareto_traces(page)["Infeasible Trial"] == _points(infeasible)
        _custom_plot(page, FRONT_PLOT)
        _custom_plot(page, HYPERVOLUME_PLOT)
        page.wait_for_timeout(1000)
        out = REPO / "docs" / "img"
        page.locator("#graph-pareto-front").locator(
            "xpath=ancestor::div[contains(@class,'MuiCard-root')][1]"
        ).screenshot(path=str(out / "dashboard-pareto.png"))
        page.locator(f"[id='user-defined-plot:{FRONT_PLOT}']").screenshot(
            path=str(out / "dashboard-front.png")
        )
        page.close()
    finally:
        stop(process)
