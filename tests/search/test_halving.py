"""Successive halving: the rank rule on constructed rung tables, the study-file rule, and the
rule at work in real trials on a real PostgreSQL (stopped trials, baselines, two trials at
one rung at once, directly and behind the gRPC proxy, and a worker killed and started again)."""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from model.config import ConfigError
from search.cli import main
from search.definition import Collapse, Halving, StudyDefinition, halving_ladder, load_definition
from search.export import export_trial, pick_trial
from search.halving import (
    HALVED_CONSTRAINT,
    HALVING_ATTR,
    RungBook,
    judge,
    rung_entry,
    rung_order,
)
from search.objective import TrialObjective, constraint_values
from search.report import format_table, pareto_table
from search.status import format_status, study_status
from search.storage import open_storage
from search.study import create_study, load_study
from search.worker import WorkerSummary, _run_trial
from tests.conftest import CliProcesses
from tests.search.constructed_studies import make_definition
from tests.search.test_worker import create, start_worker, trials_of, wait_until

JUDGED = ["diversity", "ks_stat", "mass_bias"]


def with_rule(**rule: Any) -> StudyDefinition:
    """The constructed study (diversity up, ks_stat down, |mass_bias| <= 0.15) with a halving rule."""
    fields: dict[str, Any] = {"eta": 2.0, "rungs": [2], "metrics": JUDGED, "min_peers": 2, "days": 4}
    fields.update(rule)
    return dataclasses.replace(make_definition(), halving=Halving(**fields))


def rule(definition: StudyDefinition) -> Halving:
    assert definition.halving is not None
    return definition.halving


def at(definition: StudyDefinition, number: int, diversity: float, ks: float, mass: float = 0.0) -> Any:
    return rung_entry(definition, number, {"diversity": diversity, "ks_stat": ks, "mass_bias": mass})


# --- the rank rule on constructed rung tables ----------------------------------------------------


def test_a_dominated_trial_stops_and_a_dominating_one_goes_on() -> None:
    d = with_rule()
    peers = [at(d, 0, 1.0, 0.5), at(d, 1, 0.5, 0.2)]  # the front: neither dominates the other

    dominated = judge(at(d, 2, 0.4, 0.6), peers, rule(d), 2)
    assert (dominated.go_on, dominated.why, dominated.place, dominated.reached, dominated.keep) == (
        False,
        "halved",
        2,
        3,
        2,
    )
    assert dominated.reason.startswith("halved at epoch 2: ranked 3 of 3")
    assert "Pareto layer 2" in dominated.reason

    dominating = judge(at(d, 3, 1.1, 0.1), peers, rule(d), 2)
    assert dominating.go_on and dominating.place == 0 and dominating.peers == (0, 1)


def test_a_feasible_trial_beats_an_infeasible_one_whatever_their_objectives() -> None:
    d = with_rule()
    infeasible_peers = [at(d, 0, 5.0, 0.01, mass=0.5), at(d, 1, 4.0, 0.02, mass=0.3)]
    poor_but_feasible = judge(at(d, 2, 0.1, 0.9, mass=0.1), infeasible_peers, rule(d), 2)
    assert poor_but_feasible.go_on and poor_but_feasible.place == 0

    feasible_peers = [at(d, 0, 0.1, 0.9), at(d, 1, 0.2, 0.8)]
    great_but_infeasible = judge(at(d, 2, 5.0, 0.01, mass=-0.2), feasible_peers, rule(d), 2)
    assert not great_but_infeasible.go_on and great_but_infeasible.place == 2
    assert "infeasible at the rung, violation 0.05" in great_but_infeasible.reason


def test_infeasible_trials_go_by_violation_then_by_their_objectives() -> None:
    d = with_rule()
    order = rung_order(
        [
            at(d, 0, 1.0, 0.5, mass=0.5),  # violation 0.35
            at(d, 1, 0.1, 0.9, mass=0.25),  # violation 0.10, dominated by #2
            at(d, 2, 2.0, 0.1, mass=0.25),  # violation 0.10
            at(d, 3, 0.1, 0.9),  # feasible
        ]
    )
    assert [e.trial for e in order] == [3, 2, 1, 0]


