"""The reachability check of a cluster address before ray.init (ray_layer/cluster.py); no Ray
is started."""
import re
import socket

import pytest

from ray_layer.cluster import GCS_PROBE_METHOD, ClusterConnectionError, _check_reachable


class GrpcServer:
    """A gRPC server (as Ray's GCS is) on `host`, port 0; `.port` once entered. `token`: it
    answers the GCS probe (GCS_PROBE_METHOD) as a GCS with token authentication does,
    UNAUTHENTICATED unless that token is sent."""

    def __init__(self, host: str, token: str | None = None):
        self.host, self.token = host, token

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        self.server = grpc.server(ThreadPoolExecutor(1))
        if self.token is not None:
            service, method = GCS_PROBE_METHOD.strip("/").split("/")
            self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                service, {method: grpc.unary_unary_rpc_method_handler(self._answer)})])
        try:
            self.port = self.server.add_insecure_port(f"{self.host}:0")
        except RuntimeError:
            pytest.skip(f"no {self.host} on this machine")
        if not self.port:
            pytest.skip(f"no {self.host} on this machine")
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0)

    def _answer(self, request, context):
        import grpc

        if ("authorization", f"Bearer {self.token}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")
        return b""


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
    with GrpcServer("[::1]") as server:
        _check_reachable(template.format(port=server.port), "--address")


def test_an_ipv4_address_is_still_reached_and_a_portless_one_refused():
    with GrpcServer("127.0.0.1") as server:
        _check_reachable(f"127.0.0.1:{server.port}", "--address")
    with pytest.raises(ClusterConnectionError, match="not of the form host:port"):
        _check_reachable("[::1]", "--address")


def test_a_port_that_answers_but_not_as_rays_gcs_is_refused_at_once():
    # `status --address head:8265` (the dashboard's port: what `ray job submit` takes), or a
    # port some other service holds: the TCP check passed and ray.init retried the "GCS"
    # there for minutes, printing a warning each time (killed after 300 s, still waiting).
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    with listener(socket.AF_INET, "127.0.0.1") as server:  # accepts, never answers
        with pytest.raises(ClusterConnectionError, match=(
                r"^127.0.0.1:\d+ \(RAY_ADDRESS\) is not a Ray cluster's GCS port: no answer "
                r"within 0.5 s \(the dashboard's 8265, or another service\?\); give the "
                r"address `ray start --head` printed, host:6379")):
            _check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "RAY_ADDRESS", 0.5)
    http = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterConnectionError, match="an HTTP server answered"):
            _check_reachable(f"127.0.0.1:{http.server_address[1]}", "--address", 5.0)
    finally:
        http.shutdown()
        http.server_close()


def test_a_gcs_that_refuses_this_machines_token_is_named_at_once(monkeypatch):
    # A cluster started with RAY_AUTH_MODE=token: ray.init logged InvalidAuthToken 20 times,
    # then raised "ConnectionError: Failed to connect", which named no token.
    import ray_layer.cluster as cluster

    # Ray's own answer is read (its private API still there: else no check is made at all)...
    assert cluster._token_metadata() is not None
    # ...but "sends none" is given, not taken from the environment: a local ray.init earlier
    # in this process (the integration tier's cluster, in a whole-suite run) turned token
    # mode on in Ray's cached config and token loader, which removing RAY_AUTH_MODE and
    # RAY_AUTH_TOKEN does not undo: Ray sent ~/.ray/auth_token's token ("sends another").
    monkeypatch.setattr(cluster, "_token_metadata", lambda: ())
    with GrpcServer("127.0.0.1", token="s3cret") as server:
        with pytest.raises(ClusterConnectionError,
                           match="asks for an authentication token, and this machine sends "
                                 "none.*RAY_AUTH_TOKEN"):
            _check_reachable(f"127.0.0.1:{server.port}", "--address")


