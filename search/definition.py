"""Study definitions: a base training config plus a search space, objectives and rules.

A study file (``studies/*.yaml``) is parsed once into :class:`StudyDefinition`; every
error names the file, the field and what was expected, before anything touches a
database. The definition is stored in the study when it is created (as plain data with
its digest) so every worker trains exactly the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from model.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    get_field,
    load_config,
    parse_dataclass,
    read_yaml,
    with_overrides,
)
from model.downstream import downstream_metric_names
from model.metrics import METRICS
from search.samplers import SAMPLER_BUILDERS, make_sampler

__all__ = [
    "Baseline",
    "Collapse",
    "Constraint",
    "Halving",
    "Objective",
    "Param",
    "SamplerSpec",
    "StudyDefinition",
    "load_definition",
]


@dataclass
class Param:
    """One searched config field, named by its dotted path (``loss.beta_kl``)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, list[Any]] | None = None
    """Search this field only while each named categorical parameter, declared above it, takes
    one of the listed values; elsewhere the base config's (or baseline's) value holds."""

    def active(self, assigned: Mapping[str, Any]) -> bool:
        """Whether the field is searched, given the parameters assigned so far."""
        return all(
            name in assigned and assigned[name] in values for name, values in (self.when or {}).items()
        )


@dataclass
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"] | None = None
    """Defaults to the metric's natural direction in the registry."""


@dataclass
class Constraint:
    """``min <= value <= max`` (of ``|value|`` when ``abs``); each bound is one Optuna constraint."""

    metric: str
    min: float | None = None
    max: float | None = None
    abs: bool = False


@dataclass
class Collapse:
    """Collapse-aware early stopping: a healthy model exceeds both floors after the warm-up."""

    after_epoch: int = 2
    min_spread_norm: float = 0.05
    min_z_usage: float = 0.02


@dataclass
class Halving:
    """Multi-objective successive halving: at each rung a trial goes on only if it ranks in the
    top ``1/eta`` of the trials that reached the rung before it (search/halving.py)."""

    eta: float = 3.0
    """Each rung keeps the top 1/eta; also the ladder's factor."""
    min_epoch: int | None = None
    """The first rung of the ladder ``min_epoch * eta**k`` (below ``train.epochs``); default
    a quarter of ``train.epochs``."""
    rungs: list[int] | None = None
    """Explicit rung epochs instead of the ladder; the stored definition always holds them."""
    metrics: list[str] | None = None
    """Judged at a rung: objective metrics (ranked) and constraint metrics (feasibility);
    default every objective and constraint."""
    min_peers: int = 4
    """Trials that must have reached a rung before it stops anything."""
    days: int = 16
    """Validation days a rung evaluates on (the first ones, with the eval config's K and seed)."""


@dataclass
class SamplerSpec:
    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Baseline:
    """A reference setting run on the study's own data and sizes.

    Its config is the study's base (with the study's overrides) where the baseline sets
    nothing: a baseline means "these settings on this study", never another data set.
    """

    name: str
    config: str | None = None
    """A training config, relative to the study file, that the values below are read from."""
    fields: list[str] = field(default_factory=list)
    """Dotted fields or whole sections (``loss``, ``model.output``) taken from ``config``
    besides the searched ones, which a baseline with a config always takes."""
    set: dict[str, Any] = field(default_factory=dict)
    """Dotted values set directly, after those taken from ``config``."""


@dataclass
class _StudyFile:
    """The YAML schema as written; resolved into :class:`StudyDefinition`."""

    name: str
    base: str
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Param] = field(default_factory=dict)
    objectives: list[Objective] = field(
        default_factory=lambda: [Objective("diversity", "maximize"), Objective("ks_stat", "minimize")]
    )
    constraints: list[Constraint] = field(
        default_factory=lambda: [
            Constraint("mass_bias", max=0.15, abs=True),
            Constraint("spatial_correlation", min=0.5, max=0.6),
        ]
    )
    reference_point: list[float] | None = None
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    n_trials: int = 20
    max_retries: int = 2
    max_failures: int | None = None
    collapse: Collapse | None = field(default_factory=Collapse)
    halving: Halving | None = None
    baselines: list[Baseline] = field(default_factory=list)
    save_checkpoints: bool = False


