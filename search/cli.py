"""The ``cvae-search`` command line: train, sample, create, worker, status, export, downstream,
report, demo, dashboard and proxy. The only layer that prints; everything else logs."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.trainer import EpochReport

__all__ = ["main"]

_log = logging.getLogger("cvae-search")

EXIT_USAGE = 2


def _artifact_dir(value: str | None) -> str:
    return value or os.environ.get("CVAE_SEARCH_ARTIFACTS", "cvae-search-artifacts")


def _progress(report: EpochReport) -> str | None:
    """One line per epoch: the progress display of ``train``."""
    terms = "  ".join(f"{k} {v:.4g}" for k, v in report.losses.items())
    print(
        f"epoch {report.epoch:>3}/{report.epochs}  {terms}  {report.samples_per_s:,.0f} samples/s  "
        f"{report.elapsed_s:,.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from model.config import load_config, with_overrides
    from model.trainer import resolve_device, train
    from search.reproduce import compare_run, read_provenance, threads_note

    cfg = load_config(args.config)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if overrides:
        cfg = with_overrides(cfg, overrides, "--set")
    resolve_device(cfg.train.device, f"{args.config}: train.device")  # before any data is read
    provenance = read_provenance(args.config)
    note = provenance and threads_note(provenance, cfg)
    if note:
        print(note, file=sys.stderr)

    result = train(cfg, out_dir=args.output, callbacks=[_progress])
    width = max(len(k) for k in result.metrics)
    for name, value in result.metrics.items():
        print(f"{name:<{width}}  {value:.6g}")
    print(
        f"\n{result.epochs_run} epochs on {result.device} ({result.precision}), "
        f"{result.timings['samples_per_s']:,.0f} samples/s; outputs in {args.output}"
    )
    for line in compare_run(provenance, result, list(overrides)) if provenance else ():
        print(line)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from model.sampling import write_samples

    out = write_samples(
        args.checkpoint,
        args.output,
        n_samples=args.samples,
        split=args.split,
        temperature=args.temperature,
        data_path=args.data,
        seed=args.seed,
        device=args.device,
    )
    print(f"wrote {out}")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from search.definition import load_definition
    from search.storage import check_storage_url, open_storage, redact, resolve_storage_url
    from search.study import check_study_data, create_study

    # The definition, the storage URL and the data are checked before the storage is touched.
    definition = load_definition(args.study)
    url = resolve_storage_url(args.storage)
    check_storage_url(url)
    for line in check_study_data(definition):
        print(f"data of {line}")
    study = create_study(definition, open_storage(url))
    print(
        f"study {study.study_name} ready in {redact(url)}: budget {definition.n_trials} trials, "
        f"{len(definition.baselines)} baselines, digest {definition.digest()}"
    )
    for name in definition.baselines:
        print(f"  {definition.describe_baseline(name)}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from search.definition import load_definition
    from search.storage import check_storage_url, open_storage, resolve_storage_url
    from search.study import load_study
    from search.worker import (
        measured_peaks,
        parse_fuse,
        parse_per_gpu,
        plan_processes,
        run_worker,
        run_workers,
    )

    per_gpu = parse_per_gpu(args.per_gpu)
    fuse = parse_fuse(args.fuse)
    # A worker only reads a study: a mistyped SQLite path must not become an empty database.
    check_storage_url(resolve_storage_url(args.storage), must_exist=True)
    local = load_definition(args.study_file) if args.study_file else None

    def work_here() -> int:
        summary = run_worker(
            args.study,
            storage_url=args.storage,
            artifact_dir=_artifact_dir(args.artifact_dir),
            n_trials=args.n_trials,
            worker_index=args.worker_index,
            local=local,
            fuse=fuse,
        )
        return 0 if summary.stopped_by != "max_failures" else 1

    if args.child:
        return work_here()
    # Opened once, and only to check --study-file or to read the peaks --per-gpu auto packs by.
    study = functools.cache(
        lambda: load_study(args.study, open_storage(args.storage, create=False), local=local)[0]
    )
    plans = plan_processes(args.gpus, per_gpu, args.processes, peaks=lambda: measured_peaks(study()))
    if local is not None:  # refuse before starting any process
        study()
    devices = {p.env.get("CUDA_VISIBLE_DEVICES") or "cpu" for p in plans}
    if len(plans) == 1 and devices == {"cpu"}:  # one CPU worker: this process is it
        os.environ.update(plans[0].env)
        return work_here()
    child_args = [args.study, "--artifact-dir", _artifact_dir(args.artifact_dir)]
    if args.n_trials is not None:
        child_args += ["--n-trials", str(args.n_trials)]
    child_args += ["--fuse", str(fuse)]
    if args.study_file:
        child_args += ["--study-file", args.study_file]
    # The URL may hold a password: the processes get it in their environment, not in their
    # command lines, which any user can read with ps.
    env = {"OPTUNA_STORAGE": resolve_storage_url(args.storage)}
    print(f"starting {len(plans)} worker process(es) on {', '.join(sorted(devices))}", file=sys.stderr)
    return run_workers(plans, child_args, index_offset=args.worker_index, env=env)


def _open(args: argparse.Namespace, name: str | None = None) -> tuple[Any, Any, Any, str]:
    """The study named on the command line (or ``name``): (study, definition, storage, url)."""
    from search.storage import open_storage, resolve_storage_url
    from search.study import load_study

    url = resolve_storage_url(args.storage)
    storage = open_storage(url, create=False)
    study, definition = load_study(name or args.study, storage)
    return study, definition, storage, url


def _cmd_status(args: argparse.Namespace) -> int:
    from search.status import format_status, study_status

    study, definition, storage, _ = _open(args)
    print(format_status(study_status(study, definition, storage)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from search.export import export_trial, pick_trial, verify_trial

    study, definition, _, url = _open(args)
    if args.trial is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == args.trial]
        if not matches:
            raise ValueError(f"--trial: study {study.study_name} has no trial {args.trial}")
        trial, rule = matches[0], f"trial {args.trial}"
    else:
        trial, rule = pick_trial(study, definition, args.pick), args.pick
    verify = None
    if args.verify:
        seed = definition.config_for(trial.params, trial.user_attrs.get("baseline")).train.seed
        verify = verify_trial(definition, trial, [seed + 1 + i for i in range(args.verify)])
    out = export_trial(study, definition, trial, Path(args.output), storage_url=url, rule=rule, verify=verify)
    print(f"exported trial {trial.number} ({rule}) to {out}; train it with: cvae-search train {out} -o run/")
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_downstream(args: argparse.Namespace) -> int:
    target, out = Path(args.target), Path(args.output)
    study_only = {"--front": args.front, "--trial": args.trial is not None, "--top": args.top is not None}
    if target.suffix in (".pt", ".yaml", ".yml") or target.is_file():
        if not target.is_file():
            raise FileNotFoundError(
                f"{target}: no such file; expected a checkpoint .pt, a config YAML or a study name"
            )
        given = [flag for flag, on in study_only.items() if on]
        if given:
            raise ValueError(f"{', '.join(given)}: only for a study; {target} is a file")
        result = _downstream_file(target, out)
        print(result.table())
        print(f"\noutputs in {out}")
        return 0
    if args.front == (args.trial is not None):
        raise ValueError(f"{args.target}: a study takes --front or --trial N (one of them)")
    return _downstream_study(args, out)


def _downstream_file(target: Path, out: Path) -> Any:
    from model.downstream import downstream_for_checkpoint, downstream_for_config

    if target.suffix == ".pt":
        return downstream_for_checkpoint(target, out_dir=out, source=str(target), progress=_stderr)
    from model.config import load_config

    return downstream_for_config(load_config(target), out_dir=out, source=str(target), progress=_stderr)


def _downstream_study(args: argparse.Namespace, out: Path) -> int:
    from search.downstream_stage import format_ranking, run_stage, stage_trials

    study, definition, _, _ = _open(args, args.target)
    trials = stage_trials(study, definition, top=args.top, trial=args.trial, baselines=not args.no_baselines)
    report = run_stage(
        study,
        definition,
        trials,
        artifact_dir=_artifact_dir(args.artifact_dir),
        out_dir=out,
        progress=_stderr,
    )
    for t in report.trials:
        record = report.records.get(t.number)
        baseline = t.user_attrs.get("baseline")
        label = f"trial {t.number}" + (f" ({baseline})" if baseline else "")
        if record is None:
            print(f"{label}: no result (its evaluation failed in another process)\n")
            continue
        how = (
            f"already evaluated at {record.get('at')}; skipped"
            if t.number in report.skipped
            else "evaluated now"
            if t.number in report.evaluated
            else "evaluated by another process"
        )
        print(f"{label}: {how}; {record.get('file')}\n{record.get('table', '')}\n")
    if args.front:
        print(format_ranking(report, args.rank_by))
    return 0 if not report.missing else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from search.report import write_report

    study, definition, _, _ = _open(args)
    files = write_report(study, definition, Path(args.output))
    for name, path in files.items():
        print(f"{name:<14} {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from search.demo import DEMO_STUDY, run_demo

    study_file = Path(args.study_file) if args.study_file else DEMO_STUDY
    return run_demo(Path(args.output), workers=args.workers, study_file=study_file)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from search.dashboard import DashboardUnavailable, serve
    from search.storage import check_storage_url, redact, resolve_storage_url

    url = resolve_storage_url(args.storage)  # stays in this process: never on a command line
    check_storage_url(url, must_exist=True)

    def ready(address: str) -> None:
        print(f"optuna-dashboard on {address} for {redact(url)}", file=sys.stderr, flush=True)

    try:
        serve(
            url,
            host=args.host,
            port=args.port,
            artifact_dir=_artifact_dir(args.artifact_dir),
            refresh_s=args.refresh,
            ready=ready,
        )
    except DashboardUnavailable as e:
        print(f"cvae-search dashboard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from search.proxy import serve_proxy

    serve_proxy(args.storage, host=args.host, port=args.port)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvae-search", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    def storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--storage", help="storage URL (default: $OPTUNA_STORAGE, else sqlite:///cvae-search.db)"
        )

    sp = command("train", _cmd_train, "train one config (e.g. an exported trial)")
    sp.add_argument("config", help="training config YAML")
    sp.add_argument("-o", "--output", default="run", help="output folder (default: run)")
    sp.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.epochs=5"
    )

    sp = command("sample", _cmd_sample, "write K generated fields per coarse input as NetCDF")
    sp.add_argument("checkpoint")
    sp.add_argument("-o", "--output", required=True, help="NetCDF file to write")
    sp.add_argument("-k", "--samples", type=int, default=8, help="samples per coarse input (default 8)")
    sp.add_argument("--split", choices=["train", "val", "test", "all"], default="all")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--data", help="read coarse inputs from this file instead of the configured one")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    sp = command("create", _cmd_create, "create (or reuse) a study from its definition and enqueue baselines")
    sp.add_argument("study", help="study definition YAML (studies/*.yaml)")
    storage(sp)

    sp = command("worker", _cmd_worker, "pull and run trials until the study's budget is finished")
    sp.add_argument("study", help="study name")
    storage(sp)
    sp.add_argument("--n-trials", type=int, help="stop each process after this many trials")
    sp.add_argument("--gpus", default="auto", help="auto (default), all, none, or a list like 0,1")
    sp.add_argument(
        "--per-gpu",
        default=os.environ.get("CVAE_SEARCH_PER_GPU", "1"),
        metavar="K",
        help="worker processes per GPU, or auto: more than 1 only under CUDA MPS, as many as the "
        "study's measured peak memory allows, up to 4 (default 1, or $CVAE_SEARCH_PER_GPU)",
    )
    sp.add_argument("--processes", type=int, default=1, help="worker processes when on the CPU (default 1)")
    sp.add_argument(
        "--fuse",
        default=os.environ.get("CVAE_SEARCH_FUSE", "1"),
        metavar="K",
        help="ask up to K trials at a time and train those of one architecture as one stacked "
        "model, each still its own trial (default 1, or $CVAE_SEARCH_FUSE)",
    )
    sp.add_argument("--study-file", help="refuse to run if this definition differs from the stored one")
    sp.add_argument(
        "--artifact-dir", help="artifact folder (default: $CVAE_SEARCH_ARTIFACTS or ./cvae-search-artifacts)"
    )
    sp.add_argument("--worker-index", type=int, default=0, help="label of this process in the logs")
    sp.add_argument("--child", action="store_true", help=argparse.SUPPRESS)

    for name, fn, text in (
        ("status", _cmd_status, "counts by state, the front so far, workers' heartbeats"),
    ):
        sp = command(name, fn, text)
        sp.add_argument("study")
        storage(sp)

    sp = command("export", _cmd_export, "export a trial as a training config with its provenance")
    sp.add_argument("study")
    storage(sp)
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--trial", type=int, help="export this trial number")
    group.add_argument(
        "--pick",
        default="knee",
        help="rule over the feasible Pareto front: knee (default), max:METRIC, min:METRIC, "
        "max:METRIC@OTHER<=BOUND",
    )
    sp.add_argument("-o", "--output", required=True, help="YAML file to write")
    sp.add_argument("--verify", type=int, default=0, metavar="N", help="retrain with N other seeds first")

    sp = command(
        "downstream",
        _cmd_downstream,
        "SRDRN trained without and with a cVAE's generated data, scored on the test split",
    )
    sp.add_argument(
        "target",
        metavar="TARGET",
        help="a cVAE checkpoint .pt, a config YAML (an export; its cVAE is trained first), or a study name",
    )
    storage(sp)
    group = sp.add_mutually_exclusive_group()
    group.add_argument(
        "--front", action="store_true", help="a study: every feasible Pareto trial, then the baselines"
    )
    group.add_argument("--trial", type=int, help="a study: this trial only")
    sp.add_argument(
        "--top",
        type=int,
        metavar="N",
        help="with --front: only the N front trials nearest the ideal point (the knee's order)",
    )
    sp.add_argument("--no-baselines", action="store_true", help="with --front: leave out the baselines")
    sp.add_argument(
        "--rank-by",
        default="verdicts",
        metavar="RANK",
        help="with --front, rank the results by verdicts (default: the count of 'better' verdicts "
        "minus 'worse' ones, ties by trial number) or by a gain, downstream_<key>_gain",
    )
    sp.add_argument("-o", "--output", default="downstream", help="output folder (default: downstream)")
    sp.add_argument(
        "--artifact-dir",
        help="where the study's checkpoints are (default: $CVAE_SEARCH_ARTIFACTS or ./cvae-search-artifacts)",
    )

    sp = command("report", _cmd_report, "Pareto front, hypervolume history, importances and a CSV of trials")
    sp.add_argument("study")
    storage(sp)
    sp.add_argument("-o", "--output", required=True, help="report folder")

    sp = command("demo", _cmd_demo, "a small study end to end on the synthetic set and an embedded storage")
    sp.add_argument(
        "-o", "--output", default="cvae-search-demo", help="demo folder (default: cvae-search-demo)"
    )
    sp.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    sp.add_argument(
        "--study-file",
        help="the study to run the loop on (default: studies/tiny.yaml); its storage is the demo folder's",
    )

    sp = command("dashboard", _cmd_dashboard, "optuna-dashboard on the study storage, with its artifacts")
    storage(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument(
        "--artifact-dir", help="artifact folder (default: $CVAE_SEARCH_ARTIFACTS or ./cvae-search-artifacts)"
    )
    sp.add_argument(
        "--refresh",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between updates of the cvae-search plots and notes (default 60; 0: at start only)",
    )

    sp = command(
        "proxy", _cmd_proxy, "Optuna's gRPC storage proxy in front of the database, for many workers"
    )
    storage(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=13000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from model.config import ConfigError
    from model.data import DataError
    from search.export import NoFeasibleTrial
    from search.study import DefinitionMismatch, StudyNotFound

    expected = (
        ConfigError,
        DataError,
        DefinitionMismatch,
        StudyNotFound,
        NoFeasibleTrial,
        ConnectionError,
        OSError,
        ValueError,
    )
    try:
        return args.fn(args)
    except expected as e:
        _log.debug("the error's traceback", exc_info=True)
        print(f"cvae-search {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(e: BaseException) -> str:
    """The error's message on one line (an OSError's names its file)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