def test_fewer_than_min_peers_stops_nothing() -> None:
    d = with_rule(min_peers=3)
    worst = at(d, 9, 0.0, 1.0)
    peers = [at(d, 0, 1.0, 0.1), at(d, 1, 2.0, 0.2)]
    alone = judge(worst, peers, rule(d), 2)
    assert alone.go_on and alone.why == "too few peers" and alone.place == 2
    enough = judge(worst, [*peers, at(d, 2, 3.0, 0.3)], rule(d), 2)
    assert not enough.go_on and enough.why == "halved"


@pytest.mark.parametrize(("eta", "going_on"), [(3.0, 3), (2.0, 5), (4.0, 3)])
def test_the_top_1_over_eta_goes_on(eta: float, going_on: int) -> None:
    """Nine trials in a chain of domination: trial i is dominated by every trial before it."""
    d = with_rule(eta=eta, min_peers=0)
    table = [at(d, i, 10.0 - i, 0.1 * i) for i in range(9)]
    decisions = [judge(e, table, rule(d), 2) for e in table]
    assert [x.place for x in decisions] == list(range(9))
    assert sum(x.go_on for x in decisions) == going_on == math.ceil(9 / eta)


def test_within_a_layer_the_more_isolated_go_first() -> None:
    d = with_rule()
    # One Pareto layer: the two ends are infinitely far; #2 sits in a gap, #1 crowded by #0.
    layer = [at(d, 0, 0.0, 0.0), at(d, 1, 0.1, 0.1), at(d, 2, 0.6, 0.6), at(d, 3, 1.0, 1.0)]
    assert [e.trial for e in rung_order(layer)] == [0, 3, 2, 1]


def test_an_unmeasured_rung_metric_ranks_last() -> None:
    d = with_rule()
    nan = rung_entry(d, 5, {"diversity": math.nan, "ks_stat": 0.1, "mass_bias": 0.0})
    assert nan.values[0] == math.inf
    unmeasured_mass = rung_entry(d, 6, {"diversity": 1.0, "ks_stat": 0.1, "mass_bias": math.nan})
    assert not unmeasured_mass.feasible


# --- the study file ------------------------------------------------------------------------------


def test_the_ladder_and_the_defaults_resolve_into_explicit_rungs(tiny_study: Callable[..., Path]) -> None:
    assert halving_ladder(2, 3, 20) == [2, 6, 18]
    assert halving_ladder(5, 2, 20) == [5, 10]
    d = load_definition(
        tiny_study("ladder", epochs=20, halving={"eta": 2}, constraints=[{"metric": "mass_bias", "max": 0.2}])
    )
    assert d.halving is not None
    assert d.halving.rungs == [5, 10] and d.halving.metrics == JUDGED
    assert d.halving.min_epoch is None  # the stored definition holds the rungs themselves
    explicit = load_definition(
        tiny_study("explicit", epochs=20, halving={"rungs": [3, 9], "metrics": ["ks_stat"]})
    )
    assert explicit.halving is not None and explicit.halving.rungs == [3, 9]
    assert explicit.halving.metrics == ["ks_stat"]


