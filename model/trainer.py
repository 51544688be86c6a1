"""Training: one config in, a trained cVAE with its metrics, checkpoint and sample figure out.

One device and precision path (bf16 autocast on CUDA, fp32 on the CPU). The training data
sit on the device whole and batches are gathered by index there; the step never syncs with
the host: loss terms accumulate on the device and come back once per epoch, where a NaN or
infinite loss stops training with :class:`TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint, versions
from model.config import Config, save_config
from model.cvae import CVAE, ForwardOutput
from model.data import Dataset, load_data
from model.evaluate import autocast, evaluate, evaluate_validation, probe_collapse
from model.losses import compute_losses, kl_warmup_factor
from model.metrics import EvalData
from model.plots import plot_samples

__all__ = [
    "DeviceUnavailable",
    "EpochCallback",
    "EpochReport",
    "StepLoss",
    "TrainResult",
    "TrainingDiverged",
    "build_model",
    "cpu_threads",
    "loss_vector",
    "resolve_device",
    "train",
    "use_bf16",
]

_log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "recon", "kl", "kl_raw", "grad", "mass")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class EpochReport:
    """What a per-epoch callback sees."""

    epoch: int
    """1-based."""
    epochs: int
    losses: dict[str, float]
    """Epoch means of each loss term."""
    samples_per_s: float
    elapsed_s: float
    probe: Callable[[], dict[str, float]]
    """Cheap collapse signals (``spread_norm``, ``z_usage``) on a few validation days, on demand."""
    evaluate: Callable[[Sequence[str] | None, int | None], dict[str, float]] | None = None
    """The named metrics (all when ``None``) on the first N validation days (the eval config's
    ``max_days`` when ``None``), on demand: :func:`model.evaluate.evaluate_validation`."""


EpochCallback = Callable[[EpochReport], str | None]
"""Called after every epoch; a returned string stops training early and is recorded as the reason."""


@dataclass
class TrainResult:
    config: Config
    """The config as trained, with the fitted ``normalization`` filled in."""
    metrics: dict[str, float]
    diagnostics: dict[str, list[float]]
    history: list[dict[str, float]]
    epochs_run: int
    stopped: str | None
    """Why training stopped before ``train.epochs``, if it did."""
    timings: dict[str, float]
    device: str
    precision: str
    threads: int
    """CPU threads it ran with: float sums on the CPU, and so the values, depend on them."""
    cpu_capability: str
    """The CPU kernels torch chose (``AVX2``, ``AVX512``, ...), which round differently."""
    versions: dict[str, str]
    peak_gpu_memory_bytes: int | None = None
    """Most GPU memory the caching allocator held during training and evaluation; ``None``
    off CUDA. What a process sharing the GPU must be allowed (``worker --per-gpu auto``)."""
    checkpoint: Path | None = None
    figure: Path | None = None
    metrics_file: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)


class DeviceUnavailable(ValueError):
    """The device asked for is not there (``cuda`` without a usable GPU)."""


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error.

    Args:
        name: ``auto``, ``cpu`` or ``cuda``.
        field: What set ``name``, for the error.

    Raises:
        DeviceUnavailable: ``cuda`` was asked for and torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"{field}: expected auto or cpu on this machine, got 'cuda': torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        )
    return torch.device(name)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """``train.precision`` on ``device``: bf16 autocast or not."""
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    if cfg.train.precision == "bf16" and device.type == "cpu":
        _log.warning("train.precision: bf16 on the CPU is slow; it is honoured as asked")
    return cfg.train.precision == "bf16"


def build_model(cfg: Config, data: Dataset) -> CVAE:
    """The cVAE for ``cfg.model`` on ``data``'s grid."""
    return CVAE(
        cfg.model,
        height=data.height,
        width=data.width,
        factor=data.factor,
        n_predictors=data.n_predictors,
        n_static=data.n_static,
        dry_value=data.normalizer.zero,
        wet_value=data.normalizer.model_value(cfg.eval.wet_threshold),
    )


def _optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=device.type == "cuda",
    )


