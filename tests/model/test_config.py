from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.config import (
    Config,
    ConfigError,
    LossConfig,
    Normalization,
    config_from_dict,
    config_to_dict,
    get_field,
    load_config,
    save_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path: Path, raw: Any, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(f"{path}: "), message
    return message


def _normalization() -> Normalization:
    return Normalization(
        target_mean=0.4123456789,
        target_std=1.1,
        predictor_mean=[1.5, -0.25],
        predictor_std=[2.0, 0.3],
        static_mean=[310.0],
        static_std=[95.5],
        wet_mean_intensity=6.02,
        tail_threshold=21.7,
    )


def test_yaml_round_trip_of_defaults_and_of_a_changed_config(tmp_path: Path) -> None:
    default = Config()
    save_config(default, tmp_path / "a.yaml")
    assert load_config(tmp_path / "a.yaml") == default

    changed = with_overrides(
        default,
        {
            "loss.beta_kl": 0.123,
            "model.output": "hurdle",
            "data.static_vars": ["elevation"],
            "eval.max_days": 5,
        },
    )
    save_config(changed, tmp_path / "b.yaml")
    loaded = load_config(tmp_path / "b.yaml")
    assert loaded == changed and loaded != default
    assert loaded.loss.beta_kl == 0.123 and loaded.eval.max_days == 5


def test_yaml_round_trip_keeps_normalization_and_ignores_provenance(tmp_path: Path) -> None:
    cfg = dataclasses.replace(Config(), normalization=_normalization())
    path = tmp_path / "exported.yaml"
    save_config(cfg, path, provenance={"study": "tiny", "trial": 7, "metrics": {"diversity": 0.2}})

    raw = yaml.safe_load(path.read_text())
    assert list(raw)[-1] == "provenance" and raw["provenance"]["trial"] == 7
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.normalization == _normalization()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_survive_dict_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg), str(path)) == cfg


def test_every_shipped_config_is_present() -> None:
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "v3.yaml", "v4.yaml", "srdrn_example.yaml"}


BAD_VALUES = [
    pytest.param({"epoch": 3}, "epoch", "unknown field", id="unknown-top-level"),
    pytest.param({"loss": {"betakl": 0.1}}, "loss.betakl", "unknown field", id="unknown-nested"),
    pytest.param(
        {"data": {"synthetic": {"days": 10}}}, "data.synthetic.days", "unknown field", id="unknown-deep"
    ),
    pytest.param({"model": {"latent_dim": "8"}}, "model.latent_dim", "expected an integer", id="str-for-int"),
    pytest.param({"train": {"epochs": 3.0}}, "train.epochs", "expected an integer", id="float-for-int"),
    pytest.param({"loss": {"beta_kl": True}}, "loss.beta_kl", "expected a number", id="bool-for-float"),
    pytest.param({"loss": [0.1, 0.2]}, "loss", "expected a mapping", id="list-for-mapping"),
    pytest.param({"loss": {"beta_kl": -0.1}}, "loss.beta_kl", "expected a value >= 0", id="negative-beta_kl"),
    pytest.param(
        {"model": {"latent_dim": 0}}, "model.latent_dim", "expected a value >= 1", id="latent_dim-0"
    ),
    pytest.param({"train": {"lr": 0}}, "train.lr", "expected a value > 0", id="lr-0-open-bound"),
    pytest.param(
        {"loss": {"kl_mode": "free_bits"}}, "loss.kl_mode", "expected one of 'plain'", id="invalid-kl_mode"
    ),
    pytest.param(
        {"data": {"mass_var": "tas"}},
        "data.mass_var",
        "one of data.predictor_vars",
        id="mass_var-not-predictor",
    ),
    pytest.param(
        {"data": {"mass_var": None}, "loss": {"lambda_mass": 0.1}},
        "data.mass_var",
        "when loss.lambda_mass > 0",
        id="lambda_mass-without-mass_var",
    ),
    pytest.param(
        {"data": {"split": {"train": ["2000-01-01", "2000-12-31"], "val": ["2001-01-01", "2001-12-31"]}}},
        "data.split.test",
        "[start, end] dates for every split",
        id="periods-for-some-splits",
    ),
    pytest.param(
        {"data": {"split": {"fractions": [0.6, 0.3, 0.2]}}},
        "data.split.fractions",
        "summing to 1",
        id="fractions-not-summing-to-1",
    ),
    pytest.param(
        {"loss": {"w_min": 2.0, "w_max": 1.0}}, "loss.w_min", "<= loss.w_max (1.0)", id="w_min-above-w_max"
    ),
    pytest.param(
        {"data": {"synthetic": {"height": 30, "width": 32}, "upscale_factor": 4}},
        "data.upscale_factor",
        "a divisor of the synthetic grid 30x32",
        id="upscale-not-dividing-grid",
    ),
    pytest.param({"data": {"source": "file"}}, "data.path", "a NetCDF or Zarr path", id="file-without-path"),
]


@pytest.mark.parametrize(("raw", "field", "expected"), BAD_VALUES)
def test_bad_values_name_file_field_and_expectation(
    tmp_path: Path, raw: dict[str, Any], field: str, expected: str
) -> None:
    message = _error(_write(tmp_path, raw))
    assert f": {field}: " in message, message
    assert expected in message, message


def test_unknown_field_lists_the_known_ones(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, {"loss": {"betakl": 0.1}}))
    assert all(name in message for name in (f.name for f in dataclasses.fields(LossConfig)))


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "absent.yaml")
    assert "no such file" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "loss: {beta_kl: 0.1\nmodel: [\n"))
    assert "not valid YAML at line 2" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"], ids=["list", "string", "number"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    message = _error(_write(tmp_path, text))
    assert "expected a mapping at the top level" in message


def test_empty_file_is_the_default_config(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


def test_with_overrides_applies_dotted_paths_and_validates() -> None:
    base = Config()
    cfg = with_overrides(
        base,
        {
            "loss.beta_kl": 0.2,
            "data.synthetic.n_days": 96,
            "data.split.fractions": [0.5, 0.25, 0.25],
            "normalization.target_std": 2.0,
        },
    )
    assert cfg.loss.beta_kl == 0.2
    assert cfg.data.synthetic.n_days == 96
    assert cfg.data.split.fractions == [0.5, 0.25, 0.25]
    assert cfg.normalization == Normalization(target_std=2.0)
    assert base == Config(), "the original is left as it was"
    assert with_overrides(base, {}) == base

    with pytest.raises(ConfigError, match=r"^--set: loss.beta_kl: expected a value >= 0"):
        with_overrides(base, {"loss.beta_kl": -1.0}, "--set")


@pytest.mark.parametrize("dotted", ["loss.nope", "nope.beta_kl", "loss.beta_kl.deeper", "data.synthetic.x.y"])
def test_with_overrides_rejects_unknown_paths(dotted: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), {dotted: 1}, "--set")
    message = str(info.value)
    assert message.startswith("--set: ") and dotted in message and "unknown field" in message


def test_get_field() -> None:
    cfg = with_overrides(
        Config(), {"loss.beta_kl": 0.3, "data.synthetic.height": 16, "data.upscale_factor": 4}
    )
    assert get_field(cfg, "loss.beta_kl") == 0.3
    assert get_field(cfg, "data.synthetic.height") == 16
    assert get_field(cfg, "model") == cfg.model
    assert get_field(cfg, "normalization") is None
    for bad in ("loss.nope", "nope", "loss.beta_kl.real", ""):
        with pytest.raises(KeyError):
            get_field(cfg, bad)
