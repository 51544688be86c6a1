"""The trainer's record of its peak GPU memory, which ``worker --per-gpu auto`` packs GPUs by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import config_from_dict
from model.trainer import train
from tests.conftest import tiny_config_dict


def test_on_the_cpu_no_peak_is_recorded(cache: Path, tmp_path: Path) -> None:
    result = train(config_from_dict(tiny_config_dict(1), "tiny"), out_dir=tmp_path)
    assert result.peak_gpu_memory_bytes is None
    assert json.loads((tmp_path / "metrics.json").read_text())["peak_gpu_memory_bytes"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_peak_is_this_trainings_own(cache: Path) -> None:
    cfg = config_from_dict(tiny_config_dict(1, {"train.device": "cuda"}), "tiny")
    ballast = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB, freed before training
    del ballast
    result = train(cfg)
    assert result.peak_gpu_memory_bytes is not None
    # Data, model and evaluation take a few MiB; the freed GiB cached before must not count.
    assert 0 < result.peak_gpu_memory_bytes < 2**30
