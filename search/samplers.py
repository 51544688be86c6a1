"""Sampler registry: a study's ``sampler.name`` to an Optuna sampler."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna

__all__ = ["SAMPLER_BUILDERS", "make_sampler"]


def _tpe(seed: int | None, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    # Constant liar keeps parallel workers from proposing the same point while trials run.
    # `group` keeps the multivariate model over conditional parameters (fields with `when`)
    # instead of falling back to independent sampling; on a flat space it proposes the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, **{"constant_liar": True, "multivariate": True, "group": True, **options}
        )


def _nsga2(seed: int | None, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, **options)


def _gp(seed: int | None, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, **options)


def _random(seed: int | None, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **options)


SAMPLER_BUILDERS: dict[str, Callable[[int | None, dict[str, Any]], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "nsga2": _nsga2,
    "gp": _gp,
    "random": _random,
}


def make_sampler(
    name: str, seed: int | None, options: dict[str, Any], worker_index: int = 0
) -> optuna.samplers.BaseSampler:
    """The study's sampler for one worker.

    Each worker offsets the seed by its index so that parallel workers do not propose the
    same start-up points.

    Raises:
        ValueError: ``options`` holds an argument the sampler does not take.
    """
    try:
        return SAMPLER_BUILDERS[name](None if seed is None else seed + worker_index, dict(options))
    except TypeError as e:
        raise ValueError(f"not accepted by the {name} sampler ({e})") from e
