"""Optuna's gRPC storage proxy in front of the database: one connection pool for many workers.

Workers behind the proxy cannot record Optuna heartbeats themselves, nor run the routine
that fails stale trials (both need the RDB storage), so the proxy does both for them: the
storage it serves relays their heartbeat attribute into Optuna's heartbeat table, and a
reaper thread fails and re-enqueues stale trials of every study.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna
from optuna.storages import run_grpc_proxy_server

from search.storage import (
    SearchStorage,
    StorageSettings,
    open_storage,
    reap_stale_trials,
    redact,
    resolve_storage_url,
)

__all__ = ["serve_proxy"]

_log = logging.getLogger(__name__)


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
            _log.warning("stale-trial reaper: %s", e)


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
    stop = threading.Event()
    reaper = threading.Thread(
        target=_reap_forever, args=(storage, settings.heartbeat_interval, stop), name="reaper", daemon=True
    )
    reaper.start()
    _log.info("gRPC storage proxy for %s on %s:%d", redact(url), host, port)
    # The proxy server is marked experimental in Optuna; it is the documented way to serve many workers.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        run_grpc_proxy_server(
            storage, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=settings.pool_size)
        )
    finally:
        stop.set()