@dataclass
class StudyDefinition:
    """A resolved study: every config is a full, validated :class:`Config`."""

    name: str
    description: str
    base: Config
    space: dict[str, Param]
    objectives: list[Objective]
    constraints: list[Constraint]
    reference_point: list[float]
    sampler: SamplerSpec
    n_trials: int
    max_retries: int
    max_failures: int
    collapse: Collapse | None
    baselines: dict[str, Config]
    save_checkpoints: bool
    source: str = "<definition>"
    baseline_fields: dict[str, list[str]] = field(default_factory=dict)
    """The dotted fields each baseline sets, as read from its study file (for display; the
    stored definition keeps only the resolved configs)."""
    halving: Halving | None = None
    """Resolved: explicit ``rungs`` and ``metrics``."""

    @property
    def directions(self) -> list[str]:
        return [o.direction or "minimize" for o in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def downstream_metrics(self) -> list[str]:
        """The downstream gains the study judges trials by: each trial then trains SRDRN too."""
        judged = [o.metric for o in self.objectives] + [c.metric for c in self.constraints]
        return [m for m in dict.fromkeys(judged) if m not in METRICS]

    def make_sampler(self, worker_index: int = 0) -> optuna.samplers.BaseSampler:
        return make_sampler(self.sampler.name, self.sampler.seed, self.sampler.options, worker_index)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as stored in the study; :meth:`from_dict` gives an equal definition."""
        data = {
            "name": self.name,
            "description": self.description,
            "base": _config_dict(self.base),
            "space": {k: _param_dict(v) for k, v in self.space.items()},
            "objectives": [asdict(o) for o in self.objectives],
            "constraints": [asdict(c) for c in self.constraints],
            "reference_point": list(self.reference_point),
            "sampler": asdict(self.sampler),
            "n_trials": self.n_trials,
            "max_retries": self.max_retries,
            "max_failures": self.max_failures,
            "collapse": None if self.collapse is None else asdict(self.collapse),
            "baselines": {k: _config_dict(v) for k, v in self.baselines.items()},
            "save_checkpoints": self.save_checkpoints,
        }
        # Stored only when set, so studies created before halving existed keep their digest.
        if self.halving is not None:
            data["halving"] = asdict(self.halving)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<stored definition>") -> StudyDefinition:
        return cls(
            name=data["name"],
            description=data["description"],
            base=config_from_dict(data["base"], f"{source}: base"),
            space={k: Param(**v) for k, v in data["space"].items()},
            objectives=[Objective(**o) for o in data["objectives"]],
            constraints=[Constraint(**c) for c in data["constraints"]],
            reference_point=list(data["reference_point"]),
            sampler=SamplerSpec(**data["sampler"]),
            n_trials=data["n_trials"],
            max_retries=data["max_retries"],
            max_failures=data["max_failures"],
            collapse=None if data["collapse"] is None else Collapse(**data["collapse"]),
            baselines={
                k: config_from_dict(v, f"{source}: baseline {k}") for k, v in data["baselines"].items()
            },
            save_checkpoints=data["save_checkpoints"],
            source=source,
            halving=Halving(**data["halving"]) if data.get("halving") is not None else None,
        )

    def digest(self) -> str:
        """A stable hash of everything that decides how trials train and are judged."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config_for(self, params: Mapping[str, Any], baseline: str | None = None) -> Config:
        """The training config of a trial: the base (or a baseline) with ``params`` applied."""
        if baseline is not None and baseline not in self.baselines:
            raise KeyError(f"unknown baseline {baseline!r} (study has {sorted(self.baselines)})")
        start = self.baselines[baseline] if baseline is not None else self.base
        return with_overrides(start, dict(params), f"{self.name}: trial parameters")

    def describe_baseline(self, name: str) -> str:
        """What baseline ``name`` sets, and where it differs from the base, in one line."""
        cfg = self.baselines[name]
        fields = self.baseline_fields.get(name, [])
        differs = [
            f"{dotted}={get_field(cfg, dotted)!r}"
            for dotted in fields
            if get_field(cfg, dotted) != get_field(self.base, dotted)
        ]
        return (
            f"baseline {name} sets {len(fields)} field{'s' if len(fields) != 1 else ''} on the study's base; "
            + (f"differs from it in {', '.join(differs)}" if differs else "the same values as the base")
        )

    def baseline_params(self, name: str) -> dict[str, Any]:
        """A baseline's values at the paths it searches, for enqueueing it as a trial."""
        cfg = self.baselines[name]
        params: dict[str, Any] = {}
        for path, p in self.space.items():
            if p.active(params):
                params[path] = get_field(cfg, path)
        return params


_LATER_FIELDS = (
    "data.missing_predictors",
    "data.synthetic.storm_days",
    "data.synthetic.storm_intensity",
    "data.synthetic.storm_radius",
    "train.threads",
    "downstream",
)
"""Config fields added after studies were first stored: at their default they are left out of
the stored definition, so those studies (and caches keyed by their digest) keep their digest."""


def _config_dict(cfg: Config) -> dict[str, Any]:
    data = config_to_dict(cfg)
    defaults = config_to_dict(Config())
    for dotted in _LATER_FIELDS:
        *parents, leaf = dotted.split(".")
        node, default = data, defaults
        for part in parents:
            node, default = node[part], default[part]
        if node[leaf] == default[leaf]:
            del node[leaf]
    return data


def _param_dict(p: Param) -> dict[str, Any]:
    # An unconditional parameter is stored without `when`, so studies created before
    # conditions existed keep their digest.
    data = asdict(p)
    if p.when is None:
        del data["when"]
    return data


def _fail(source: str, path: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{source}: {path}: expected {expected}, got {got!r}")


def _check_param(source: str, path: str, p: Param, base: Config) -> None:
    where = f"space.{path}"
    try:
        get_field(base, path)
    except KeyError:
        raise ConfigError(f"{source}: {where}: not a field of the training config") from None
    if p.type == "categorical":
        if not p.choices:
            raise _fail(source, f"{where}.choices", "a non-empty list", p.choices)
        values = list(p.choices)
    else:
        if p.low is None or p.high is None or not p.low <= p.high:
            raise _fail(source, where, "numbers low <= high", (p.low, p.high))
        if p.log and p.low <= 0:
            raise _fail(source, f"{where}.low", "a positive number with log: true", p.low)
        if p.log and p.step is not None:
            raise _fail(source, f"{where}.step", "no step with log: true", p.step)
        if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
            raise _fail(source, where, "integer bounds for type int", (p.low, p.high))
        values = [int(p.low), int(p.high)] if p.type == "int" else [p.low, p.high]
    for value in values:
        try:
            with_overrides(base, {path: value}, source)
        except ConfigError as e:
            detail = str(e).split(": ", 2)[-1]
            raise ConfigError(
                f"{source}: {where}: value {value!r} is not valid for the config ({detail})"
            ) from None


def _check_when(source: str, path: str, p: Param, earlier: Mapping[str, Param]) -> None:
    for name, values in (p.when or {}).items():
        where = f"space.{path}.when.{name}"
        parent = earlier.get(name)
        if parent is None or parent.type != "categorical":
            raise _fail(source, where, "a categorical parameter declared above it in space", name)
        unknown = [v for v in values if v not in (parent.choices or [])]
        if not values or unknown:
            raise _fail(source, where, f"a non-empty list of space.{name}.choices {parent.choices}", values)


def _within(p: Param, value: Any) -> bool:
    if p.type == "categorical":
        return value in (p.choices or [])
    assert p.low is not None and p.high is not None
    return isinstance(value, (int, float)) and p.low <= value <= p.high


_BASELINE_SECTIONS = ("model", "loss", "train")
"""What a baseline may set: the data it trains on and how it is judged are the study's."""


def _leaves(cfg: Config, dotted: str) -> list[str]:
    """The dotted leaf fields at ``dotted``: itself, or every field of the section it names."""
    node: Any = config_to_dict(cfg)
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    if not isinstance(node, dict):
        return [dotted]
    return [leaf for key in node for leaf in _leaves(cfg, f"{dotted}.{key}")]


def _resolve_baseline(
    study_file: Path, i: int, b: Baseline, base: Config, space: Mapping[str, Param]
) -> tuple[Config, list[str]]:
    """A baseline's config on the study's base, and the dotted fields it sets."""
    source = str(study_file)
    where = f"baselines[{i}] ({b.name})"
    if b.fields and b.config is None:
        raise _fail(source, f"{where}.fields", "a config to take them from (baselines[].config)", b.fields)
    values: dict[str, Any] = {}
    if b.config is not None:
        own = _resolve_config(study_file, b.config, f"baselines[{i}].config")
        assigned: dict[str, Any] = {}
        for name, param in space.items():
            if param.active(assigned):
                values[name] = assigned[name] = get_field(own, name)
        for j, dotted in enumerate(b.fields):
            if dotted.split(".")[0] not in _BASELINE_SECTIONS:
                raise _fail(
                    source,
                    f"{where}.fields[{j}]",
                    f"a field or section of {', '.join(_BASELINE_SECTIONS)} (a baseline trains on the "
                    "study's data and is judged by its eval section)",
                    dotted,
                )
            try:
                values.update({leaf: get_field(own, leaf) for leaf in _leaves(own, dotted)})
            except KeyError:
                expected = "a field or section of the training config"
                raise _fail(source, f"{where}.fields[{j}]", expected, dotted) from None
    for dotted in b.set:
        if dotted.split(".")[0] not in _BASELINE_SECTIONS:
            raise _fail(
                source, f"{where}.set.{dotted}", f"a field of {', '.join(_BASELINE_SECTIONS)}", dotted
            )
    values.update(b.set)
    cfg = with_overrides(base, values, f"{source}: {where}")
    return cfg, list(values)


def _resolve_config(study_file: Path, ref: str, field_name: str) -> Config:
    path = (study_file.parent / ref).resolve()
    if not path.exists():
        raise ConfigError(f"{study_file}: {field_name}: no such config file {ref!r} (looked at {path})")
    return load_config(path)


DEFAULT_FIRST_RUNG = 1 / 4
"""The ladder's first rung, as a fraction of ``train.epochs``, when ``halving.min_epoch`` is
not set: from there on the rung metrics' rank correlation with the final ones was >= 0.8 for
every objective and the mass constraint at CPU size (benchmarks/RESULTS.md, section 7)."""


def halving_ladder(min_epoch: int, eta: float, epochs: int) -> list[int]:
    """The rungs ``round(min_epoch * eta**k)``, k = 0, 1, ..., below ``epochs``."""
    rungs: list[int] = []
    k = 0
    while (rung := round(min_epoch * eta**k)) < epochs:
        if rung not in rungs:
            rungs.append(rung)
        k += 1
    return rungs


def _resolve_halving(
    source: str, h: Halving, base: Config, objectives: list[Objective], spec: _StudyFile
) -> Halving:
    epochs = base.train.epochs
    if not h.eta > 1:
        raise _fail(source, "halving.eta", "a number > 1", h.eta)
    if h.min_peers < 0:
        raise _fail(source, "halving.min_peers", "a non-negative integer", h.min_peers)
    if h.days < 1:
        raise _fail(source, "halving.days", "a positive number of validation days", h.days)
    if h.rungs is not None and h.min_epoch is not None:
        raise _fail(source, "halving", "either rungs or min_epoch, not both", asdict(h))
    if h.rungs is not None:
        rungs = list(h.rungs)
        if not rungs or rungs != sorted(set(rungs)) or rungs[0] < 1 or rungs[-1] >= epochs:
            raise _fail(
                source, "halving.rungs", f"increasing epochs from 1 to below train.epochs ({epochs})", h.rungs
            )
    else:
        min_epoch = h.min_epoch if h.min_epoch is not None else max(1, round(epochs * DEFAULT_FIRST_RUNG))
        if not 1 <= min_epoch < epochs:
            raise _fail(
                source, "halving.min_epoch", f"an epoch from 1 to below train.epochs ({epochs})", min_epoch
            )
        rungs = halving_ladder(min_epoch, h.eta, epochs)
    # Downstream gains exist only once a trial has trained to its end: no rung can rank by them.
    judged = [
        m for m in [o.metric for o in objectives] + [c.metric for c in spec.constraints] if m in METRICS
    ]
    metrics = list(dict.fromkeys(h.metrics if h.metrics is not None else judged))
    for i, name in enumerate(metrics):
        if name not in judged:
            raise _fail(
                source,
                f"halving.metrics[{i}]",
                f"an objective or constraint metric ({', '.join(judged)})",
                name,
            )
    if not any(o.metric in metrics for o in objectives):
        raise _fail(source, "halving.metrics", "at least one objective metric to rank by", metrics)
    return Halving(
        eta=float(h.eta), min_epoch=None, rungs=rungs, metrics=metrics, min_peers=h.min_peers, days=h.days
    )


def _known_metrics(base: Config) -> dict[str, str | None]:
    """Every name an objective or constraint may use, with its default direction: the
    registered metrics, and the downstream gains ``base.downstream`` yields (maximised)."""
    known: dict[str, str | None] = {name: m.direction for name, m in METRICS.items()}
    return known | {name: "maximize" for name in downstream_metric_names(base.downstream)}


def _metric_help(known: Mapping[str, str | None]) -> str:
    scores = [n.removeprefix("downstream_").removesuffix("_gain") for n in known if n not in METRICS]
    return f"a metric name ({', '.join(METRICS)}) or downstream_<score>_gain ({', '.join(scores)})"


def load_definition(path: str | Path) -> StudyDefinition:
    """Parse and fully validate a study file."""
    path = Path(path)
    source = str(path)
    spec = parse_dataclass(_StudyFile, read_yaml(path, "study file"), source)

    base = with_overrides(_resolve_config(path, spec.base, "base"), spec.overrides, f"{source}: overrides")
    earlier: dict[str, Param] = {}
    for name, param in spec.space.items():
        _check_param(source, name, param, base)
        _check_when(source, name, param, earlier)
        earlier[name] = param

    if not spec.objectives:
        raise _fail(source, "objectives", "at least one objective", spec.objectives)
    known = _known_metrics(base)
    objectives = []
    for i, o in enumerate(spec.objectives):
        if o.metric not in known:
            raise _fail(source, f"objectives[{i}].metric", _metric_help(known), o.metric)
        direction = o.direction or known[o.metric]
        if direction is None:
            raise _fail(
                source, f"objectives[{i}].direction", "maximize or minimize (the metric has none)", None
            )
        objectives.append(Objective(o.metric, direction))
    for i, c in enumerate(spec.constraints):
        if c.metric not in known:
            raise _fail(source, f"constraints[{i}].metric", _metric_help(known), c.metric)
        if c.min is None and c.max is None:
            raise _fail(source, f"constraints[{i}]", "a min or a max", asdict(c))
        if c.min is not None and c.max is not None and c.min > c.max:
            raise _fail(source, f"constraints[{i}].min", f"a value <= max ({c.max})", c.min)

    reference = spec.reference_point
    if reference is None:
        reference = [0.0 if o.direction == "maximize" else 1.0 for o in objectives]
    if len(reference) != len(objectives) or not all(math.isfinite(x) for x in reference):
        raise _fail(
            source, "reference_point", f"{len(objectives)} finite numbers (one per objective)", reference
        )

    if spec.sampler.name not in SAMPLER_BUILDERS:
        raise _fail(source, "sampler.name", f"one of {', '.join(SAMPLER_BUILDERS)}", spec.sampler.name)
    try:
        make_sampler(spec.sampler.name, spec.sampler.seed, spec.sampler.options)
    except ValueError as e:
        raise ConfigError(f"{source}: sampler.options: {e}") from None
    if spec.n_trials < 1:
        raise _fail(source, "n_trials", "a positive integer", spec.n_trials)
    if spec.max_retries < 0:
        raise _fail(source, "max_retries", "a non-negative integer", spec.max_retries)
    if len(spec.baselines) > spec.n_trials:
        raise _fail(source, "baselines", f"at most n_trials ({spec.n_trials}) baselines", len(spec.baselines))
    if spec.collapse is not None and spec.collapse.after_epoch < 1:
        raise _fail(source, "collapse.after_epoch", "an epoch >= 1", spec.collapse.after_epoch)

    halving = None if spec.halving is None else _resolve_halving(source, spec.halving, base, objectives, spec)

    baselines: dict[str, Config] = {}
    baseline_fields: dict[str, list[str]] = {}
    for i, b in enumerate(spec.baselines):
        if b.name in baselines:
            raise _fail(source, f"baselines[{i}].name", "a unique name", b.name)
        cfg, baseline_fields[b.name] = _resolve_baseline(path, i, b, base, spec.space)
        assigned: dict[str, Any] = {}
        for name, param in spec.space.items():
            if not param.active(assigned):
                continue
            value = assigned[name] = get_field(cfg, name)
            if not _within(param, value):
                raise ConfigError(
                    f"{source}: baselines[{i}] ({b.name}): {name}={value!r} lies outside space.{name}; "
                    "widen the space so the baseline can be enqueued as a trial"
                )
        baselines[b.name] = cfg

    return StudyDefinition(
        name=spec.name,
        description=spec.description,
        base=base,
        space=dict(spec.space),
        objectives=objectives,
        constraints=list(spec.constraints),
        reference_point=[float(x) for x in reference],
        sampler=spec.sampler,
        n_trials=spec.n_trials,
        max_retries=spec.max_retries,
        max_failures=spec.max_failures if spec.max_failures is not None else spec.n_trials,
        collapse=spec.collapse,
        baselines=baselines,
        save_checkpoints=spec.save_checkpoints,
        source=source,
        baseline_fields=baseline_fields,
        halving=halving,
    )
