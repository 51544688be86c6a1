"""What the deployment tests share: a tiny study laid out like the repository, and waiting for
a server to answer."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {
    "data": {
        "source": "synthetic",
        "synthetic": {"n_days": 96, "height": 16, "width": 16},
        "upscale_factor": 4,
    },
    "model": {"latent_dim": 8, "channels": 8, "n_res_blocks": 1},
    "train": {"epochs": 2, "batch_size": 16},
    "eval": {"n_samples": 4, "max_days": 16, "plot_days": 1},
}


def require(available: bool, what: str) -> None:
    """Skip the test when ``what`` is missing; under ``CI=true`` fail instead."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not available")
    pytest.skip(f"{what} is not available")


def write_tiny_study(root: Path, name: str, n_trials: int) -> Path:
    """``root/studies/<name>.yaml`` over ``root/configs/<name>.yaml``, as the repository lays them out.

    The search space is the learning rate, which moves the objectives even in two epochs.
    """
    (root / "studies").mkdir(parents=True, exist_ok=True)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    study = {
        "name": name,
        "base": f"../configs/{name}.yaml",
        "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
        "n_trials": n_trials,
        "collapse": None,
    }
    path = root / "studies" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> bytes:
    """The body of ``url`` once it answers 200; fails if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"server exited with {process.returncode} before answering {url}:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(0.5)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
