"""Optuna's gRPC storage proxy in front of the database: one connection pool for many workers.

Workers behind the proxy cannot record Optuna heartbeats themselves, nor run the routine
that fails stale trials (both need the RDB storage), so the proxy does both for them: the
storage it serves relays their heartbeat attribute into Optuna's heartbeat table, and a
reaper thread fails and re-enqueues stale trials of every study.

A restarted proxy gives every running trial a whole grace period from its start before it
judges it stale: while it was down, the heartbeats of the workers behind it had nowhere to go.
An ask refused because the study's budget is taken is answered ``RESOURCE_EXHAUSTED``, which
the worker waits on, rather than logged as a failure of the proxy.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import optuna
from optuna.storages._grpc.auto_generated import api_pb2_grpc
from optuna.storages._grpc.servicer import OptunaStorageProxyService

from search.storage import (
    BudgetExhausted,
    SearchStorage,
    StorageSettings,
    describe_failure,
    open_storage,
    reap_stale_trials,
    redact,
    resolve_storage_url,
)

__all__ = ["serve_proxy"]

_log = logging.getLogger(__name__)


class _ProxyService(OptunaStorageProxyService):
    """Optuna's proxy service (``run_grpc_proxy_server`` serves it too), with the budget's
    refusal as a status of its own: otherwise gRPC logs it with a traceback on every ask."""

    def CreateNewTrial(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return super().CreateNewTrial(request, context)
        except BudgetExhausted as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))


def _reap_forever(storage: SearchStorage, interval: float, stop: threading.Event) -> None:
    studies: dict[str, optuna.Study] = {}  # kept: each holds a trial cache that stays warm
    while not stop.wait(interval):
        try:
            for summary in storage.get_all_studies():
                name = summary.study_name
                if name not in studies:
                    studies[name] = optuna.load_study(study_name=name, storage=storage)
                reap_stale_trials(studies[name])
        except Exception as e:  # a database restart: try again next round
            _log.warning("stale-trial reaper: %s", describe_failure(e))


def serve_proxy(storage_url: str | None, host: str = "127.0.0.1", port: int = 13000) -> None:
    """Serve ``storage_url`` over gRPC on ``host:port`` until interrupted.

    The proxy answers as many requests at once as its connection pool holds
    (``CVAE_SEARCH_POOL_SIZE``, default 8), so no request waits for a free connection.
    """
    url = resolve_storage_url(storage_url)
    settings = StorageSettings(pool_size=int(os.environ.get("CVAE_SEARCH_POOL_SIZE", "8")))
    storage = open_storage(url, settings)
    if not isinstance(storage, SearchStorage):
        raise ValueError(f"proxy --storage: expected a database URL, got {redact(url)}")
    server = grpc.server(ThreadPoolExecutor(max_workers=settings.pool_size))
    api_pb2_grpc.add_StorageServiceServicer_to_server(_ProxyService(storage), server)
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    storage.grace_from_now()  # the workers' heartbeats can arrive from now on
    stop = threading.Event()
    reaper = threading.Thread(
        target=_reap_forever, args=(storage, settings.heartbeat_interval, stop), name="reaper", daemon=True
    )
    reaper.start()
    _log.info("gRPC storage proxy for %s on %s:%d", redact(url), host, port)
    try:
        server.wait_for_termination()
    finally:
        stop.set()
