"""The reachability check of a cluster address before ray.init (ray_layer/cluster.py); no Ray
is started."""
import socket

import pytest

from ray_layer.cluster import ClusterConnectionError, _check_reachable


def listener(family: int, host: str) -> socket.socket:
    try:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    server.listen()
    return server


@pytest.mark.parametrize("template", ["[::1]:{port}", "ray://[::1]:{port}"])
def test_a_bracketed_ipv6_address_is_reached(template):
    # The brackets were kept in the host ("[::1]"), and a cluster listening there was
    # reported as "cannot reach a Ray cluster".
    with listener(socket.AF_INET6, "::1") as server:
        _check_reachable(template.format(port=server.getsockname()[1]), "--address")


def test_an_ipv4_address_is_still_reached_and_a_portless_one_refused():
    with listener(socket.AF_INET, "127.0.0.1") as server:
        _check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "--address")
    with pytest.raises(ClusterConnectionError, match="not of the form host:port"):
        _check_reachable("[::1]", "--address")
