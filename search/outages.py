"""Riding out storage outages: a database restart, a network cut, the gRPC proxy restarted.

A storage that mixes in :class:`Reconnecting` retries each call (the outermost one, so a call
that failed half-way is redone whole) while its storage is unreachable, for up to its
reconnect budget, and then raises :class:`StorageUnreachable`: one line naming the storage
and the call. The process's :class:`Outages` logs an outage once when it begins and once
when it ends, and remembers since when this process could see other workers' heartbeats,
so that it does not fail their trials as stale while it was the one cut off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Outages", "Reconnecting", "StorageUnreachable", "retry_calls"]

_log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.25
MAX_DELAY_S = 2.0


class StorageUnreachable(ConnectionError):
    """The storage stayed unreachable for longer than the reconnect budget."""


class Outages:
    """One process's view of its storage's outages.

    Args:
        where: The storage, as logs may show it (password redacted).
        watch_from_now: Count heartbeats as seen only from now on (a process that was not
            there to hear them, such as a restarted proxy); otherwise from the start of time.
    """

    def __init__(self, where: str, *, watch_from_now: bool = False) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._since: float | None = None
        self._watching_since = time.monotonic() if watch_from_now else -math.inf

    def failed(self, cause: str, budget_s: float) -> None:
        """A call found the storage unreachable; the first failure of an outage is logged."""
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        _log.warning(
            "storage %s unreachable (%s); each call is retried for up to %.0f s (CVAE_SEARCH_RECONNECT)",
            self.where,
            cause,
            budget_s,
        )

    def succeeded(self) -> None:
        """A call got through: an outage in progress has ended."""
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._since is None:
                return
            now = time.monotonic()
            lasted, self._since = now - self._since, None
            # Others' heartbeats could not be seen meanwhile: each running trial gets the
            # whole grace period again, counted from now.
            self._watching_since = now
        _log.info("storage %s reachable again after %.0f s", self.where, lasted)

    def watch_from_now(self) -> None:
        """Count heartbeats as seen only from now on."""
        with self._lock:
            self._watching_since = time.monotonic()

    def watched_s(self) -> float:
        """Seconds for which this process could have seen heartbeats (infinite: always)."""
        return time.monotonic() - self._watching_since


class Reconnecting:
    """Mixin: retry a storage call while the storage is unreachable (module docstring).

    The class sets ``_outages`` and ``_local`` (a ``threading.local``) in its constructor
    and says what counts as an outage in :meth:`_outage_cause`.
    """

    _outages: Outages
    _local: threading.local

    def _reconnect_budget_s(self) -> float:
        raise NotImplementedError

    @staticmethod
    def _outage_cause(e: BaseException) -> str | None:
        """One line saying why the storage could not be reached, or ``None`` if ``e`` is no outage."""
        raise NotImplementedError

    @contextlib.contextmanager
    def single_attempt(self) -> Iterator[None]:
        """Calls in this block, on this thread, are tried once (a heartbeat: the next beat retries)."""
        self._local.single_attempt = True
        try:
            yield
        finally:
            self._local.single_attempt = False

    def _reconnecting(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        local = self._local
        if getattr(local, "in_call", False):  # nested: the outermost call retries
            return method(self, *args, **kwargs)
        local.in_call = True
        budget = 0.0 if getattr(local, "single_attempt", False) else self._reconnect_budget_s()
        deadline = time.monotonic() + budget
        delay = FIRST_DELAY_S
        try:
            while True:
                try:
                    result = method(self, *args, **kwargs)
                except Exception as e:
                    cause = self._outage_cause(e)
                    if cause is None:
                        raise
                    self._outages.failed(cause, self._reconnect_budget_s())
                    if budget == 0.0:
                        raise
                    if time.monotonic() + delay > deadline:
                        raise StorageUnreachable(
                            f"storage {self._outages.where}: unreachable for {budget:.0f} s "
                            f"(CVAE_SEARCH_RECONNECT); gave up on {method.__name__} ({cause})"
                        ) from e
                    time.sleep(delay)
                    delay = min(2 * delay, MAX_DELAY_S)
                else:
                    self._outages.succeeded()
                    return result
        finally:
            local.in_call = False


def retry_calls(cls: type[Reconnecting], names: Iterable[str]) -> None:
    """Route each of ``cls``'s methods ``names`` through :meth:`Reconnecting._reconnecting`."""
    for name in names:
        method = getattr(cls, name, None)
        if callable(method):
            setattr(cls, name, _retrying(method))


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Reconnecting, *args: Any, **kwargs: Any) -> Any:
        return self._reconnecting(method, *args, **kwargs)

    return call
