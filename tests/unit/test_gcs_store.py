"""GcsJsonStore on a faked GCS key-value store (no Ray cluster)."""
import json

import pytest
from ray.experimental import internal_kv

from ray_layer.gcs_store import GcsJsonStore


@pytest.fixture
def kv(monkeypatch):
    """A dict standing in for the GCS key-value store."""
    stored: dict[tuple[bytes, str], bytes] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_get",
                        lambda key, namespace=None: stored.get((key, namespace)))
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None:
                        stored.__setitem__((key, namespace), value))
    return stored


def test_json_nested_past_the_parsers_depth_is_unreadable_not_a_failed_read(kv):
    # A RecursionError was taken for a failed read: the scheduler retried, then refused to
    # start, again on every restart, never coming up (the document set aside for nobody).
    kv[(b"state", "ns")] = b"[" * 100_000
    with pytest.raises(ValueError, match="'state' holds JSON nested too deeply"):
        GcsJsonStore("state", "ns").load()


def test_what_is_saved_loads_back_and_a_missing_key_is_none(kv):
    store = GcsJsonStore("state", "ns")
    assert store.load() is None
    store.save({"jobs": [1, 2]})
    assert store.load() == {"jobs": [1, 2]}
    assert json.loads(kv[(b"state", "ns")]) == {"jobs": [1, 2]}