def train(
    cfg: Config,
    *,
    out_dir: str | Path | None = None,
    callbacks: Sequence[EpochCallback] = (),
    data: Dataset | None = None,
) -> TrainResult:
    """Train ``cfg`` and evaluate it on ``cfg.eval.split``.

    Args:
        cfg: The full config.
        out_dir: Where to write ``checkpoint.pt``, ``metrics.json``, ``samples.png`` and
            ``config.yaml``; nothing is written when ``None``.
        callbacks: Called after each epoch; the first that returns a string stops training.
        data: An already loaded dataset (saves reloading it across trials); it must have
            been loaded from ``cfg.data``.

    Raises:
        TrainingDiverged: A loss term became NaN or infinite.
    """
    with cpu_threads(cfg.train.threads):
        return _train(cfg, out_dir=out_dir, callbacks=callbacks, data=data)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """``train.threads`` for the duration of one training run; the process's setting otherwise."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    cfg: Config,
    *,
    out_dir: str | Path | None,
    callbacks: Sequence[EpochCallback],
    data: Dataset | None,
) -> TrainResult:
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    bf16 = use_bf16(cfg, device)
    _reset_peak_memory(device)
    if data is None:
        data = load_data(cfg.data, cfg.normalization)
    data = data.to(device)
    cfg = replace(cfg, normalization=data.stats)
    # Seeded after loading, so the weights do not depend on whether the data came cached.
    torch.manual_seed(cfg.train.seed)

    model = build_model(cfg, data).to(device)
    opt = _optimizer(model, cfg, device)
    step_loss = StepLoss(model, cfg, data)
    loss_fn = _compiled(step_loss, device) if cfg.train.compile else step_loss
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)

    train_split = data.train
    n = len(train_split)
    batch = min(cfg.train.batch_size, n)
    steps = n // batch  # drop the ragged tail: static shapes, and no tiny noisy last step
    latent = cfg.model.latent_dim
    history: list[dict[str, float]] = []
    stopped: str | None = None
    t_train = time.perf_counter()
    seen = 0
    epoch = 0
    for epoch in range(1, cfg.train.epochs + 1):
        t_epoch = time.perf_counter()
        beta = cfg.loss.beta_kl * kl_warmup_factor(epoch - 1, cfg.loss.kl_warmup_epochs)
        beta_t = torch.tensor(beta, device=device)  # a tensor: a compiled step is not rebuilt per value
        sums = torch.zeros(len(LOSS_TERMS), device=device)
        perm = torch.randperm(n, device=device, generator=gen)
        model.train()
        for step in range(steps):
            idx = perm[step * batch : (step + 1) * batch]
            eps = torch.randn(batch, latent, device=device, generator=gen)
            with autocast(device, bf16):
                terms = loss_fn(idx, eps, beta_t)
            opt.zero_grad(set_to_none=True)
            terms[0].backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sums += terms.detach()
        seen += steps * batch
        losses = dict(zip(LOSS_TERMS, (sums / steps).tolist(), strict=True))
        if not all(math.isfinite(v) for v in losses.values()):
            bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not math.isfinite(v))
            raise TrainingDiverged(f"loss is not finite at epoch {epoch}: {bad}")
        elapsed = time.perf_counter() - t_epoch
        rate = steps * batch / elapsed if elapsed > 0 else float("nan")
        history.append({"epoch": epoch, **losses, "beta": beta, "samples_per_s": rate})
        report = EpochReport(
            epoch=epoch,
            epochs=cfg.train.epochs,
            losses=losses,
            samples_per_s=rate,
            elapsed_s=time.perf_counter() - t_train,
            probe=lambda: probe_collapse(model, data, cfg.eval, bf16=bf16),
            evaluate=lambda names, days: evaluate_validation(
                model, data, cfg.eval, names, days=days, bf16=bf16
            ),
        )
        for callback in callbacks:
            stopped = callback(report)
            if stopped:
                break
        if stopped:
            _log.info("training stopped at epoch %d: %s", epoch, stopped)
            break
    train_s = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    ev = evaluate(model, data, cfg.eval, bf16=bf16)
    eval_s = time.perf_counter() - t_eval
    peak = _peak_memory(device)

    result = TrainResult(
        config=cfg,
        metrics=ev.metrics,
        diagnostics=ev.diagnostics,
        history=history,
        epochs_run=epoch,
        stopped=stopped,
        timings={
            "train_s": train_s,
            "eval_s": eval_s,
            "samples_per_s": seen / train_s if train_s > 0 else float("nan"),
        },
        device=str(device),
        precision="bf16" if bf16 else "fp32",
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        versions=versions(),
        peak_gpu_memory_bytes=peak,
    )
    if out_dir is not None:
        _write_outputs(Path(out_dir), model, cfg, result, ev.data, data)
    result.timings["total_s"] = time.perf_counter() - t_start
    return result


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        # Blocks cached from an earlier train() in this process would count as this one's peak.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    # Reserved, not allocated: the per-process memory fraction caps what the allocator reserves.
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


class StepLoss(torch.nn.Module):
    """One training batch's loss terms, gathered by index from the device-resident split.

    One module, so that ``torch.compile`` sees the gather, the model and every loss term
    together and can fuse the elementwise work between them.
    """

    def __init__(self, model: CVAE, cfg: Config, data: Dataset) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.data = data

    def forward(self, idx: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        split = self.data.train
        fine, mask, coarse = split.fine[idx], split.mask[idx], split.coarse[idx]
        cmass = None if split.coarse_mass is None else split.coarse_mass[idx]
        out = self.model(fine, coarse, self.data.static, eps=eps)
        return loss_vector(out, fine, mask, cmass, self.cfg, self.data, beta)


def loss_vector(
    out: ForwardOutput,
    fine: torch.Tensor,
    mask: torch.Tensor,
    cmass: torch.Tensor | None,
    cfg: Config,
    data: Dataset,
    beta: torch.Tensor,
) -> torch.Tensor:
    """``cfg``'s loss terms for one batch's forward pass, as a [len(LOSS_TERMS)] float32 vector."""
    terms = compute_losses(
        out,
        fine,
        mask,
        cmass,
        cfg=cfg.loss,
        normalizer=data.normalizer,
        factor=data.factor,
        beta=beta,
        wet_threshold=cfg.eval.wet_threshold,
    )
    return torch.stack([getattr(terms, t).float() for t in LOSS_TERMS])


def _compiled(fn: torch.nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """``torch.compile`` ``fn``, falling back to eager on the first failure.

    On CUDA the step is also captured as a CUDA graph (``reduce-overhead``): at these model
    sizes kernel launches, not arithmetic, bound a step (measured in benchmarks/RESULTS.md).
    """
    compiled = torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)
    state: dict[str, Callable[..., torch.Tensor]] = {"fn": compiled}

    def call(*args: object) -> torch.Tensor:
        try:
            return state["fn"](*args)
        except Exception as e:  # any compiler failure: the eager module computes the same function
            if state["fn"] is fn:
                raise
            _log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
            state["fn"] = fn
            return fn(*args)

    return call


def _write_outputs(
    out: Path, model: CVAE, cfg: Config, result: TrainResult, ev: EvalData, data: Dataset
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.train.save_checkpoint:
        result.checkpoint = save_checkpoint(
            out / "checkpoint.pt", model, cfg, {"metrics": result.metrics}, grid=data.grid
        )
    days = min(cfg.eval.plot_days, ev.obs.shape[0])
    if days > 0:
        k = min(cfg.eval.plot_samples, ev.samples.shape[1])
        split = getattr(data, cfg.eval.split)
        result.figure = plot_samples(
            ev.obs[:days].cpu(),
            ev.samples[:days, :k].cpu(),
            ev.mask[:days].cpu(),
            out / "samples.png",
            times=[str(t)[:10] for t in split.times[:days]],
        )
    result.metrics_file = out / "metrics.json"
    result.metrics_file.write_text(
        json.dumps(
            {
                "metrics": result.metrics,
                "diagnostics": result.diagnostics,
                "history": result.history,
                "epochs_run": result.epochs_run,
                "stopped": result.stopped,
                "timings": result.timings,
                "device": result.device,
                "precision": result.precision,
                "threads": result.threads,
                "cpu_capability": result.cpu_capability,
                "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes,
                "versions": result.versions,
            },
            indent=2,
        )
    )
