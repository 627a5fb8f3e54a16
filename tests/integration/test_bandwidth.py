"""Measured node-to-node bandwidth through the Ray object store, on the local test cluster.

All its raylets run on one machine, so the numbers measure Ray's object transfer over
loopback, not a network: the test checks that they exist, are sane and reach the scheduler.
"""
import math
import time

import ray

from ray_layer.cluster import ensure_control_plane

MIB = 1024 ** 2


def _assert_rates(rates: dict, expected_peers: set) -> None:
    assert set(rates) == expected_peers, rates
    assert all(math.isfinite(gbps) and gbps > 0 for gbps in rates.values()), rates


def test_agent_measures_every_other_node_and_reports_it(cluster):
    scheduler, agents = ensure_control_plane()
    head = cluster["head"]
    others = set(cluster.values()) - {head}

    rates = ray.get(agents[head].refresh_bandwidth.remote(), timeout=120)
    print(f"bandwidth from head (GB/s): {rates}")
    _assert_rates(rates, others)

    report = ray.get(agents[head].report_now.remote(), timeout=60)
    _assert_rates(report.bandwidth_gbps, others)
    in_scheduler = ray.get(scheduler.snapshot.remote())["reports"][head].bandwidth_gbps
    _assert_rates(in_scheduler, others)


def test_a_failing_or_slow_peer_is_left_out_without_raising(cluster):
    _, agents = ensure_control_plane()

    @ray.remote(num_cpus=0)
    class BrokenPeer:
        def pull(self, refs, timeout_s):
            raise RuntimeError("disk on fire")

    @ray.remote(num_cpus=0)
    class SlowPeer:
        def pull(self, refs, timeout_s):
            time.sleep(30)  # far past the 1 s timeout below
            return 1.0

    peers = {cluster["cpu"]: agents[cluster["cpu"]],
             "broken-node": BrokenPeer.remote(), "slow-node": SlowPeer.remote()}
    start = time.monotonic()
    rates = ray.get(agents[cluster["t4"]].measure_bandwidth.remote(peers, MIB, 1.0), timeout=60)
    _assert_rates(rates, {cluster["cpu"]})
    # The slow peer is given up on after one timeout, not one per round.
    assert time.monotonic() - start < 10


def test_first_measurement_comes_without_asking(cluster):
    # Agents measure on their own shortly after start (one heartbeat interval), not only
    # after bandwidth_every_s: by now every agent has numbers for every other node.
    _, agents = ensure_control_plane()
    deadline = time.monotonic() + 60
    while True:
        reports = ray.get([agent.collect.remote() for agent in agents.values()])
        if all(len(r.bandwidth_gbps) == len(cluster) - 1 for r in reports) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    for report in reports:
        _assert_rates(report.bandwidth_gbps, set(cluster.values()) - {report.node_id})
