"""Lookup misses, counted in memory and written to the store in batches by a background thread.

A lookup never waits for the database's write lock (a long bundle import or a busy tuner holds it):
it only reads. The recorder flushes every flush_s (and when the daemon stops), keeps at most
max_pending distinct misses waiting (more are dropped and counted while the store is down), and
prunes the store's misses table to max_rows, oldest first.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tunerd.db.errors import StoreError
from tunerd.db.fingerprint import DeviceFingerprint
from tunerd.kernels.spec import BlockSpec

log = logging.getLogger("tunerd.api")
Key = tuple[str, str]  # (device key, spec key)


class MissRecorder:
    def __init__(
        self, store: Any, *, max_rows: int, flush_s: float = 0.5, batch: int = 1000, max_pending: int = 50_000
    ) -> None:
        self.store = store
        self.max_rows = max_rows
        self.flush_s = flush_s
        self.batch = batch
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: dict[Key, tuple[DeviceFingerprint, BlockSpec, int]] = {}
        self._flushing: dict[Key, int] = {}
        self._since_prune = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, device: DeviceFingerprint, spec: BlockSpec) -> None:
        key = (device.key, spec.to_json())
        with self._lock:
            got = self._pending.get(key)
            if got is not None:
                self._pending[key] = (device, spec, got[2] + 1)
            elif len(self._pending) < self.max_pending:
                self._pending[key] = (device, spec, 1)
            else:
                self.dropped += 1

    def unwritten(self, device_key: str, spec_key: str) -> int:
        """Misses of (device, spec) counted here and not yet committed to the store."""
        key = (device_key, spec_key)
        with self._lock:
            got = self._pending.get(key)
            return (got[2] if got is not None else 0) + self._flushing.get(key, 0)

    def flush(self) -> int:
        """Write what is pending (in batches); returns how many distinct misses were written."""
        with self._flush_lock:
            with self._lock:
                items, self._pending = list(self._pending.values()), {}
                for device, spec, n in items:
                    key = (device.key, spec.to_json())
                    self._flushing[key] = self._flushing.get(key, 0) + n
            written = 0
            try:
                for i in range(0, len(items), self.batch):
                    chunk = items[i : i + self.batch]
                    self.store.record_misses(chunk)
                    written += len(chunk)
                    with self._lock:
                        for device, spec, n in chunk:
                            key = (device.key, spec.to_json())
                            left = self._flushing.get(key, 0) - n
                            if left > 0:
                                self._flushing[key] = left
                            else:
                                self._flushing.pop(key, None)
            except StoreError as e:  # keep what did not make it, within max_pending
                log.debug("misses not written yet: %s", e)
                with self._lock:
                    for device, spec, n in items[written:]:
                        key = (device.key, spec.to_json())
                        self._flushing.pop(key, None)
                        got = self._pending.get(key)
                        if got is not None:
                            self._pending[key] = (device, spec, got[2] + n)
                        elif len(self._pending) < self.max_pending:
                            self._pending[key] = (device, spec, n)
                        else:
                            self.dropped += n
                return written
            self._since_prune += written
            if self._since_prune * 10 >= self.max_rows:
                self._since_prune = 0
                try:
                    dropped = self.store.prune_misses(self.max_rows)
                    if dropped:
                        log.info("dropped %d old misses (the table keeps %d)", dropped, self.max_rows)
                except StoreError as e:
                    log.debug("pruning misses failed: %s", e)
            return written

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="tunerd-misses", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # never let the thread die
                log.exception("recording misses failed")