def test_the_stored_definition_round_trips_and_keeps_old_digests(tiny_study: Callable[..., Path]) -> None:
    plain = load_definition(tiny_study("plain"))
    assert "halving" not in plain.to_dict()  # studies created before halving keep their digest
    assert StudyDefinition.from_dict(plain.to_dict()).digest() == plain.digest()
    halving = load_definition(tiny_study("halving", epochs=6, halving={"rungs": [2, 4]}))
    back = StudyDefinition.from_dict(halving.to_dict())
    assert back.halving == halving.halving and back.digest() == halving.digest() != plain.digest()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"eta": 1}, "halving.eta: expected a number > 1, got 1"),
        ({"rungs": [2, 6]}, "halving.rungs: expected increasing epochs from 1 to below train.epochs (6)"),
        ({"rungs": [3, 2]}, "halving.rungs: expected increasing epochs"),
        ({"min_epoch": 6}, "halving.min_epoch: expected an epoch from 1 to below train.epochs (6)"),
        ({"rungs": [2], "min_epoch": 2}, "halving: expected either rungs or min_epoch, not both"),
        ({"metrics": ["crps"]}, "halving.metrics[0]: expected an objective or constraint metric"),
        ({"metrics": ["mass_bias"]}, "halving.metrics: expected at least one objective metric to rank by"),
        ({"min_peers": -1}, "halving.min_peers: expected a non-negative integer"),
        ({"days": 0}, "halving.days: expected a positive number of validation days"),
        ({"rung": [2]}, "halving.rung"),
    ],
)
def test_a_bad_rule_names_the_file_and_the_field(
    tiny_study: Callable[..., Path], rule: dict[str, Any], message: str
) -> None:
    path = tiny_study("bad", epochs=6, halving=rule)
    with pytest.raises(ConfigError) as e:
        load_definition(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_halved_trial_is_not_counted_as_collapsing_whatever_its_early_spread() -> None:
    definition = dataclasses.replace(with_rule(), collapse=Collapse(after_epoch=15, min_spread_norm=0.08))
    early = {"diversity": 1.0, "ks_stat": 0.1, "mass_bias": 0.0, "spread_norm": 0.02, "z_usage": 0.01}
    halved = constraint_values(definition, early, "halved at epoch 5: ranked 4 of 6 trials at the rung")
    assert halved[HALVED_CONSTRAINT] == 1.0 and halved["collapse"] == 0.0
    # The same spread at the end of training is graded towards collapse, and a halved trial
    # never looks worse to the sampler than one that collapsed.
    unhalved = constraint_values(definition, early, None)
    assert unhalved[HALVED_CONSTRAINT] == 0.0 and unhalved["collapse"] > 0.5
    collapsed = constraint_values(definition, early, "collapsed at epoch 15: spread_norm=0.02 < 0.08")
    assert sum(max(0.0, v) for v in halved.values()) < sum(max(0.0, v) for v in collapsed.values())


# --- the rule at work in real trials -------------------------------------------------------------


def run_trials(study: optuna.Study, definition: StudyDefinition, artifacts: Path, n: int) -> None:
    """``n`` trials as a worker runs them (ask, the real objective, tell)."""
    objective = TrialObjective(definition, artifact_dir=artifacts)
    for _ in range(n):
        summary = WorkerSummary()
        _run_trial(study, study.ask(), objective, summary)
        assert summary.completed == 1


@pytest.mark.postgres
def test_a_halved_trial_is_infeasible_and_never_on_the_front_or_exported(
    pg_url: str, cache: Path, tiny_study: Callable[..., Path], tmp_path: Path
) -> None:
    # eta 100: only the trial ranked first at the rung goes on, so most later arrivals stop.
    path = tiny_study(
        "halved", n_trials=5, epochs=2, constraints=[], halving={"rungs": [1], "eta": 100, "min_peers": 1}
    )
    storage = open_storage(pg_url)
    create_study(load_definition(path), storage)
    study, definition = load_study("halved", storage)
    run_trials(study, definition, tmp_path / "artifacts", 4)

    trials = study.get_trials()
    halved = [t for t in trials if (t.user_attrs.get("stopped") or "").startswith("halved at epoch 1")]
    assert halved, [t.user_attrs.get("stopped") for t in trials]
    for t in halved:
        assert t.state == TrialState.COMPLETE and len(t.values) == 2
        assert t.constraints == {HALVED_CONSTRAINT: 1.0}  # the study's only constraint
        assert t.user_attrs["timings"]["epochs_run"] == 1
        record = t.user_attrs[HALVING_ATTR]["1"]
        assert record["decision"] == "halved" and record["trial"] == t.number
        assert record["peers"] == list(range(t.number))
    whole = [t for t in trials if t not in halved]
    assert all(
        t.user_attrs["timings"]["epochs_run"] == 2 and t.constraints == {HALVED_CONSTRAINT: 0.0}
        for t in whole
    )

    best = {t.number for t in study.best_trials}
    assert best and not best & {t.number for t in halved}
    for rule in ("knee", "max:diversity", "min:ks_stat"):
        assert pick_trial(study, definition, rule).number in best

    # A halved trial that dominates everything: still never on the front, never picked or exported.
    metrics = {"diversity": 99.0, "ks_stat": 0.0, "mass_bias": 0.0, "spread_norm": 1.0, "z_usage": 1.0}
    constraints = constraint_values(definition, metrics, "halved at epoch 1: ranked 2 of 2 trials")
    assert constraints == {HALVED_CONSTRAINT: 1.0}
    study.add_trial(
        optuna.create_trial(
            values=[99.0, 0.0],
            params=halved[0].params,
            distributions=halved[0].distributions,
            constraints=constraints,
            user_attrs={"stopped": "halved at epoch 1: constructed", "metrics": metrics},
        )
    )
    star = study.get_trials()[-1].number
    assert star not in {t.number for t in study.best_trials}
    picked = pick_trial(study, definition, "max:diversity")
    assert picked.number != star
    out = export_trial(study, definition, picked, tmp_path / "best.yaml", storage_url=pg_url)
    assert yaml.safe_load(out.read_text())["provenance"]["trial"] == picked.number

    # Where the stop is shown: status and the report's notes.
    text = format_status(study_status(study, definition, study._storage))
    assert f"halving: rung 1: 4 reached, {len(halved)} halved" in text
    assert f"#{halved[-1].number}  halved at epoch 1: ranked" in text
    notes = {r["trial"]: r["note"] for r in pareto_table(study, definition, picked=halved[0].number)}
    assert notes[halved[0].number].startswith("halved at epoch 1: ranked")
    assert notes[halved[0].number].endswith("violates halved")
    assert "violates halved" in format_table(pareto_table(study, definition, picked=halved[0].number))


def test_baselines_are_never_stopped(cache: Path, tiny_study: Callable[..., Path], tmp_path: Path) -> None:
    same = {"loss.beta_kl": 0.05, "loss.free_bits": 0.5}
    path = tiny_study(
        "baselines",
        n_trials=3,
        epochs=2,
        constraints=[],
        baselines={"first": same, "second": same},
        halving={"rungs": [1], "eta": 100, "min_peers": 0},
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    create_study(load_definition(path), storage)
    study, definition = load_study("baselines", storage)
    study.enqueue_trial(same)  # the same settings again, as a search trial
    run_trials(study, definition, tmp_path / "artifacts", 3)

    first, second, search_trial = study.get_trials()
    for t in (first, second):
        assert t.user_attrs["stopped"] is None and t.user_attrs["timings"]["epochs_run"] == 2
        assert t.constraints == {HALVED_CONSTRAINT: 0.0}
    # The second baseline ranks behind the identical first (ties go to the earlier trial), where
    # a search trial stops; the search trial with the same settings does.
    record = second.user_attrs[HALVING_ATTR]["1"]
    assert (record["decision"], record["place"], record["keep"]) == ("baseline", 1, 1)
    assert search_trial.user_attrs[HALVING_ATTR]["1"]["decision"] == "halved"
    assert search_trial.user_attrs["timings"]["epochs_run"] == 1
    assert search_trial.constraints == {HALVED_CONSTRAINT: 1.0}


# --- two trials at one rung at once ------------------------------------------------------------

PEERS = [
    (0, {"diversity": 1.0, "ks_stat": 0.5, "mass_bias": 0.0}),
    (1, {"diversity": 0.5, "ks_stat": 0.6, "mass_bias": 0.0}),
]
ARRIVING = [
    {"diversity": 2.0, "ks_stat": 0.2, "mass_bias": 0.0},
    {"diversity": 1.5, "ks_stat": 0.3, "mass_bias": 0.0},
]


def read_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on two trials read their peers together: each waits (up to 3 s) for the other
    before it reads and again before it goes on, so what the storage lets happen at once does."""
    barrier = threading.Barrier(2, timeout=3.0)
    read = RungBook.peers

    def meet() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # the other is held elsewhere (by the study lock)
            pass

    def peers(self: RungBook, epoch: int) -> Any:
        meet()
        found = read(self, epoch)
        meet()
        return found

    monkeypatch.setattr(RungBook, "peers", peers)


def arrive_together(
    url: str, name: str, definition: StudyDefinition, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, Any]]:
    """Two peers reach rung 2 one after the other, then two more trials reach it at once, each
    through a storage of its own (as two workers); the four trials' records."""
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    for _, metrics in PEERS:
        RungBook(definition, study.ask()).arrive(2, metrics)
    read_together(monkeypatch)
    errors: list[BaseException] = []
    asked = threading.Barrier(2, timeout=60)

    def worker(metrics: dict[str, float]) -> None:
        try:
            own = optuna.load_study(study_name=name, storage=open_storage(url))
            book = RungBook(definition, own.ask())
            asked.wait()  # both trials reach the rung together
            book.arrive(2, metrics)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in ARRIVING]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    trials = sorted(storage.get_all_trials(study._study_id), key=lambda t: t.number)
    return [t.user_attrs[HALVING_ATTR]["2"] for t in trials]


def assert_judged_on_what_they_record(definition: StudyDefinition, records: list[dict[str, Any]]) -> None:
    """Each decision is the rule's on the peers its record names, with their recorded metrics."""
    assert definition.halving is not None
    for number, rec in enumerate(records):
        assert rec["trial"] == number and set(rec["metrics"]) == set(JUDGED)
        own = rung_entry(definition, number, rec["metrics"])
        peers = [rung_entry(definition, p, records[p]["metrics"]) for p in rec["peers"]]
        again = judge(own, peers, definition.halving, 2)
        assert (again.why, again.place, again.reached, list(again.peers)) == (
            rec["decision"],
            rec["place"],
            rec["reached"],
            rec["peers"],
        )


def rung_study(url: str, name: str) -> StudyDefinition:
    definition = dataclasses.replace(with_rule(eta=3.0, min_peers=1), name=name)
    create_study(definition, open_storage(url))
    return definition


@pytest.mark.postgres
def test_two_workers_reaching_a_rung_at_once_are_judged_in_one_order(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = rung_study(pg_url, "at-once")
    records = arrive_together(pg_url, "at-once", definition, monkeypatch)

    assert [r["peers"][:2] for r in records[2:]] == [[0, 1], [0, 1]]
    # Under the study lock the second to arrive saw the first; the first did not see the second.
    a, b = records[2], records[3]
    assert (3 in a["peers"]) != (2 in b["peers"]), (a["peers"], b["peers"])
    assert_judged_on_what_they_record(definition, records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy_url(cli: CliProcesses, pg_url: str) -> Iterator[str]:
    port = _free_port()
    proxy = cli.start("proxy", "--storage", pg_url, "--port", str(port), name="proxy")

    def listening() -> bool:
        assert proxy.poll() is None, cli.output(proxy)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60, "the proxy to listen")
    yield f"grpc://127.0.0.1:{port}"


@pytest.mark.postgres
def test_behind_the_proxy_two_trials_at_one_rung_see_each_other(
    pg_url: str, proxy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = rung_study(pg_url, "at-once-proxied")
    records = arrive_together(proxy_url, "at-once-proxied", definition, monkeypatch)

    # No lock behind the proxy: each records its metrics before it reads, so neither can miss
    # the other (here, reading at the same moment, both see both).
    a, b = records[2], records[3]
    assert 3 in a["peers"] or 2 in b["peers"], (a["peers"], b["peers"])
    assert_judged_on_what_they_record(definition, records)


# --- a worker killed at a rung, and another started ----------------------------------------------


@pytest.mark.postgres
def test_rung_records_survive_a_worker_restart(
    cli: CliProcesses, tiny_study: Callable[..., Path], pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "restarted"
    create(
        tiny_study(name, n_trials=2, epochs=30, constraints=[], halving={"rungs": [2], "min_peers": 0}),
        pg_url,
    )
    artifacts = cli.logs / "artifacts"
    observer = optuna.storages.RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True})

    def recorded() -> dict[str, Any] | None:
        trials = trials_of(observer, name)
        rec = (trials[0].user_attrs.get(HALVING_ATTR) or {}).get("2") if trials else None
        return rec if rec and "decision" in rec else None

    first = start_worker(cli, name, pg_url, artifacts)
    before = wait_until(recorded, 120, "trial 0's record at rung 2")
    cli.kill_group(first)  # in the middle of trial 0, after its rung
    assert trials_of(observer, name)[0].state == TrialState.RUNNING

    # Past the grace period (3 s): the next worker fails trial 0 as stale, and re-enqueues it,
    # before it asks for a trial.
    time.sleep(4)
    second = start_worker(cli, name, pg_url, artifacts)
    assert cli.wait(second, 240) == 0, cli.output(second)[-3000:]
    failed, retry, new = trials_of(observer, name)
    assert failed.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    assert retry.state == new.state == TrialState.COMPLETE
    # The retry kept the record its failed attempt measured and took its decision from it.
    assert retry.user_attrs[HALVING_ATTR]["2"] == before
    assert "trial 1 rung 2: go on" in cli.output(second) and "taken by the attempt it retries" in cli.output(
        second
    )
    # The new trial was judged against the record (carried by the retry, never twice).
    assert new.user_attrs[HALVING_ATTR]["2"]["peers"] == [1]
    capsys.readouterr()
    assert main(["status", name, "--storage", pg_url]) == 0
    assert "halving: rung 2: 2 reached" in capsys.readouterr().out
