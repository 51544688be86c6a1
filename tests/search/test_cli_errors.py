"""Bad input on the command line: one line naming the input and what was expected, a non-zero
exit, never a traceback; and a read-only command never creates a storage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from search.cli import EXIT_USAGE, main
from search.storage import open_storage
from tests.conftest import CliProcesses, tiny_config_dict

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")


class _Pickled:
    """A Python object, which ``torch.load(weights_only=True)`` refuses to unpickle."""


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    assert len(err) == 1, err
    assert err[0].startswith(f"cvae-search {argv[0]}: error: ")
    return err[0]


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "cvae-search-checkpoint/1", "model": _Pickled()}, pickled)
    folder = tmp_path / "run.pt"
    folder.mkdir()
    return {"text": text, "pickled": pickled, "folder": folder}


def test_a_text_file_named_pt_is_not_a_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["sample", str(checkpoints["text"]), "-o", str(tmp_path / "out.nc")])
    assert f"{checkpoints['text']}: not a cvae-search checkpoint" in line
    assert "expected a checkpoint.pt written by `cvae-search train`" in line


def test_a_checkpoint_refused_by_weights_only_is_refused_without_advice_to_load_it_unsafely(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["sample", str(checkpoints["pickled"]), "-o", str(tmp_path / "out.nc")])
    assert f"{checkpoints['pickled']}: refused: it holds Python objects" in line
    assert "_Pickled" in line and "could run code" in line
    assert "weights_only" not in line


def test_a_folder_is_not_a_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["sample", str(checkpoints["folder"]), "-o", str(tmp_path / "out.nc")])
    assert f"{checkpoints['folder']}: is a folder; expected a checkpoint.pt" in line


def test_sample_refuses_a_folder_as_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["sample", str(tmp_path / "checkpoint.pt"), "-o", str(tmp_path)])
    assert f"{tmp_path}: is a folder; expected the NetCDF file to write" in line


@pytest.mark.parametrize("value", ["0", "-0.5", "nan"])
def test_sample_refuses_a_temperature_at_or_below_zero(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(
        capsys,
        ["sample", str(tmp_path / "checkpoint.pt"), "-o", str(tmp_path / "a.nc"), "--temperature", value],
    )
    assert "temperature: expected a number > 0, got" in line


@no_gpu
def test_sample_on_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(
        capsys, ["sample", str(tmp_path / "checkpoint.pt"), "-o", str(tmp_path / "a.nc"), "--device", "cuda"]
    )
    assert "device: expected auto or cpu on this machine, got 'cuda': torch sees no CUDA device" in line


@no_gpu
def test_train_on_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(epochs=1)))
    line = _error(capsys, ["train", str(config), "-o", str(tmp_path / "run"), "--set", "train.device=cuda"])
    assert f"{config}: train.device: expected auto or cpu on this machine, got 'cuda'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://127.0.0.1/studies", "storage mongodb://127.0.0.1/studies: unknown scheme 'mongodb'"),
        ("studies.db", "storage: expected a URL such as sqlite:///FILE"),
        ("mysql://me:secret@127.0.0.1/db", "storage mysql://me:***@127.0.0.1/db: the database driver"),
    ],
    ids=["unknown_scheme", "not_a_url", "driver_missing"],
)
@pytest.mark.parametrize("command", ["status", "create"])
def test_a_storage_url_that_cannot_work_is_one_line(
    command: str,
    url: str,
    expected: str,
    tiny_study: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = str(tiny_study("url-check")) if command == "create" else "some-study"
    line = _error(capsys, [command, target, "--storage", url])
    assert expected in line
    assert "secret" not in line


READ_ONLY = {
    "status": [],
    "downstream": ["--front"],
    "export": ["-o", "best.yaml"],
    "report": ["-o", "report"],
    "worker": [],
}


@pytest.mark.parametrize("command", list(READ_ONLY))
def test_a_read_only_command_creates_no_storage_at_a_mistyped_path(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    line = _error(
        capsys, [command, "my-study", "--storage", "sqlite:///studeis/study.db", *READ_ONLY[command]]
    )
    assert f"no such SQLite file {tmp_path / 'studeis' / 'study.db'}" in line
    assert "cvae-search create" in line
    assert list(tmp_path.iterdir()) == []


def test_as_separate_processes_the_errors_are_one_line_without_a_traceback(
    cli: CliProcesses, checkpoints: dict[str, Path]
) -> None:
    for argv in (
        ["sample", str(checkpoints["text"]), "-o", "out.nc"],
        ["worker", "my-study", "--storage", "sqlite:///typo/study.db"],
    ):
        done = cli.run(*argv)
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"cvae-search {argv[0]}: error: "), done.stderr
    assert not (cli.logs / "typo").exists() and not (cli.logs / "out.nc").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.pt"], "missing.pt: no such file; expected a checkpoint .pt, a config YAML or a study"),
        (["cfg.yaml", "--front"], "--front: only for a study; cfg.yaml is a file"),
        (["some-study", "--storage", "sqlite:///study.db"], "some-study: a study takes --front or --trial N"),
    ],
    ids=["missing_file", "front_on_a_file", "study_without_a_choice"],
)
def test_downstream_bad_targets_are_one_line(
    args: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config_dict(1)))
    assert expected in _error(capsys, ["downstream", *args])
    assert not (tmp_path / "study.db").exists()


def test_downstream_of_an_unknown_study_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_storage(url)  # an empty storage
    line = _error(capsys, ["downstream", "no-such-study", "--front", "--storage", url])
    assert "no study named 'no-such-study'" in line
