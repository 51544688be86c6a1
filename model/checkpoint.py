"""Self-describing checkpoints: weights, the model's arguments, the full config, the fine grid
and versions.

Everything but the weights is plain data, so a checkpoint loads with
``torch.load(weights_only=True)`` and needs nothing from outside to rebuild the model or to
write its fields on the fine grid. Checkpoints written before the fine grid was recorded still
load; they have no grid.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import Config, config_from_dict, config_to_dict
from model.cvae import CVAE
from model.data import FineGrid
from model.transform import Normalizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "versions",
]

CHECKPOINT_FORMAT = "cvae-search-checkpoint/1"
_EXPECTED = "expected a checkpoint.pt written by `cvae-search train`"


class CheckpointError(ValueError):
    """A file that is not a cvae-search checkpoint, or one that cannot be loaded safely."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode, its config and where it came from."""

    model: CVAE
    config: Config
    normalizer: Normalizer
    grid: FineGrid | None
    """The fine grid it was trained on; ``None`` for checkpoints written before it was recorded."""
    path: Path
    """Absolute path of the file."""
    sha256: str
    """Digest of the file's bytes."""


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


def save_checkpoint(
    path: Path,
    model: CVAE,
    cfg: Config,
    extra: dict[str, Any] | None = None,
    *,
    grid: FineGrid | None = None,
) -> Path:
    """Write ``model`` with ``cfg`` (whose ``normalization`` must be set) and its fine ``grid``."""
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
    if grid is not None:
        payload["grid"] = grid.to_plain()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` and rebuild its model.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is a folder, is not a cvae-search checkpoint, or holds
            Python objects other than tensors and plain data (which could run code on load).
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such checkpoint") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{path}: is a folder; {_EXPECTED}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror}); {_EXPECTED}") from e
    try:
        payload = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except Exception as e:  # what torch.load raises for a file that is no torch file at all varies
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            # Not chained: torch's message advises loading the file unsafely.
            raise CheckpointError(
                f"{path}: refused: it holds Python objects{what} besides tensors and plain data, which "
                f"could run code when loaded; {_EXPECTED}, which holds none"
            ) from None
        detail = type(e).__name__ + (f": {_first_line(e)}" if str(e).strip() else "")
        raise CheckpointError(
            f"{path}: not a cvae-search checkpoint (torch.load: {detail}); {_EXPECTED}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a cvae-search checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = config_from_dict(payload["config"], str(path))
    assert cfg.normalization is not None  # save_checkpoint refuses to write one without it
    model = CVAE.from_args(payload["model_args"]).to(device)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: the weights do not fit the model its arguments describe ({_first_line(e)})"
        ) from e
    model.eval()
    grid = FineGrid.from_plain(payload["grid"]) if "grid" in payload else None
    return Checkpoint(
        model=model,
        config=cfg,
        normalizer=Normalizer(cfg.normalization, cfg.data.transform),
        grid=grid,
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CVAE, Config, Normalizer]:
    """Rebuild the model, its config and its normaliser from a checkpoint file (:func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path, device)
    return ckpt.model, ckpt.config, ckpt.normalizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
