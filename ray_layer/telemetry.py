"""Record catalogue metrics (orchestrator/metric_catalogue.py) through ray.util.metrics.

Thin on purpose: names, kinds, buckets and tag keys come from the catalogue; this module only
creates the Ray metric objects (lazily, once per process: creating one registers it with the
worker's metrics recorder, which needs a connected Ray worker) and records values.

Recording must never break what is being measured: a failure is logged once per metric and
the value dropped. A wrong tag set, however, is a programming error and raises (tests catch
it), which `record` does before touching Ray.

Gauges marked `held` in the catalogue are re-sent: Ray's metrics agent drops a gauge value
not refreshed within two report intervals (20 s by default), so a figure recorded once (a
model version at load) or rarely (training reports minutes apart) vanished from Prometheus
between records, and alerts with a `for:` never fired. A daemon thread re-sets each held
gauge's last value every GAUGE_REFRESH_S for GAUGE_HOLD_S after it was recorded, then lets
it go.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Iterable

from orchestrator.metric_catalogue import COUNTER, GAUGE, HISTOGRAM, MetricSpec

log = logging.getLogger(__name__)

_metrics: dict[str, Any] = {}  # metric name -> ray.util.metrics object, this process
_lock = threading.Lock()  # actors record from several threads (heartbeat, Ray's, maintenance)
_failed: set[str] = set()  # metrics whose failure was already logged
GAUGE_REFRESH_S = 5.0  # well inside the agent's 20 s
GAUGE_HOLD_S = 600.0
# (metric name, tags) -> (spec, last value, tags, when recorded): the gauges to keep alive.
_held: dict[tuple[str, tuple], tuple[MetricSpec, float, dict[str, str], float]] = {}
_refresher: threading.Thread | None = None
# Taken around a held gauge's set and its entry together, and by the refresher around its
# re-sets: a refresh never writes an older value over a newer one. (Order: _held_lock, then
# _lock inside _metric; never the other way round.)
_held_lock = threading.Lock()


def tag_values(spec: MetricSpec, tags: dict[str, Any]) -> dict[str, str]:
    """Tags as Ray wants them (every declared key, string values), or ValueError naming the
    metric and the keys that are missing or unknown."""
    missing, unknown = set(spec.tag_keys) - set(tags), set(tags) - set(spec.tag_keys)
    if missing or unknown:
        raise ValueError(f"metric {spec.name}: tags must be exactly {list(spec.tag_keys)}; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {key: str(value) for key, value in tags.items()}


def _metric(spec: MetricSpec) -> Any:
    with _lock:
        metric = _metrics.get(spec.name)
        if metric is None:
            from ray.util import metrics as ray_metrics

            if spec.kind == COUNTER:
                metric = ray_metrics.Counter(spec.name, spec.description, spec.tag_keys)
            elif spec.kind == GAUGE:
                metric = ray_metrics.Gauge(spec.name, spec.description, spec.tag_keys)
            else:
                metric = ray_metrics.Histogram(spec.name, spec.description,
                                               list(spec.buckets), spec.tag_keys)
            _metrics[spec.name] = metric
        return metric


def record(spec: MetricSpec, value: float | int | None, **tags: Any) -> None:
    """Set a gauge, add to a counter or observe a histogram value. None, NaN and infinities
    are skipped (a figure not measured is not a zero); so is a counter increment <= 0."""
    tags = tag_values(spec, tags)
    if value is None:
        return
    value = float(value)  # numpy scalars: Ray accepts only int/float
    if not math.isfinite(value) and spec.kind == GAUGE and spec.held:
        # A diverged run's loss: the last finite value, re-sent for GAUGE_HOLD_S, showed the
        # run healthy for ten minutes. Let it go: the panel goes blank within 20 s.
        with _held_lock:
            _held.pop((spec.name, tuple(sorted(tags.items()))), None)
        return
    if not math.isfinite(value) or (spec.kind == COUNTER and value <= 0):
        return
    try:
        metric = _metric(spec)
        if spec.kind == COUNTER:
            metric.inc(value, tags)
        elif spec.kind == GAUGE and spec.held:
            with _held_lock:
                metric.set(value, tags)
                _hold(spec, value, tags)
        elif spec.kind == GAUGE:
            metric.set(value, tags)
        elif spec.kind == HISTOGRAM:
            metric.observe(value, tags)
    except Exception as e:  # metrics are never worth failing a heartbeat or a placement
        if spec.name not in _failed:
            _failed.add(spec.name)
            log.warning("cannot record metric %s: %s: %s", spec.name, type(e).__name__, e)


def record_all(samples: Iterable[tuple[MetricSpec, float | None, dict[str, Any]]]) -> None:
    """record() each (spec, value, tags) sample, as built by orchestrator.metric_catalogue."""
    for spec, value, tags in samples:
        record(spec, value, **tags)


def _hold(spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
    """Keep a held gauge's last value (under _held_lock); start the refresher once."""
    global _refresher
    _held[(spec.name, tuple(sorted(tags.items())))] = (spec, value, tags, time.monotonic())
    if _refresher is None:
        _refresher = threading.Thread(target=_refresh_forever, name="gauge-refresh",
                                      daemon=True)
        _refresher.start()


def refresh_gauges(now: float | None = None) -> int:
    """Re-set every held gauge recorded within GAUGE_HOLD_S to its last value and let the
    older ones go; returns how many were refreshed."""
    now = time.monotonic() if now is None else now
    with _held_lock:
        for key in [k for k, held in _held.items() if now - held[3] > GAUGE_HOLD_S]:
            del _held[key]
        for spec, value, tags, _ in _held.values():
            try:
                _metric(spec).set(value, tags)
            except Exception:  # logged when first recorded; never worth a thread's life
                pass
        return len(_held)


def _refresh_forever() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        refresh_gauges()
