"""Heartbeats for pins held longer than their lease: a request that pins blocks and then
computes for minutes (a long prefill, a queue wait before the decode worker reads) renews
its owners' leases from one background thread, so the pins outlive the TTL exactly as long
as this process does. If the process dies, the renewals stop and the store reclaims the
pins one TTL later."""

from __future__ import annotations

import logging
import threading

from kvstore.base import KVStore
from kvstore.errors import KVStoreError

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews ``hold``-ed owners every ``interval_s`` (a fraction of the store's TTL) until
    they are ``drop``-ped or the keeper is closed."""

    def __init__(self, store: KVStore, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._store = store
        self._interval_s = interval_s
        self._owners: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-lease-keeper", daemon=True)
        self._thread.start()

    def hold(self, owner: str) -> None:
        with self._lock:
            self._owners.add(owner)

    def drop(self, owner: str) -> None:
        """Stops renewing ``owner`` (call it when releasing its pins)."""
        with self._lock:
            self._owners.discard(owner)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            with self._lock:
                owners = list(self._owners)
            for owner in owners:
                try:
                    if not self._store.renew(owner):
                        self.drop(owner)  # released elsewhere, or already expired
                except KVStoreError as error:  # store unreachable: try again next beat
                    logger.warning("could not renew the lease of %s: %s", owner, error)
