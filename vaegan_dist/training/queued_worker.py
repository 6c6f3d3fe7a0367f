"""The worker thread behind each tracker: the training step hands it values and never waits for it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

MAX_PENDING = 100  # logs waiting for a slow tracker before new ones are dropped


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class QueuedWorker:
    """A daemon thread that hands each queued dict to `handle`, then calls `close` after `finish`: the training step
    only puts values on a queue, so a tracker that hangs or blocks costs it nothing. Past MAX_PENDING waiting, new
    values are dropped with one warning. The first exception of `handle` or `close` is one warning (`on_error`
    words it), after which the worker only drains the queue."""

    def __init__(self, name: str, handle: Callable[[dict[str, Any]], None], close: Callable[[], None],
                 on_error: Callable[[BaseException], None], warn: Callable[[str], None]) -> None:
        self.name = name
        self.failed = False
        self._handle, self._close, self._on_error, self._warn = handle, close, on_error, warn
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"{name}-log", daemon=True)
        self._warned_full = False

    def start(self) -> None:
        self._thread.start()

    def put(self, values: dict[str, Any]) -> None:
        if self._queue.qsize() < MAX_PENDING:
            self._queue.put(values)
        elif not self._warned_full:
            self._warned_full = True
            self._warn(f"{self.name} is not keeping up: {MAX_PENDING} logs are waiting, newer ones are dropped until "
                       "it catches up (metrics.jsonl has them all)")

    def finish(self, timeout: float) -> bool:
        """Handles what is queued, then closes; False if that took more than `timeout` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while (values := self._queue.get()) is not None:
            if not self.failed:
                self._attempt(self._handle, values)
        self._attempt(self._close)

    def _attempt(self, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except Exception as err:  # a tracker never stops training
            if not self.failed:
                self.failed = True
                self._on_error(err)


