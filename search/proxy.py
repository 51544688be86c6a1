"""Optuna's gRPC storage proxy in front of the database: one connection pool for many workers.

Workers behind the proxy cannot record Optuna heartbeats themselves, nor run the routine
that fails stale trials (both need the RDB storage), so the proxy does both for them: the
storage it serves relays their heartbeat attribute into Optuna's heartbeat table, and a
reaper thread fails and re-enqueues stale trials of every study.
"""

from __future__ import annotations

import logging
import threading

import optuna
from optuna.storages import run_grpc_proxy_server

from search.storage import SearchStorage, StorageSettings, redact, resolve_storage_url

__all__ = ["serve_proxy"]

_log = logging.getLogger(__name__)


def _reap_forever(storage: SearchStorage, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            for summary in storage.get_all_studies():
                study = optuna.load_study(study_name=summary.study_name, storage=storage)
                optuna.storages.fail_stale_trials(study)
        except Exception as e:  # a database restart: try again next round
            _log.warning("stale-trial reaper: %s", e)


def serve_proxy(storage_url: str | None, host: str = "127.0.0.1", port: int = 13000) -> None:
    """Serve ``storage_url`` over gRPC on ``host:port`` until interrupted."""
    url = resolve_storage_url(storage_url)
    settings = StorageSettings()
    storage = SearchStorage(url, settings)
    stop = threading.Event()
    reaper = threading.Thread(
        target=_reap_forever, args=(storage, settings.heartbeat_interval, stop), name="reaper", daemon=True
    )
    reaper.start()
    _log.info("gRPC storage proxy for %s on %s:%d", redact(url), host, port)
    try:
        run_grpc_proxy_server(storage, host=host, port=port)
    finally:
        stop.set()
