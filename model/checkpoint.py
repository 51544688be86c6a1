"""Self-describing checkpoints: weights, the model's arguments, the full config and versions.

Everything but the weights is plain data, so a checkpoint loads with
``torch.load(weights_only=True)`` and needs nothing from outside to rebuild the model.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from model.config import Config, config_from_dict, config_to_dict
from model.cvae import CVAE
from model.transform import Normalizer

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint", "versions"]

CHECKPOINT_FORMAT = "cvae-search-checkpoint/1"


def versions() -> dict[str, str]:
    """Versions of what produced a result, for provenance."""
    import numpy
    import xarray

    from model import __version__

    # Plain str: torch.__version__ is a str subclass that ``torch.load(weights_only=True)`` refuses.
    return {
        "cvae_search": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "xarray": xarray.__version__,
    }


def save_checkpoint(path: Path, model: CVAE, cfg: Config, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with ``cfg`` (whose ``normalization`` must be set) to ``path``."""
    if cfg.normalization is None:
        raise ValueError("save_checkpoint: cfg.normalization must hold the fitted statistics")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": model.model_args(),
        "config": config_to_dict(cfg),
        "versions": versions(),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CVAE, Config, Normalizer]:
    """Rebuild the model, its config and its normaliser from a checkpoint file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such checkpoint") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a cvae-search checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = config_from_dict(payload["config"], str(path))
    assert cfg.normalization is not None  # save_checkpoint refuses to write one without it
    model = CVAE.from_args(payload["model_args"]).to(device)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, cfg, Normalizer(cfg.normalization, cfg.data.transform)