def test_a_gcs_that_takes_this_machines_token_passes_and_another_is_named(monkeypatch):
    import ray_layer.cluster as cluster

    sent = "s3cret"
    monkeypatch.setattr(cluster, "_token_metadata",
                        lambda: (("authorization", f"Bearer {sent}"),))
    with GrpcServer("127.0.0.1", token="s3cret") as server:
        _check_reachable(f"127.0.0.1:{server.port}", "--address")
        sent = "stale"
        with pytest.raises(ClusterConnectionError, match="this machine sends another"):
            _check_reachable(f"127.0.0.1:{server.port}", "--address")


def test_the_token_check_ignores_an_http_proxy_as_ray_does(monkeypatch):
    # gRPC channels honour http_proxy; Ray's turn that off (GLOBAL_GRPC_OPTIONS): with a proxy
    # set, the check's probe went to the proxy, waited its 5 s and named no token.
    import time

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    silent = listener(socket.AF_INET, "127.0.0.1")  # a proxy that never answers
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{silent.getsockname()[1]}")
    with silent, GrpcServer("127.0.0.1", token="s3cret") as server:
        start = time.monotonic()
        with pytest.raises(ClusterConnectionError, match="asks for an authentication token"):
            _check_reachable(f"127.0.0.1:{server.port}", "--address")
        assert time.monotonic() - start < 2.5


def test_auto_with_a_stale_record_of_a_stopped_cluster_fails_at_once_naming_it(tmp_path,
                                                                               monkeypatch):
    # `python -m orchestrator status` (no --address: "auto") on a machine whose `ray start`
    # cluster died without `ray stop` (kill -9, a container restarted): Ray's record,
    # ray_current_cluster, still named its head, and ray.init retried it for over a minute.
    import ray

    import ray_layer.cluster as cluster

    closed = listener(socket.AF_INET, "127.0.0.1")
    stale = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there any more
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's record: RAY_TMPDIR/ray/...
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(stale)
    monkeypatch.setattr(cluster, "_running_local_clusters", lambda: [])
    monkeypatch.setattr("ray._private.services.find_gcs_addresses", lambda: [])
    init_calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: init_calls.append(kwargs))
    # (in a whole-suite run the integration tier's shared cluster is still connected here)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterConnectionError) as refused:
        cluster.connect("auto", embedded=False)
    assert not init_calls
    message = str(refused.value)
    port = stale.rpartition(":")[2]  # (Ray names 127.0.0.1 by this machine's address)
    assert re.match(rf"cannot reach a Ray cluster at [^ ]+:{port} \(the cluster `ray start` "
                    "recorded in ", message), message
    assert str(record) in message and "ray stop" in message


def test_auto_sends_this_machines_token_as_ray_init_auto_does(tmp_path, monkeypatch):
    # `ray start --head` (Ray 2.60: token auth by default, the token in ~/.ray/auth_token),
    # then `python -m orchestrator status` with RAY_AUTH_MODE unset: ray.init("auto") turns
    # token mode on when a token is there, but "auto" resolved to an address is an explicit
    # one to Ray, so the probe (and ray.init) sent none: "refuses this machine".
    import ray
    from ray._private.authentication import authentication_token_setup

    import ray_layer.cluster as cluster

    taken = []
    monkeypatch.setattr(authentication_token_setup, "maybe_enable_token_auth_if_token_available",
                        lambda warn_if_disabled: taken.append(True) or True)
    monkeypatch.setattr(cluster, "_token_metadata",
                        lambda: (("authorization", "Bearer s3cret"),) if taken else ())
    init_calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: init_calls.append(kwargs))
    # (in a whole-suite run the integration tier's shared cluster is still connected here)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with GrpcServer("127.0.0.1", token="s3cret") as server:
        monkeypatch.setattr(cluster, "_auto_address", lambda: (
            f"127.0.0.1:{server.port}", "the Ray cluster running on this machine"))
        cluster.connect("auto", embedded=False)
    assert [call["address"] for call in init_calls] == [f"127.0.0.1:{server.port}"]
