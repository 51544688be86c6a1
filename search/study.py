"""Creating a study from its definition, and loading it back with the stored definition.

Creating and running are separate steps: ``create`` writes the definition into the study
and enqueues the baselines once; workers only load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import time
import uuid

import optuna
from optuna.storages import BaseStorage

from model.data import DataError, check_data
from search.definition import StudyDefinition
from search.storage import BUDGET_ATTR, MAX_RETRIES_ATTR, known_experimental, search_storage

__all__ = [
    "DEFINITION_ATTR",
    "DIGEST_ATTR",
    "DOWNSTREAM_ATTR",
    "DefinitionMismatch",
    "StudyNotFound",
    "check_study_data",
    "claim_worker_slot",
    "create_study",
    "load_study",
    "stored_definition",
]

_log = logging.getLogger(__name__)

DEFINITION_ATTR = "cvae_search:definition"
DIGEST_ATTR = "cvae_search:digest"
WORKER_ATTR_PREFIX = "cvae_search:worker:"
BASELINE_ATTR = "baseline"
DOWNSTREAM_ATTR = "downstream"
"""User attribute of a trial evaluated downstream: its gains, verdicts and table
(:meth:`model.downstream.DownstreamResult.summary`)."""


class DefinitionMismatch(RuntimeError):
    """A local study file differs from the definition stored in the study."""


class StudyNotFound(LookupError):
    """No study of that name, or one not created by cvae-search."""


def stored_definition(storage: BaseStorage, name: str, *, wait_s: float = 10.0) -> StudyDefinition:
    """The definition stored in study ``name``.

    ``create`` writes the definition just after creating the study, so a worker that starts
    in between waits up to ``wait_s`` for it.
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError as e:
        raise StudyNotFound(f"no study named {name!r} in this storage; run `cvae-search create` first") from e
    deadline = time.monotonic() + wait_s
    while True:
        attrs = storage.get_study_system_attrs(study_id)
        if DEFINITION_ATTR in attrs:
            return StudyDefinition.from_dict(json.loads(attrs[DEFINITION_ATTR]), f"study {name}")
        if time.monotonic() > deadline:
            raise StudyNotFound(
                f"study {name!r} holds no cvae-search definition; was it created by `cvae-search create`?"
            )
        time.sleep(0.5)


def _check_same(local: StudyDefinition, stored: StudyDefinition) -> None:
    if local.digest() != stored.digest():
        raise DefinitionMismatch(
            f"{local.source}: differs from the definition stored in study {stored.name!r} "
            f"(digest {local.digest()} != {stored.digest()}); every worker must train the same way: "
            "use the stored one (omit the file) or create a study under a new name"
        )


def check_study_data(definition: StudyDefinition) -> list[str]:
    """Check the data of the base config and of every baseline as their trials will load them.

    Run before anything is written to the storage, so that a study whose data would fail every
    trial is never created. A data file is read whole, with every check training makes; a
    synthetic source is checked against its generator's layout without being generated
    (:func:`model.data.check_data`). Each distinct data section is checked once.

    Returns:
        One line per distinct data section: the configs that use it, then what was checked.

    Raises:
        DataError: The loader's one-line error, after the study file and the config's name.
    """
    checked: dict[str, tuple[str, list[str]]] = {}
    configs = [("base", definition.base), *((f"baseline {n}", c) for n, c in definition.baselines.items())]
    for name, cfg in configs:
        key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if key in checked:
            checked[key][1].append(name)
            continue
        try:
            line = check_data(cfg.data)
        except ValueError as e:  # DataError, and a synthetic grid the factor does not divide
            raise DataError(f"{definition.source}: {name}: {e}") from e
        checked[key] = (line, [name])
    return [f"{', '.join(names)}: {line}" for line, names in checked.values()]


def create_study(definition: StudyDefinition, storage: BaseStorage) -> optuna.Study:
    """Create study ``definition.name`` (or reuse an identical one) and enqueue its baselines.

    The caller checks the data first (:func:`check_study_data`), before opening ``storage``:
    opening one already writes Optuna's schema.
    """
    try:
        existing = stored_definition(storage, definition.name, wait_s=5.0)
    except StudyNotFound:
        existing = None
    if existing is not None:
        _check_same(definition, existing)
        _log.info("study %s exists with the same definition; reusing it", definition.name)
        return optuna.load_study(study_name=definition.name, storage=storage)

    study = optuna.create_study(
        study_name=definition.name,
        storage=storage,
        directions=definition.directions,
        load_if_exists=True,
    )
    with known_experimental():  # the names the dashboard and reports show for the objectives
        study.set_metric_names(definition.metric_names)
    sid = study._study_id
    # The definition goes in last but one: stored_definition() waits for it, and the budget
    # must be in place before anyone can see a complete study.
    storage.set_study_system_attr(sid, BUDGET_ATTR, definition.n_trials)
    storage.set_study_system_attr(sid, MAX_RETRIES_ATTR, definition.max_retries)
    storage.set_study_system_attr(sid, DIGEST_ATTR, definition.digest())
    storage.set_study_system_attr(sid, DEFINITION_ATTR, json.dumps(definition.to_dict()))
    for name in definition.baselines:
        study.enqueue_trial(definition.baseline_params(name), user_attrs={BASELINE_ATTR: name})
    _log.info(
        "created study %s: %d trials, %d baselines enqueued",
        definition.name,
        definition.n_trials,
        len(definition.baselines),
    )
    return study


def load_study(
    name: str,
    storage: BaseStorage,
    *,
    local: StudyDefinition | None = None,
) -> tuple[optuna.Study, StudyDefinition]:
    """Load study ``name`` with the sampler its stored definition names.

    Args:
        name: Study name.
        storage: An opened storage.
        local: A definition read from a local file; refused if it differs from the stored one.
    """
    definition = stored_definition(storage, name)
    if local is not None:
        _check_same(local, definition)
    study = optuna.load_study(study_name=name, storage=storage, sampler=definition.make_sampler())
    return study, definition


def claim_worker_slot(study: optuna.Study) -> int:
    """A number no other worker of ``study`` has had: 0 for the first worker, then 1, 2, ...

    Each worker records itself in the study (start time, host). Under the study lock, where
    the storage has one, the slot is the count of earlier records, exact. Elsewhere (behind
    the gRPC proxy) it is the rank of this record among those written so far: two workers
    starting in the same instant may then share a slot.
    """
    storage = search_storage(study._storage)
    lock = storage.study_lock(study._study_id) if storage is not None else contextlib.nullcontext()
    with lock:
        key = f"{WORKER_ATTR_PREFIX}{time.time_ns():020d}:{uuid.uuid4().hex[:8]}"
        earlier = [
            k
            for k in study._storage.get_study_system_attrs(study._study_id)
            if k.startswith(WORKER_ATTR_PREFIX)
        ]
        study._storage.set_study_system_attr(study._study_id, key, socket.gethostname())
        if storage is not None:
            return len(earlier)
        keys = sorted(
            k
            for k in study._storage.get_study_system_attrs(study._study_id)
            if k.startswith(WORKER_ATTR_PREFIX)
        )
    return keys.index(key)
