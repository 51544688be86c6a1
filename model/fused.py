"""Fused training: K configs of one architecture trained as one stacked model in one process.

Each member keeps its own ``nn.Module`` and its own ``torch.optim.AdamW``; every step stacks the
members' parameters (``torch.stack``, differentiable, so each gradient lands on the member's own
leaves) and runs the cVAE once through ``torch.func.functional_call`` under ``torch.vmap`` over
the member dimension: one kernel launch does K members' convolutions. The loss terms are then
computed per member with :func:`model.trainer.loss_vector` and that member's own ``loss``
section, summed and back-propagated once; members share no parameter, so the sum's gradient
for each member is its own loss's gradient. Gradient clipping and the optimiser step are each
member's own, with its own ``lr``, ``weight_decay`` and ``grad_clip``: the same update
:func:`model.trainer.train` makes, not a re-implementation of AdamW.

Each member is seeded as :func:`model.trainer.train` seeds it: the weights from
``torch.manual_seed(seed)`` right before it is built, and a generator of its own (seeded with
``seed``) drawing its batch order at each epoch start and its ``eps`` at each step, in the same
order as training alone. So every member sees its own batches, exactly those it would see
alone, and a member's losses and metrics equal its solo run up to float rounding (the stacked
kernels sum in another order).

A member leaves the stack when it ends: after its own ``train.epochs``, when one of its
callbacks stops it (it is then evaluated like a solo run), or when its epoch losses are not
finite (its result is a :class:`model.trainer.TrainingDiverged`). The others go on with a
smaller stack. Timings are the group's: a member's ``train_s`` is the wall time from the start
of fused training to its end, its ``samples_per_s`` its own samples over that time (the group's
aggregate rate is the sum), and the GPU peak is the whole group's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from model.checkpoint import versions
from model.config import Config
from model.cvae import CVAE, DecoderOutput, ForwardOutput
from model.data import Dataset, load_data
from model.evaluate import autocast, evaluate, evaluate_validation, probe_collapse
from model.losses import kl_warmup_factor
from model.trainer import (
    LOSS_TERMS,
    EpochCallback,
    EpochReport,
    TrainingDiverged,
    TrainResult,
    _compiled,
    _optimizer,
    _peak_memory,
    _reset_peak_memory,
    _write_outputs,
    build_model,
    cpu_threads,
    loss_vector,
    resolve_device,
    use_bf16,
)

__all__ = ["FUSED_GROUP", "architecture_key", "train_fused"]

FUSED_GROUP = "fused_group"
"""Key in ``TrainResult.extra``: how many members were trained in the stack."""

_log = logging.getLogger(__name__)

_OUTPUTS = ("field", "mean", "wet_logit", "log_sigma", "mu", "logvar", "prior_mu", "prior_logvar", "z")


def architecture_key(cfg: Config) -> tuple[tuple[str, str], ...]:
    """What configs must share to be trained in one stack: ``(field, value)`` pairs.

    The model's shapes (every ``model`` field but ``noise_length``, which only the copula's
    sampling reads, never the training step), the data they are trained on (the whole ``data``
    section and a fitted ``normalization``: one dataset is loaded for the group), and how the step
    runs: ``train.batch_size`` (one batch size per stack), ``device``, ``precision``, ``compile``
    and ``threads``. The loss, learning rate, weight decay, clipping, seed, epochs and the whole
    ``eval`` section are each member's own.
    """
    model = dataclasses.asdict(cfg.model)
    del model["noise_length"]
    fields: dict[str, Any] = {
        "data": dataclasses.asdict(cfg.data),
        "normalization": None if cfg.normalization is None else dataclasses.asdict(cfg.normalization),
        **{f"model.{k}": v for k, v in model.items()},
        **{
            f"train.{k}": getattr(cfg.train, k)
            for k in ("batch_size", "device", "precision", "compile", "threads")
        },
    }
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in fields.items())


def _check_group(cfgs: Sequence[Config]) -> None:
    if not cfgs:
        raise ValueError("train_fused: expected at least one config, got none")
    first = dict(architecture_key(cfgs[0]))
    for i, cfg in enumerate(cfgs[1:], start=1):
        for name, value in architecture_key(cfg):
            if value != first[name]:
                raise ValueError(
                    f"train_fused: config {i}'s {name} is {value}, config 0's is {first[name]}; "
                    "fused configs must share architecture_key"
                )


class _FusedStep(torch.nn.Module):
    """The active members' loss vectors for one step, [len(active), len(LOSS_TERMS)].

    One module, so that ``torch.compile`` sees the stacking, the vmapped model and every
    member's loss terms together.
    """

    def __init__(self, members: Sequence[CVAE], cfgs: Sequence[Config], data: Dataset) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.cfgs = list(cfgs)
        self.data = data
        self.names = [name for name, _ in members[0].named_parameters()]
        self.params = [[p for _, p in m.named_parameters()] for m in members]
        with torch.device("meta"):  # the structure only: functional_call supplies every tensor
            self.base = build_model(cfgs[0], data)

    def forward(self, active: tuple[int, ...], idx: Tensor, eps: Tensor, beta: Tensor) -> Tensor:
        split = self.data.train
        fine, mask, coarse = split.fine[idx], split.mask[idx], split.coarse[idx]
        cmass = None if split.coarse_mass is None else split.coarse_mass[idx]
        stacked = {
            name: torch.stack([self.params[k][j] for k in active]) for j, name in enumerate(self.names)
        }
        flat = torch.vmap(self._one, in_dims=(0, 0, 0, 0))(stacked, fine, coarse, eps)
        rows = []
        for i, k in enumerate(active):
            out = _unflatten({name: t[i] for name, t in flat.items()})
            c = None if cmass is None else cmass[i]
            rows.append(loss_vector(out, fine[i], mask[i], c, self.cfgs[k], self.data, beta[i]))
        return torch.stack(rows)

    def _one(self, params: dict[str, Tensor], fine: Tensor, coarse: Tensor, eps: Tensor) -> dict[str, Tensor]:
        out = functional_call(self.base, params, (fine, coarse, self.data.static), {"eps": eps})
        return _flatten(out)


def _flatten(out: ForwardOutput) -> dict[str, Tensor]:
    values = {
        **{f: getattr(out.decoded, f) for f in _OUTPUTS[:4]},
        **{f: getattr(out, f) for f in _OUTPUTS[4:]},
    }
    return {k: v for k, v in values.items() if v is not None}


def _unflatten(flat: dict[str, Tensor]) -> ForwardOutput:
    decoded = DecoderOutput(
        field=flat["field"],
        mean=flat["mean"],
        wet_logit=flat.get("wet_logit"),
        log_sigma=flat.get("log_sigma"),
    )
    return ForwardOutput(decoded=decoded, **{f: flat[f] for f in _OUTPUTS[4:]})


@dataclass
class _Member:
    cfg: Config
    model: CVAE
    opt: torch.optim.Optimizer
    gen: torch.Generator
    callbacks: Sequence[EpochCallback]
    out_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    seen: int = 0


def train_fused(
    cfgs: Sequence[Config],
    *,
    data: Dataset | None = None,
    callbacks: Sequence[Sequence[EpochCallback]] | None = None,
    out_dirs: Sequence[str | Path | None] | None = None,
) -> list[TrainResult | TrainingDiverged]:
    """Train ``cfgs`` as one stacked model; each member's result is what ``train`` returns alone.

    Args:
        cfgs: Configs sharing :func:`architecture_key`.
        data: An already loaded dataset; it must have been loaded from their ``data`` section.
        callbacks: Per member, called after each of its epochs; the first that returns a string
            stops that member (it is evaluated and leaves the stack).
        out_dirs: Per member, where ``train`` would write its outputs (``None``: nothing).

    Returns:
        Per member, in order: its :class:`TrainResult`, or the :class:`TrainingDiverged` it
        raised when its loss became NaN or infinite (the others train on).

    Raises:
        ValueError: The configs differ in :func:`architecture_key`, or ``callbacks`` or
            ``out_dirs`` do not have one entry per config.
    """
    _check_group(cfgs)
    for name, given in (("callbacks", callbacks), ("out_dirs", out_dirs)):
        if given is not None and len(given) != len(cfgs):
            raise ValueError(
                f"train_fused: {name} has {len(given)} entries, expected one per config ({len(cfgs)})"
            )
    with cpu_threads(cfgs[0].train.threads):
        return _train_fused(
            cfgs,
            data,
            callbacks or [() for _ in cfgs],
            [None if d is None else Path(d) for d in (out_dirs or [None] * len(cfgs))],
        )


def _train_fused(
    cfgs: Sequence[Config],
    data: Dataset | None,
    callbacks: Sequence[Sequence[EpochCallback]],
    out_dirs: Sequence[Path | None],
) -> list[TrainResult | TrainingDiverged]:
    t_start = time.perf_counter()
    device = resolve_device(cfgs[0].train.device)
    bf16 = use_bf16(cfgs[0], device)
    _reset_peak_memory(device)
    if data is None:
        data = load_data(cfgs[0].data, cfgs[0].normalization)
    data = data.to(device)
    members: list[_Member] = []
    for cfg, cbs, out in zip(cfgs, callbacks, out_dirs, strict=True):
        cfg = replace(cfg, normalization=data.stats)
        torch.manual_seed(cfg.train.seed)  # as train(): right before this member's weights
        model = build_model(cfg, data).to(device)
        gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
        members.append(_Member(cfg, model, _optimizer(model, cfg, device), gen, cbs, out))
    step = _FusedStep([m.model for m in members], [m.cfg for m in members], data)
    loss_fn = _compiled(step, device) if cfgs[0].train.compile else step

    n = len(data.train)
    batch = min(cfgs[0].train.batch_size, n)
    steps = n // batch
    latent = cfgs[0].model.latent_dim
    results: list[TrainResult | TrainingDiverged | None] = [None] * len(members)
    active = tuple(range(len(members)))
    t_train = time.perf_counter()
    epoch = 0
    while active:
        epoch += 1
        t_epoch = time.perf_counter()
        betas = [
            m.cfg.loss.beta_kl * kl_warmup_factor(epoch - 1, m.cfg.loss.kl_warmup_epochs) for m in members
        ]
        beta_t = torch.tensor([betas[k] for k in active], device=device)
        sums = torch.zeros(len(active), len(LOSS_TERMS), device=device)
        perms = [torch.randperm(n, device=device, generator=members[k].gen) for k in active]
        for m in members:
            m.model.train()
        for s in range(steps):
            idx = torch.stack([p[s * batch : (s + 1) * batch] for p in perms])
            eps = torch.stack(
                [torch.randn(batch, latent, device=device, generator=members[k].gen) for k in active]
            )
            with autocast(device, bf16):
                terms = loss_fn(active, idx, eps, beta_t)
            for k in active:
                members[k].opt.zero_grad(set_to_none=True)
            terms[:, 0].sum().backward()
            for k in active:
                m = members[k]
                if m.cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(m.model.parameters(), m.cfg.train.grad_clip)
                m.opt.step()
            sums += terms.detach()
        elapsed = time.perf_counter() - t_epoch
        rate = steps * batch / elapsed if elapsed > 0 else float("nan")
        means = (sums / steps).tolist()
        ended: list[int] = []
        for row, k in zip(means, active, strict=True):
            m = members[k]
            m.seen += steps * batch
            losses = dict(zip(LOSS_TERMS, row, strict=True))
            if not all(math.isfinite(v) for v in losses.values()):
                bad = ", ".join(f"{t}={v}" for t, v in losses.items() if not math.isfinite(v))
                results[k] = TrainingDiverged(f"loss is not finite at epoch {epoch}: {bad}")
                ended.append(k)
                continue
            m.history.append({"epoch": epoch, **losses, "beta": betas[k], "samples_per_s": rate})
            stopped = _callbacks(m, epoch, losses, rate, time.perf_counter() - t_train, data, bf16)
            if stopped or epoch == m.cfg.train.epochs:
                if stopped:
                    _log.info("member %d stopped at epoch %d: %s", k, epoch, stopped)
                results[k] = _finish(
                    m, epoch, stopped, time.perf_counter() - t_train, len(members), data, device, bf16
                )
                ended.append(k)
        active = tuple(k for k in active if k not in ended)
    total = time.perf_counter() - t_start
    for r in results:
        if isinstance(r, TrainResult):
            r.timings["total_s"] = total
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _callbacks(
    m: _Member, epoch: int, losses: dict[str, float], rate: float, elapsed: float, data: Dataset, bf16: bool
) -> str | None:
    model, cfg = m.model, m.cfg
    report = EpochReport(
        epoch=epoch,
        epochs=cfg.train.epochs,
        losses=losses,
        samples_per_s=rate,
        elapsed_s=elapsed,
        probe=lambda: probe_collapse(model, data, cfg.eval, bf16=bf16),
        evaluate=lambda names, days: evaluate_validation(model, data, cfg.eval, names, days=days, bf16=bf16),
    )
    for callback in m.callbacks:
        stopped = callback(report)
        if stopped:
            return stopped
    return None


def _finish(
    m: _Member,
    epoch: int,
    stopped: str | None,
    train_s: float,
    group: int,
    data: Dataset,
    device: torch.device,
    bf16: bool,
) -> TrainResult:
    t_eval = time.perf_counter()
    ev = evaluate(m.model, data, m.cfg.eval, bf16=bf16)
    eval_s = time.perf_counter() - t_eval
    result = TrainResult(
        config=m.cfg,
        metrics=ev.metrics,
        diagnostics=ev.diagnostics,
        history=m.history,
        epochs_run=epoch,
        stopped=stopped,
        timings={
            "train_s": train_s,
            "eval_s": eval_s,
            "samples_per_s": m.seen / train_s if train_s > 0 else float("nan"),
        },
        device=str(device),
        precision="bf16" if bf16 else "fp32",
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        versions=versions(),
        peak_gpu_memory_bytes=_peak_memory(device),
        extra={FUSED_GROUP: group},
    )
    if m.out_dir is not None:
        _write_outputs(m.out_dir, m.model, m.cfg, result, ev.data, data)
    return result
