"""The downstream stage's claims (each trial evaluated once, by one process, a dead process's
claim taken over), its records and the readers of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.downstream_stage import (
    RECORD_ATTR_PREFIX,
    SOURCE_ATTR,
    claim_next,
    downstream_records,
    enqueue_claims,
    process_claims,
    queue_study,
    stage_trials,
)
from search.storage import open_storage
from search.study import stored_definition
from tests.conftest import TINY_DOWNSTREAM, CliProcesses, tiny_config_dict
from tests.search.constructed_studies import (
    add_trial,
    make_definition,
    new_study,
    run_baseline,
    story_baselines,
)


def _study(url: str) -> tuple[optuna.Study, list[int]]:
    """A constructed study (no training) with six complete trials."""
    definition = make_definition(name=f"claims-{uuid.uuid4().hex[:8]}")
    study = new_study(definition, open_storage(url))
    numbers = [add_trial(study, definition, [0.1 * i, 0.5]).number for i in range(6)]
    return study, numbers


def _claimer(cli: CliProcesses, url: str, study: optuna.Study, log: Path, hold_s: float, numbers: list[int]):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.search.downstream_claimer",
            url,
            study.study_name,
            str(log),
            str(hold_s),
            *map(str, numbers),
        ],
        env=cli.env,
        start_new_session=True,
    )


def _claimed(log: Path) -> list[int]:
    return [int(n) for n in log.read_text().split()] if log.exists() else []


def test_two_processes_never_evaluate_a_trial_twice(pg_url: str, cli: CliProcesses, tmp_path: Path) -> None:
    study, numbers = _study(pg_url)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_claimer(cli, pg_url, study, log, 0.3, numbers) for log in logs]
    cli.started.extend(procs)
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    claimed = _claimed(logs[0]) + _claimed(logs[1])
    assert Counter(claimed) == Counter(numbers), claimed
    queue = queue_study(study)
    states = Counter(t.state for t in queue.get_trials(deepcopy=False))
    assert states == {TrialState.COMPLETE: len(numbers)}


def _wait_for(log: Path, n: int, what: str) -> list[int]:
    deadline = time.monotonic() + 60
    while len(_claimed(log)) < n:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return _claimed(log)


def test_a_killed_process_does_not_hold_its_trial(pg_url: str, cli: CliProcesses, tmp_path: Path) -> None:
    study, numbers = _study(pg_url)
    first, second = tmp_path / "killed.log", tmp_path / "survivor.log"
    stuck = _claimer(cli, pg_url, study, first, 600, numbers[:2])
    cli.started.append(stuck)
    held = _wait_for(first, 1, "the first process never claimed a trial")[0]
    survivor = _claimer(cli, pg_url, study, second, 0.0, numbers[:2])
    cli.started.append(survivor)
    # The survivor takes the other trial, then waits on the live claim rather than taking it.
    assert _wait_for(second, 1, "the second process never claimed the free trial") == [
        n for n in numbers[:2] if n != held
    ]
    time.sleep(2.0)
    assert survivor.poll() is None and len(_claimed(second)) == 1, "a live claim is not taken over"
    cli.kill_group(stuck)
    assert survivor.wait(timeout=60) == 0
    assert sorted(_claimed(second)) == sorted(numbers[:2]), "the dead process's trial was taken over"
    queue = queue_study(study)
    failed = [t for t in queue.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert [t.user_attrs[SOURCE_ATTR] for t in failed] == [held]
    assert failed[0].user_attrs["fail_reason"].startswith("stale")


def test_claims_are_enqueued_once_and_a_failed_one_is_offered_again(tmp_path: Path) -> None:
    study, numbers = _study(f"sqlite:///{tmp_path / 'study.db'}")
    queue = queue_study(study)
    assert enqueue_claims(queue, numbers) == numbers
    assert enqueue_claims(queue, numbers) == [], "a waiting claim is not enqueued twice"

    first = claim_next(queue, numbers[::-1])
    assert first is not None and first.user_attrs[SOURCE_ATTR] == numbers[-1], "claims go in the order asked"
    assert first.state == TrialState.RUNNING
    queue._storage.set_trial_state_values(first._trial_id, TrialState.COMPLETE)

    def fail_on_two(number: int) -> None:
        if number == numbers[2]:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        process_claims(queue, numbers, fail_on_two)
    by_state = {
        s: [t.user_attrs[SOURCE_ATTR] for t in queue.get_trials(deepcopy=False, states=(s,))]
        for s in TrialState
    }
    assert sorted(by_state[TrialState.COMPLETE]) == [numbers[0], numbers[1], numbers[-1]]
    assert by_state[TrialState.FAIL] == [numbers[2]]
    assert enqueue_claims(queue, numbers) == [numbers[2]], "only the failed trial is offered again"


def test_a_stage_result_is_read_by_number_beside_a_trials_own(tmp_path: Path) -> None:
    study, numbers = _study(f"sqlite:///{tmp_path / 'study.db'}")
    definition = make_definition()
    own = add_trial(
        study, definition, [0.05, 0.9], user_attrs={"downstream": {"gains": {"downstream_x_gain": 1.0}}}
    )
    study._storage.set_study_system_attr(
        study._study_id, f"{RECORD_ATTR_PREFIX}{numbers[1]}", {"gains": {"downstream_x_gain": 2.0}}
    )
    assert downstream_records(study) == {
        own.number: {"gains": {"downstream_x_gain": 1.0}},
        numbers[1]: {"gains": {"downstream_x_gain": 2.0}},
    }


def test_the_stage_takes_the_front_in_knee_order_then_the_baselines(tmp_path: Path) -> None:
    definition = make_definition(baselines=story_baselines())
    study = new_study(definition, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    v3 = run_baseline(study, definition, [0.95, 0.9]).number  # on the front
    v4 = run_baseline(study, definition, [0.01, 0.99]).number  # dominated
    knee = add_trial(study, definition, [0.5, 0.2]).number
    other = add_trial(study, definition, [0.1, 0.05]).number
    add_trial(study, definition, [0.4, 0.5])  # dominated
    front = [t.number for t in stage_trials(study, definition, baselines=False)]
    assert front[0] == knee and sorted(front) == sorted([v3, knee, other])
    assert [t.number for t in stage_trials(study, definition)] == [*front, v4], "v3 is not taken twice"
    assert [t.number for t in stage_trials(study, definition, top=1)] == [knee, v3, v4]
    assert [t.number for t in stage_trials(study, definition, trial=other)] == [other]
    with pytest.raises(ValueError, match="no complete trial 99"):
        stage_trials(study, definition, trial=99)


# --- end to end, with SRDRN ------------------------------------------------------------------------


def _lines_with(text: str, phrase: str) -> list[int]:
    """Trial numbers of the output lines ``trial N ...: <phrase>``."""
    return [int(m) for m in re.findall(rf"^trial (\d+)[^:\n]*: {phrase}", text, flags=re.MULTILINE)]


def test_the_front_is_evaluated_once_by_two_processes_and_a_rerun_skips_it(
    pg_url: str, cli: CliProcesses, tiny_study: Callable[..., Path], tmp_path: Path
) -> None:
    study_file = tiny_study(
        "ds-front", n_trials=3, epochs=1, baselines={"v4": {"loss.beta_kl": 0.05}}, constraints=[]
    )
    (study_file.parent / "tiny.yaml").write_text(yaml.safe_dump(tiny_config_dict(1, TINY_DOWNSTREAM)))
    assert cli.run("create", str(study_file), "--storage", pg_url).returncode == 0
    worker = cli.run("worker", "ds-front", "--storage", pg_url, "--artifact-dir", str(tmp_path / "a"))
    assert worker.returncode == 0, worker.stderr[-2000:]

    args = ("downstream", "ds-front", "--front", "--storage", pg_url, "--artifact-dir", str(tmp_path / "a"))
    procs = [cli.start(*args, "-o", str(tmp_path / f"ds{i}"), name=f"ds{i}") for i in range(2)]
    outputs = []
    for proc in procs:
        assert cli.wait(proc, timeout=300) == 0, cli.output(proc)[-3000:]
        outputs.append(cli.output(proc))
    study = optuna.load_study(study_name="ds-front", storage=open_storage(pg_url, create=False))
    definition = stored_definition(study._storage, "ds-front")
    wanted = sorted(t.number for t in stage_trials(study, definition))
    now = [_lines_with(out, "evaluated now") for out in outputs]
    assert sorted(now[0] + now[1]) == wanted, "each trial evaluated once, by one of the two processes"
    records = downstream_records(study)
    assert sorted(records) == wanted
    for out in outputs:
        assert "ranked by verdicts (best first):" in out
        assert sorted(_lines_with(out, "evaluated (?:now|by another process)")) == wanted
    claims = queue_study(study).get_trials(deepcopy=False)
    assert sorted(t.user_attrs[SOURCE_ATTR] for t in claims) == wanted
    assert {t.state for t in claims} == {TrialState.COMPLETE}
    record = records[wanted[0]]
    assert Path(record["file"]).is_file() and record["table"] and record["gains"]

    rerun = cli.run(*args, "-o", str(tmp_path / "ds2"), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _lines_with(rerun.stdout, "already evaluated") == wanted
    assert _lines_with(rerun.stdout, "evaluated now") == []
    assert downstream_records(study) == records, "nothing evaluated again: every record as it was"
    assert not (tmp_path / "ds2").exists()

    status = cli.run("status", "ds-front", "--storage", pg_url)
    assert f"downstream (cvae-search downstream; {len(wanted)} trials):" in status.stdout
    gain = sorted(record["gains"])[0]
    front = {t.number for t in study.best_trials}
    best = max((n for n in wanted if n in front), key=lambda n: (records[n]["gains"][gain], -n))
    out = tmp_path / "pick.yaml"
    export = cli.run("export", "ds-front", "--storage", pg_url, "--pick", f"max:{gain}", "-o", str(out))
    assert export.returncode == 0, export.stderr
    provenance = yaml.safe_load(out.read_text())["provenance"]
    assert provenance["trial"] == best
    assert provenance["downstream"]["table"] == records[best]["table"]


def test_downstream_of_an_export_and_of_a_checkpoint(cli: CliProcesses, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny_config_dict(1, TINY_DOWNSTREAM), "provenance": {"trial": 3}}))
    from_config = cli.run("downstream", str(config), "-o", str(tmp_path / "from-config"), timeout=300)
    assert from_config.returncode == 0, from_config.stderr[-2000:]
    assert (tmp_path / "from-config" / "downstream.json").is_file()
    assert (
        "within noise" in from_config.stdout
        or "better" in from_config.stdout
        or "worse" in from_config.stdout
    )

    trained = cli.run("train", str(config), "-o", str(tmp_path / "run"), timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    from_checkpoint = cli.run(
        "downstream", str(tmp_path / "run" / "checkpoint.pt"), "-o", str(tmp_path / "from-ckpt"), timeout=300
    )
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    saved = json.loads((tmp_path / "from-ckpt" / "downstream.json").read_text())
    assert set(saved["scores"]) == {"without", "with"}
    assert from_checkpoint.stdout.splitlines()[0] == from_config.stdout.splitlines()[0], (
        "the same table header"
    )
