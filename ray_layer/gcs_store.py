"""A JSON document under one key of the GCS key-value store: it outlives the process that
wrote it, and the GCS is what the whole cluster already depends on (no extra service, no
shared disk). The scheduler keeps its state in one; model replicas the config they last
applied."""
from __future__ import annotations

import json
import time
from typing import Any


class GcsJsonStore:
    """One JSON document at `key` in `namespace` of the GCS key-value store."""

    def __init__(self, key: str, namespace: str) -> None:
        self.key, self.namespace = key.encode(), namespace

    def load(self) -> Any:
        """What was saved (None if nothing was); ValueError if it is unreadable (the JSON's
        own errors, or nesting too deep for the parser)."""
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=self.namespace)
        try:
            return json.loads(raw) if raw else None
        except RecursionError:  # (as unreadable as bad JSON; not a failed read to retry)
            raise ValueError(f"GCS key {self.key.decode()!r} holds JSON nested too deeply "
                             "to read") from None

    def save(self, data: Any) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, json.dumps(data).encode(), overwrite=True,
                         namespace=self.namespace)

    def set_aside(self) -> str:
        """Copy what is stored to a key of its own (it is unreadable and the next save
        replaces it): kept for a person to look at. Returns that key."""
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        key = self.key + f".unreadable.{int(time.time())}".encode()
        raw = _internal_kv_get(self.key, namespace=self.namespace)
        if raw:
            _internal_kv_put(key, raw, overwrite=True, namespace=self.namespace)
        return key.decode()
