"""optuna-dashboard for cvae-search studies: served from this interpreter, truthful about
feasibility, with the project's own plots and notes.

optuna-dashboard 0.21 is run in this process, on a storage this process opened, so the storage
URL never appears on a command line. Two of its gaps are closed here:

Feasibility
    It reads a trial's constraints only from the list-valued ``constraints`` system attribute,
    which Optuna 5 no longer writes (one ``constraints:<name>`` attribute each), so every trial
    looked feasible; and its Best Trials is the Pareto front of all complete trials, whatever
    their constraints. The storage handed to it (:func:`feasibility_view`) shows each trial
    with the list form derived from the named attributes, and its Best Trials is the Pareto
    front of the feasible trials only (:func:`feasible_best_trials`). Nothing is written for
    this: Optuna reads both forms and would count a stored list twice (as constraints ``0``,
    ``1``, ...), and studies created before need no migration.
The project's view
    :func:`refresh_views` writes, through optuna-dashboard's custom-plot and note storage,
    the feasible front with the baselines starred and the exported trial circled, the
    hypervolume history, the downstream gains of the trials that recorded them, a study note
    on the objectives and constraints and how to read the front, and a note per finished trial
    with its diagnosis. ``cvae-search dashboard`` writes them at start and then whenever the
    study changed, every ``refresh_s`` seconds; each is rewritten only when its content
    changed, and a note someone edited in the dashboard is left as they wrote it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import signal
import socketserver
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search.definition import StudyDefinition
from search.downstream_stage import downstream_gains, downstream_records
from search.export import EXPORTED_ATTR
from search.report import diagnosis, feasible, hypervolume_history, pareto_layers
from search.storage import open_storage
from search.study import BASELINE_ATTR, DOWNSTREAM_ATTR, StudyNotFound, stored_definition

__all__ = [
    "DOWNSTREAM_ATTR",
    "DOWNSTREAM_PLOT",
    "DashboardUnavailable",
    "FRONT_PLOT",
    "HYPERVOLUME_PLOT",
    "VIEWS_ATTR",
    "downstream_figure",
    "feasibility_view",
    "feasible_best_trials",
    "front_figure",
    "hypervolume_figure",
    "refresh_all",
    "refresh_views",
    "serve",
    "study_note",
    "trial_note",
]

_log = logging.getLogger(__name__)

LIST_CONSTRAINTS_KEY = "constraints"
"""The system attribute optuna-dashboard reads constraints from (its ``CONSTRAINTS_KEY``)."""
VIEWS_ATTR = "cvae_search:dashboard"
"""Study system attribute: a digest of each plot and note as last written here."""
FRONT_PLOT = "cvae-search-front"
HYPERVOLUME_PLOT = "cvae-search-hypervolume"
DOWNSTREAM_PLOT = "cvae-search-downstream"
_PACKAGES = {"optuna_dashboard": "optuna-dashboard", "psycopg2": "psycopg2-binary"}


class DashboardUnavailable(RuntimeError):
    """Something the dashboard needs is missing from this interpreter's environment."""


def _missing(e: ModuleNotFoundError) -> DashboardUnavailable:
    module = (e.name or "?").split(".")[0]
    package = _PACKAGES.get(module, module)
    return DashboardUnavailable(
        f"the Python package {package} (module {module}) is not installed for {sys.executable}; "
        f"install it with: {sys.executable} -m pip install {package}"
    )


def _dashboard() -> ModuleType:
    try:
        import optuna_dashboard
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    return optuna_dashboard


# --- feasibility ----------------------------------------------------------------------------


