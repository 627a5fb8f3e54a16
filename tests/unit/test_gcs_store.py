"""GcsJsonStore on a faked GCS key-value store (no Ray cluster), and the scheduler's saves to
it."""
import inspect
import json

import pytest
import ray.autoscaler.sdk
from ray.experimental import internal_kv

from orchestrator.placement import Placement
from ray_layer.gcs_store import GcsJsonStore
from tests.unit.test_scheduler_core import T0, core_with, cpu_node, cpus


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


def test_a_save_that_fails_leaves_the_previous_document_readable(kv):
    store = GcsJsonStore("state", "ns")
    store.save({"jobs": ["a"]})
    with pytest.raises(TypeError):  # fails while writing the JSON: nothing is put
        store.save({"jobs": ["a", object()]})
    assert store.load() == {"jobs": ["a"]}


def test_a_torn_document_is_unreadable_and_set_aside_whole_before_a_save_replaces_it(kv):
    store = GcsJsonStore("state", "ns")
    torn = json.dumps({"queue": {"waiting": [{"spec": {"name": "j"}}]}}).encode()[:30]
    kv[(b"state", "ns")] = torn
    with pytest.raises(ValueError):
        store.load()
    kept = store.set_aside()
    assert kept.startswith("state.unreadable.") and kv[(kept.encode(), "ns")] == torn
    store.save({})
    assert kv[(kept.encode(), "ns")] == torn


def scheduler_actor_on(store, core, monkeypatch):
    """The SchedulerActor class driven without Ray: its state in `store`, its core `core`,
    Ray's view of the cluster faked as `core`'s nodes alive, its clock at T0 + 5."""
    import inspect
    import threading
    import time

    import ray.autoscaler.sdk
    from orchestrator.throughput import ThroughputTable
    from ray_layer import scheduler_actor

    actor = object.__new__(scheduler_actor.SchedulerActor.__ray_metadata__.modified_class)
    actor.lock, actor.core, actor.store = threading.RLock(), core, store
    actor.throughput, actor._unsaved, actor._saved_at = ThroughputTable(), False, time.monotonic()
    actor._scale_up_asked, actor._scale_up_asked_by, actor._agent_silent_since = None, [], {}
    actor._agents_lock = threading.Lock()
    module = inspect.unwrap(type(actor).maintain).__globals__
    alive = set(core.state.reports)
    for name, value in (("record_all", lambda samples: None), ("wall_clock", lambda: T0 + 5),
                        ("_ray_nodes", lambda: (alive, set(), set())),
                        ("_dead_drivers", lambda: set()), ("_ray_available", lambda: {})):
        monkeypatch.setitem(module, name, value)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: None)
    return actor


def gcs_failing_over(*args, **kwargs):
    raise ConnectionError("GCS unavailable")


def saved_jobs(store) -> dict[str, list[str]]:
    doc = store.load()
    return {"running": sorted(doc["running"]),
            "waiting": [job["spec"]["name"] for job in doc["queue"]["waiting"]]}


@pytest.mark.parametrize("call, as_made, after", [
    (lambda actor: actor.submit(cpus("j", 2), "d"),
     lambda decision: isinstance(decision, Placement) and decision.job_name == "j",
     {"running": ["j", "k"], "waiting": ["w"]}),
    (lambda actor: actor.cancel("w"), lambda decision: decision is True,
     {"running": ["k"], "waiting": []}),
], ids=["submit", "cancel"])
def test_a_change_whose_save_failed_is_answered_as_made_and_saved_by_the_next_pass(
        kv, monkeypatch, caplog, call, as_made, after):
    # The failed save raised to the caller while the change stood in memory: a submit
    # reported failure for a job that was placed (submitting it again: a duplicate name), a
    # cancel for a job that was dropped. The change is answered as made, the failure warned
    # of and counted, and the next maintenance pass saves it (a restart before then forgets
    # it, as a save that never came would have).
    import logging

    from orchestrator import metric_catalogue as catalogue
    from ray_layer import scheduler_actor

    actor = scheduler_actor_on(GcsJsonStore("state", "ns"), core_with(cpu_node("a")),
                               monkeypatch)
    actor.submit(cpus("k", 2), "d")
    actor.submit(cpus("w", 4), "d")  # waits for k's CPUs
    before = saved_jobs(actor.store)
    recorded = []
    monkeypatch.setitem(inspect.unwrap(type(actor).maintain).__globals__, "record_all",
                        recorded.extend)
    put = internal_kv._internal_kv_put
    monkeypatch.setattr(internal_kv, "_internal_kv_put", gcs_failing_over)
    with caplog.at_level(logging.WARNING, logger=scheduler_actor.__name__):
        decision = call(actor)
    assert as_made(decision)
    assert saved_jobs(actor.store) == before  # the previous state, readable
    assert actor._unsaved
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "ConnectionError: GCS unavailable" in warning
    assert (catalogue.SCHEDULER_STATE_SAVES_FAILED, 1, {}) in recorded
    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    actor.maintain()
    assert saved_jobs(actor.store) == after and not actor._unsaved


def test_a_maintenance_pass_whose_save_fails_carries_on(kv, monkeypatch):
    # The failed save raised out of the pass: the autoscaler was not asked for the nodes
    # waiting jobs need, and silent node agents were not restarted, until the GCS was back.
    asked = []
    monkeypatch.setattr(internal_kv, "_internal_kv_put", gcs_failing_over)
    actor = scheduler_actor_on(GcsJsonStore("state", "ns"), core_with(cpu_node("a")),
                               monkeypatch)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles: asked.append(bundles))
    actor._unsaved = True
    actor.maintain()
    assert asked == [[]] and actor._unsaved


@pytest.mark.parametrize("damage, restored", [
    (lambda doc: doc["running"]["j1"].update(started_at=None), ["j2"]),  # one bad record
    (lambda doc: doc, []),  # torn: the whole document unreadable, cut below
], ids=["a-bad-record", "torn"])
def test_a_scheduler_restarted_on_a_damaged_state_keeps_it_aside_before_saving(
        kv, monkeypatch, damage, restored):
    from orchestrator.scheduler_core import SchedulerCore

    store = GcsJsonStore("state", "ns")
    core = core_with(cpu_node("a", cpus=4))
    for name in ("j1", "j2"):
        core.submit(cpus(name, 2), "d", T0)
    core.submit(cpus("w", 4), "d", T0)
    scheduler_actor_on(store, core, monkeypatch)._save()
    doc = json.loads(kv[(b"state", "ns")])
    damage(doc)
    damaged = json.dumps(doc).encode()
    if not restored:
        damaged = damaged[:len(damaged) // 2]
    kv[(b"state", "ns")] = damaged
    again = scheduler_actor_on(store, SchedulerCore(core.settings), monkeypatch)
    again._restore(*again._load_state(), None, False)
    again._save()
    (kept,) = [key for key, _ in kv if key.startswith(b"state.unreadable.")]
    assert kv[(kept, "ns")] == damaged
    assert sorted(again.core.running) == restored
    assert list(again.core.queue.waiting) == (["w"] if restored else [])
