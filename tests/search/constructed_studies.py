"""Studies built from hand-written trials (no training), for the export, report and status tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial

from model.config import Config, with_overrides
from search.definition import Collapse, Constraint, Objective, Param, SamplerSpec, StudyDefinition
from search.storage import StorageSettings, open_storage
from search.study import create_study

MASS = "|mass_bias|<=0.15"
COLLAPSE = "collapse"
FEASIBLE = {MASS: -0.1, COLLAPSE: 0.0}
NORMALIZATION = {
    "target_mean": 0.625,
    "target_std": 0.9466360170129462,
    "predictor_mean": [2.5329195849713435, 0.96],
    "predictor_std": [4.016502522901616, 0.93],
    "static_mean": [],
    "static_std": [],
    "wet_mean_intensity": 6.07,
    "tail_threshold": 21.33313751220703,
}


def make_definition(
    *,
    name: str = "constructed",
    base: Config | None = None,
    space: dict[str, Param] | None = None,
    baselines: dict[str, Config] | None = None,
    collapse: Collapse | None = None,
    n_trials: int = 50,
) -> StudyDefinition:
    """Two objectives (diversity up, ks_stat down), a mass-bias constraint, reference point (0, 1)."""
    return StudyDefinition(
        name=name,
        description="",
        base=base or Config(),
        space=space
        if space is not None
        else {"loss.beta_kl": Param("float", 0.0, 1.0), "model.latent_dim": Param("int", 4, 64)},
        objectives=[Objective("diversity", "maximize"), Objective("ks_stat", "minimize")],
        constraints=[Constraint("mass_bias", max=0.15, abs=True)],
        reference_point=[0.0, 1.0],
        sampler=SamplerSpec(),
        n_trials=n_trials,
        max_retries=2,
        max_failures=n_trials,
        collapse=collapse,
        baselines=baselines or {},
        save_checkpoints=False,
    )


def story_baselines() -> dict[str, Config]:
    """A v3 (plain KL, prone to collapse) and a v4 (free bits) baseline, inside the default space."""
    return {
        "v3": with_overrides(
            Config(), {"loss.kl_mode": "plain", "loss.beta_kl": 1.0, "model.latent_dim": 16}
        ),
        "v4": with_overrides(
            Config(), {"loss.kl_mode": "free_bits_batch", "loss.beta_kl": 0.05, "model.latent_dim": 64}
        ),
    }


def distributions(definition: StudyDefinition) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for name, p in definition.space.items():
        if p.type == "categorical":
            out[name] = CategoricalDistribution(p.choices or [])
        elif p.type == "int":
            out[name] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log, step=int(p.step or 1))
        else:
            out[name] = FloatDistribution(p.low or 0.0, p.high or 0.0, log=p.log, step=p.step)
    return out


def sqlite_storage(
    tmp_path: Path, settings: StorageSettings | None = None
) -> tuple[str, optuna.storages.BaseStorage]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return url, open_storage(url, settings)


def new_study(definition: StudyDefinition, storage: optuna.storages.BaseStorage) -> optuna.Study:
    return create_study(definition, storage)


def _attrs(values: list[float], metrics: dict[str, float] | None, stopped: str | None) -> dict[str, Any]:
    recorded = {"diversity": values[0], "ks_stat": values[1], "crps": 1.0, "spread_norm": 0.1}
    recorded.update(metrics or {})
    return {
        "metrics": recorded,
        "stopped": stopped,
        "normalization": NORMALIZATION,
        "timings": {"train_s": 1.5, "eval_s": 0.5},
    }


def add_trial(
    study: optuna.Study,
    definition: StudyDefinition,
    values: list[float],
    *,
    params: dict[str, Any] | None = None,
    constraints: dict[str, float] | None = None,
    metrics: dict[str, float] | None = None,
    stopped: str | None = None,
    user_attrs: dict[str, Any] | None = None,
) -> FrozenTrial:
    """A complete search trial with ``values`` (diversity, ks_stat); ``user_attrs`` adds to
    what a worker records."""
    study.add_trial(
        optuna.create_trial(
            values=values,
            params=params or {"loss.beta_kl": 0.1, "model.latent_dim": 8},
            distributions=distributions(definition),
            user_attrs={**_attrs(values, metrics, stopped), **(user_attrs or {})},
            constraints=FEASIBLE if constraints is None else constraints,
        )
    )
    return study.get_trials(deepcopy=False)[-1]


def run_baseline(
    study: optuna.Study,
    definition: StudyDefinition,
    values: list[float],
    *,
    constraints: dict[str, float] | None = None,
    stopped: str | None = None,
) -> FrozenTrial:
    """Take the next enqueued baseline trial and complete it with ``values``, as a worker would."""
    trial = study.ask(distributions(definition))
    assert "baseline" in trial.user_attrs, "no enqueued baseline left"
    for key, value in _attrs(values, None, stopped).items():
        trial.set_user_attr(key, value)
    for key, value in (FEASIBLE if constraints is None else constraints).items():
        trial.set_constraint(key, value)
    study.tell(trial, values)
    return study._storage.get_trial(trial._trial_id)