def _with_list_constraints(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` whose system attributes also hold its constraints as a list."""
    constraints = trial.constraints
    if not constraints or LIST_CONSTRAINTS_KEY in trial.system_attrs:
        return trial
    # A copy: a storage that caches its trials (the gRPC proxy's client) must keep them as read.
    view = copy.copy(trial)
    view._system_attrs = {**trial.system_attrs, LIST_CONSTRAINTS_KEY: list(constraints.values())}
    return view


def _dashboard_feasible(trial: FrozenTrial) -> bool:
    """Feasibility as optuna-dashboard's pages judge it: every listed constraint <= 0."""
    return all(c <= 0 for c in trial.system_attrs.get(LIST_CONSTRAINTS_KEY, []))


def feasibility_view(storage: BaseStorage) -> BaseStorage:
    """``storage``, its trials shown with the constraint list optuna-dashboard reads.

    Set on this one storage object (which only the dashboard uses), not on its class.
    """
    get_all_trials = storage.get_all_trials
    get_best_trial = storage.get_best_trial

    @functools.wraps(get_all_trials)
    def all_trials(study_id: int, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [_with_list_constraints(t) for t in get_all_trials(study_id, *args, **kwargs)]

    @functools.wraps(get_best_trial)
    def best_trial(study_id: int) -> FrozenTrial:
        # Single-objective studies: the best feasible trial, as Optuna's Study.best_trial.
        done = all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        candidates = [t for t in done if _dashboard_feasible(t)]
        if not candidates:
            return get_best_trial(study_id)
        minimize = storage.get_study_directions(study_id)[0] == optuna.study.StudyDirection.MINIMIZE
        return (min if minimize else max)(candidates, key=lambda t: t.values[0])

    storage.get_all_trials = all_trials  # type: ignore[method-assign]
    storage.get_best_trial = best_trial  # type: ignore[method-assign]
    return storage


def feasible_best_trials(app_module: ModuleType) -> bool:
    """Make the dashboard's Best Trials the Pareto front of feasible trials only.

    optuna-dashboard computes it with ``get_pareto_front_trials`` (imported into its ``_app``
    module) from all complete trials. Returns whether the hook was found; a later
    optuna-dashboard may have moved it.
    """
    front = getattr(app_module, "get_pareto_front_trials", None)
    if front is None:
        return False
    if getattr(front, "feasible_only", False):
        return True

    @functools.wraps(front)
    def feasible_front(trials: Sequence[FrozenTrial], directions: Sequence[Any]) -> list[FrozenTrial]:
        return front([t for t in trials if _dashboard_feasible(t)], directions)

    feasible_front.feasible_only = True  # type: ignore[attr-defined]
    app_module.get_pareto_front_trials = feasible_front
    return True


# --- the project's view ---------------------------------------------------------------------


def _objective_axis(definition: StudyDefinition, i: int) -> str:
    o = definition.objectives[i]
    return f"{o.metric} ({'higher' if o.direction == 'maximize' else 'lower'} is better)"


def front_figure(study: optuna.Study, definition: StudyDefinition, exported: dict[str, Any] | None) -> Any:
    """The feasible Pareto front: infeasible trials grey, baselines starred, the export circled."""
    import plotly.graph_objects as go

    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    layers = pareto_layers(definition, [t for t in complete if feasible(t)], depth=1)
    on_front = {t.number for t in (layers[0] if layers else [])}
    groups = {
        "infeasible": [t for t in complete if not feasible(t)],
        "feasible": [t for t in complete if feasible(t) and t.number not in on_front],
        "feasible Pareto front": sorted(
            (t for t in complete if t.number in on_front), key=lambda t: (t.values[0], t.values[1])
        ),
    }
    styles = {
        "infeasible": {"mode": "markers", "marker": {"color": "#b0b0b0", "symbol": "x", "size": 9}},
        "feasible": {"mode": "markers", "marker": {"color": "#1f77b4", "opacity": 0.6, "size": 9}},
        "feasible Pareto front": {
            "mode": "lines+markers" if len(definition.objectives) == 2 else "markers",
            "marker": {"color": "#d62728", "size": 10},
            "line": {"color": "#d62728"},
        },
    }
    names = definition.metric_names

    def hover(t: FrozenTrial) -> str:
        label = f"trial #{t.number}"
        if t.user_attrs.get(BASELINE_ATTR):
            label += f" (baseline {t.user_attrs[BASELINE_ATTR]})"
        values = "<br>".join(f"{n}: {v:.4g}" for n, v in zip(names, t.values, strict=True))
        why = diagnosis(t)
        return f"{label}<br>{values}" + (f"<br>{why}" if why else "")

    fig = go.Figure()
    for name, trials in groups.items():
        fig.add_trace(
            go.Scatter(
                x=[t.values[0] for t in trials],
                y=[t.values[1] for t in trials],
                name=f"{name} ({len(trials)})",
                customdata=[t.number for t in trials],
                hovertext=[hover(t) for t in trials],
                hoverinfo="text",
                **styles[name],
            )
        )
    baselines = [t for t in complete if t.user_attrs.get(BASELINE_ATTR)]
    if baselines:
        fig.add_trace(
            go.Scatter(
                x=[t.values[0] for t in baselines],
                y=[t.values[1] for t in baselines],
                name="baseline",
                mode="markers+text",
                text=[str(t.user_attrs[BASELINE_ATTR]) for t in baselines],
                textposition="top right",
                customdata=[t.number for t in baselines],
                hovertext=[hover(t) for t in baselines],
                hoverinfo="text",
                marker={"symbol": "star-open", "size": 20, "color": "black", "line": {"width": 1.5}},
            )
        )
    picked = [t for t in complete if exported is not None and t.number == exported.get("trial")]
    if picked:
        t = picked[0]
        fig.add_trace(
            go.Scatter(
                x=[t.values[0]],
                y=[t.values[1]],
                name=f"exported (#{t.number}, {exported.get('pick') if exported else ''})",
                mode="markers+text",
                text=[f"exported #{t.number}"],
                textposition="top left",
                customdata=[t.number],
                hovertext=[hover(t)],
                hoverinfo="text",
                marker={"symbol": "circle-open", "size": 24, "color": "black", "line": {"width": 2}},
            )
        )
    title = f"{definition.name}: the feasible Pareto front ({len(complete)} complete trials)"
    if len(definition.objectives) > 2:
        title += f", first two of {len(definition.objectives)} objectives"
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": _objective_axis(definition, 0)}},
        yaxis={"title": {"text": _objective_axis(definition, 1)}},
        legend={"font": {"size": 10}, "orientation": "h", "y": -0.2},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def _reference(definition: StudyDefinition) -> str:
    return ", ".join(
        f"{n}={v:g}" for n, v in zip(definition.metric_names, definition.reference_point, strict=True)
    )


def hypervolume_figure(study: optuna.Study, definition: StudyDefinition) -> Any:
    """The hypervolume of the feasible front after each complete trial."""
    import plotly.graph_objects as go

    history = hypervolume_history(study, definition)
    fig = go.Figure(
        go.Scatter(
            x=[n for n, _ in history],
            y=[hv for _, hv in history],
            mode="lines+markers",
            line={"shape": "hv", "color": "#2ca02c"},
            name="hypervolume",
        )
    )
    fig.update_layout(
        title={"text": f"Hypervolume of the feasible front (reference point {_reference(definition)})"},
        xaxis={"title": {"text": "trial number"}},
        yaxis={"title": {"text": "hypervolume"}, "rangemode": "tozero"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def downstream_figure(study: optuna.Study) -> Any | None:
    """Each recorded downstream gain (:func:`search.downstream_stage.downstream_records`), per
    trial that has them; ``None`` when none has."""
    import plotly.graph_objects as go

    recorded = {n: downstream_gains(r) for n, r in downstream_records(study).items()}
    trials = [t for t in study.get_trials(deepcopy=False) if recorded.get(t.number)]
    if not trials:
        return None
    metrics = sorted({k for t in trials for k in recorded[t.number]})
    labels = [m.removeprefix("downstream_").removesuffix("_gain") for m in metrics]
    fig = go.Figure()
    for t in trials:
        gains = recorded[t.number]
        name = f"#{t.number}" + (f" {t.user_attrs[BASELINE_ATTR]}" if t.user_attrs.get(BASELINE_ATTR) else "")
        fig.add_trace(go.Bar(x=labels, y=[gains.get(m) for m in metrics], name=name))
    fig.update_layout(
        title={"text": "Downstream gains of the generated data, per trial (cvae-search downstream)"},
        barmode="group",
        yaxis={"title": {"text": "gain"}, "zeroline": True},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def _constraint_lines(definition: StudyDefinition) -> list[str]:
    from model.metrics import METRICS

    lines = []
    for c in definition.constraints:
        label = f"|{c.metric}|" if c.abs else c.metric
        bounds = [f"{label} >= {c.min:g}"] if c.min is not None else []
        bounds += [f"{label} <= {c.max:g}"] if c.max is not None else []
        lines.append(f"- `{' and '.join(bounds)}`: {METRICS[c.metric].description}")
    if definition.collapse is not None:
        r = definition.collapse
        lines.append(
            f"- `collapse`: from epoch {r.after_epoch}, a trial whose samples show "
            f"`spread_norm < {r.min_spread_norm:g}` (samples alike) or `z_usage < {r.min_z_usage:g}` "
            "(the decoder ignores z) is stopped, evaluated and kept as infeasible, so the sampler "
            "learns where collapse lies; at the end the same floors are checked again."
        )
    return lines


def study_note(study: optuna.Study, definition: StudyDefinition, exported: dict[str, Any] | None) -> str:
    """The study's note: what the objectives and constraints are and how to read the front."""
    from model.metrics import METRICS

    objectives = [
        f"- `{o.metric}` ({o.direction}): {METRICS[o.metric].description}" for o in definition.objectives
    ]
    constraints = _constraint_lines(definition) or ["- none"]
    export_line = (
        f"The exported trial is #{exported['trial']} (pick rule `{exported.get('pick')}`, "
        f"{exported.get('at')}), written to `{exported.get('file')}`."
        if exported
        else "No trial has been exported yet (`cvae-search export STUDY -o best.yaml`)."
    )
    lines = [
        f"## {definition.name}",
        "",
        *([definition.description.strip(), ""] if definition.description.strip() else []),
        "**Objectives**",
        "",
        *objectives,
        "",
        "**Constraints** (a trial is feasible when every one holds)",
        "",
        *constraints,
        "",
        "**Reading the front**",
        "",
        "- *Pareto Front* (History): grey points are infeasible trials, whatever their values; "
        "the highlighted points are the Pareto front of the feasible trials.",
        "- *Best Trials* lists that feasible front only: the trials `cvae-search export` picks from.",
        f"- *{definition.name}: the feasible Pareto front* (below): the same front, with the "
        "baselines starred and the exported trial circled; hover a point for its diagnosis.",
        "- *Hypervolume*: the area the feasible front dominates up to the reference point "
        f"({_reference(definition)}); "
        "a flat stretch means the search found nothing better.",
        "- Each trial's note says why it stopped early, failed or is infeasible.",
        "",
        export_line,
        "",
        "*Written by cvae-search; edit it here and cvae-search leaves it as you wrote it.*",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def trial_note(trial: FrozenTrial) -> str:
    """A finished trial's note: its diagnosis (collapse, early stop, failure) and constraints."""
    source = (
        f"baseline {trial.user_attrs[BASELINE_ATTR]}" if trial.user_attrs.get(BASELINE_ATTR) else "search"
    )
    if trial.state == TrialState.COMPLETE:
        verdict = "feasible" if feasible(trial) else "**infeasible**"
    else:
        verdict = f"**{trial.state.name.lower()}**"
    lines = [f"**Trial {trial.number}** ({source}): {verdict}", ""]
    why = diagnosis(trial)
    lines += [_cell(why) if why else "Trained its full budget; every constraint holds.", ""]
    if trial.constraints:
        lines += ["| constraint | value (holds when <= 0) | verdict |", "|---|---|---|"]
        lines += [
            f"| `{_cell(k)}` | {v:.4g} | {'holds' if v <= 0 else 'violated'} |"
            for k, v in trial.constraints.items()
        ]
        lines.append("")
    runtime = trial.user_attrs.get("runtime") or {}
    epochs = (trial.user_attrs.get("timings") or {}).get("epochs_run")
    if runtime:
        threads = runtime.get("threads")
        ran = f"{epochs} epochs" if epochs is not None else "trained"
        lines.append(
            f"{ran} on {runtime.get('device')} ({runtime.get('precision')}"
            + (f", {threads} CPU thread{'s' if threads != 1 else ''}" if threads else "")
            + ")."
        )
    return "\n".join(lines).rstrip() + "\n"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def refresh_views(study: optuna.Study, definition: StudyDefinition) -> list[str]:
    """Write the project's plots and notes into ``study`` where they changed.

    A note whose stored text is neither empty nor what was last written here was edited by
    someone in the dashboard, and is left alone.

    Returns:
        What was written (``"plot cvae-search-front"``, ``"note trial 3"``, ...).
    """
    from optuna_dashboard import save_plotly_graph_object
    from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

    storage, study_id = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(study_id)
    recorded: dict[str, str] = dict(attrs.get(VIEWS_ATTR) or {})
    exported = attrs.get(EXPORTED_ATTR) if isinstance(attrs.get(EXPORTED_ATTR), dict) else None
    written: list[str] = []

    plots = {
        FRONT_PLOT: front_figure(study, definition, exported),
        HYPERVOLUME_PLOT: hypervolume_figure(study, definition),
    }
    downstream = downstream_figure(study)
    if downstream is not None:
        plots[DOWNSTREAM_PLOT] = downstream
    for plot_id, fig in plots.items():
        digest = _digest(fig.to_json())
        if recorded.get(f"plot:{plot_id}") != digest:
            save_plotly_graph_object(study, fig, graph_object_id=plot_id)
            recorded[f"plot:{plot_id}"] = digest
            written.append(f"plot {plot_id}")

    notes: list[tuple[str, int | None, str]] = [("study", None, study_note(study, definition, exported))]
    notes += [
        (f"trial {t.number}", t._trial_id, trial_note(t))
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished()
    ]
    for label, trial_id, body in notes:
        key = f"note:{'study' if trial_id is None else trial_id}"
        current = get_note_from_system_attrs(attrs, trial_id)
        if current["body"] == body:
            recorded[key] = _digest(body)
            continue
        if current["body"] and _digest(current["body"]) != recorded.get(key):
            continue  # edited by someone in the dashboard
        save_note_with_version(storage, study_id, trial_id, int(current["version"]) + 1, body)
        recorded[key] = _digest(body)
        written.append(f"note {label}")
    if recorded != attrs.get(VIEWS_ATTR):
        storage.set_study_system_attr(study_id, VIEWS_ATTR, recorded)
    return written


def refresh_all(storage: BaseStorage) -> dict[str, list[str]]:
    """:func:`refresh_views` for every study in ``storage`` that cvae-search created."""
    out: dict[str, list[str]] = {}
    for summary in storage.get_all_studies():
        try:
            definition = stored_definition(storage, summary.study_name, wait_s=0.0)
        except StudyNotFound:
            continue  # not a cvae-search study
        except ValueError as e:  # a definition this version cannot read: the others still get theirs
            _log.warning("dashboard views of %s skipped: %s", summary.study_name, e)
            continue
        # No sampler runs here; a random one costs nothing to make.
        study = optuna.load_study(
            study_name=summary.study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
        out[summary.study_name] = refresh_views(study, definition)
    return out


# --- serving --------------------------------------------------------------------------------


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s %s", self.address_string(), format % args)


def _refresh_loop(refresh: Callable[[], dict[str, list[str]]], every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            for name, written in refresh().items():
                if written:
                    _log.info("dashboard views of %s updated: %s", name, ", ".join(written))
        except Exception as e:  # the database may be restarting; the next round retries
            _log.warning("dashboard views not updated: %s", e)


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_dir: str | Path = "cvae-search-artifacts",
    refresh_s: float = 60.0,
    ready: Callable[[str], None] = lambda _: None,
) -> None:
    """Serve optuna-dashboard on ``url``'s studies until SIGTERM or Ctrl-C.

    Args:
        url: The storage URL (already resolved); it stays in this process.
        host: Address to listen on.
        port: Port to listen on.
        artifact_dir: The workers' artifact folder, served read-only.
        refresh_s: Seconds between updates of the project's plots and notes (0: at start only).
        ready: Called with the address once the server listens.

    Raises:
        DashboardUnavailable: optuna-dashboard, or the storage's driver, is not installed
            for this interpreter.
        ConnectionError: The storage cannot be reached, or the address is taken.
    """
    dashboard = _dashboard()
    from optuna.artifacts import FileSystemArtifactStore

    try:
        from optuna_dashboard import _app
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    if not feasible_best_trials(_app):
        _log.warning(
            "optuna-dashboard %s: its Best Trials may list infeasible trials (this version has no "
            "get_pareto_front_trials to restrict); the Pareto plot and the cvae-search plots are right",
            dashboard.__version__,
        )
    try:
        storage, writer = open_storage(url, create=False), open_storage(url, create=False)
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    artifacts = Path(artifact_dir)
    if not artifacts.is_dir():
        _log.warning(
            "artifact folder %s does not exist (yet): trial files show once workers write there", artifacts
        )
    for name, written in refresh_all(writer).items():
        _log.info("dashboard views of %s: %s", name, ", ".join(written) or "up to date")
    app = dashboard.wsgi(feasibility_view(storage), artifact_store=FileSystemArtifactStore(str(artifacts)))
    try:
        server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as e:
        raise ConnectionError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e

    stop = threading.Event()
    if refresh_s > 0:
        threading.Thread(
            target=_refresh_loop,
            args=(functools.partial(refresh_all, writer), refresh_s, stop),
            name="dashboard-views",
            daemon=True,
        ).start()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    ready(f"http://{host}:{server.server_port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through on_term: a normal stop
        pass
    finally:
        stop.set()
        server.server_close()
