"""Serving resilience on the session's 4-node Ray cluster: replicas placed on the inference
accelerator the cluster offers, a killed replica and a hung one replaced without failing
requests, and autoscaling up under a load ramp and back down after it.

`accelerator: auto` finds the two T4s declared on the cluster's "t4" node, so every model
replica asks for half a T4 there (declared GPUs are not real: the model runs on its CPU).
Serve is shut down at the end; Ray is not.
"""
import time

import pytest
import requests

from orchestrator.serving.loadgen import Load
from orchestrator.serving.settings import serve_app_config
from tests.support import free_port, wait_for

APP = "gpt-resilience"
BLOCK = 64


def app_config(port: int, checkpoint: str, autoscaling: dict) -> dict:
    return serve_app_config(
        APP, port,
        {"checkpoint": checkpoint, "accelerator": "auto", "cpus_per_replica": 0.25,
         "gpus_per_replica": 0.5, "max_batch_size": 8, "fault_injection": True,
         "hang_after_s": 2, "health_check_period_s": 1, "health_check_timeout_s": 5},
        autoscaling=autoscaling, user_config={"checkpoint": checkpoint},
        model_options={"graceful_shutdown_timeout_s": 2})


FIXED_TWO = {"min_replicas": 2, "max_replicas": 2}
# Short delays so a test sees a whole cycle (production values: serve_config.yaml).
RAMP = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
        "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 1,
        "metrics_interval_s": 0.5}


@pytest.fixture(scope="module")
def deployed(cluster, tmp_path_factory):
    from ray import serve

    from ray_layer.serve_app import deploy_config, wait_for_app
    from orchestrator.serving.loading import save_untrained_checkpoint

    checkpoint = str(save_untrained_checkpoint(
        tmp_path_factory.mktemp("resilience") / "checkpoint_00000001", "tiny", BLOCK))
    port = free_port()

    def deploy(autoscaling: dict, replicas: int | None = None):
        deploy_config(app_config(port, checkpoint, autoscaling))
        return wait_for_app(APP, replicas={"GPTModel": replicas} if replicas else None)

    deploy(FIXED_TWO, 2)
    yield {"url": f"http://127.0.0.1:{port}", "deploy": deploy, "nodes": cluster,
           "port": port, "checkpoint": checkpoint}
    serve.shutdown()


def model_handle():
    from ray import serve

    return serve.get_deployment_handle("GPTModel", app_name=APP)


def replica_names(count: int = 2, timeout_s: float = 15.0) -> set[str]:
    """Actor names of up to `count` live model replicas, asked through the handle (a call
    that reaches a replica just killed fails, and one that a replica still starting or
    stopping does not answer in time is given up: neither is counted)."""
    import ray

    handle, names = model_handle(), set()
    deadline = time.monotonic() + timeout_s
    while len(names) < count and time.monotonic() < deadline:
        try:
            names.add(handle.replica_actor_name.remote().result(
                timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.1)
    return names


def actor_exists(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace="serve")
        return True
    except ValueError:
        return False


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments["GPTModel"].replica_states.get("RUNNING", 0) if app else 0


def wait_until(what: str, check, timeout_s: float = 90.0):
    return wait_for(what, check, timeout_s, every_s=0.25)


def test_replicas_ask_for_the_inference_accelerator_the_cluster_offers(deployed):
    handle = model_handle()
    nodes = {handle.replica_stats.remote().result(timeout_s=10)["node_id"] for _ in range(8)}
    assert nodes == {deployed["nodes"]["t4"]}


def test_the_ingress_runs_on_the_head_node_where_haproxy_can_reach_its_loopback_port(deployed):
    from ray.util.state import list_actors

    ingress = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:Ingress"),
                                   ("state", "=", "ALIVE")])
    assert ingress and {a.node_id for a in ingress} == {deployed["nodes"]["head"]}


def test_a_killed_replica_is_replaced_and_requests_still_succeed(deployed):
    import ray

    victim = sorted(replica_names())[0]
    with Load(deployed["url"], clients=4) as load:
        time.sleep(2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        time.sleep(1)
        wait_until("a replacement replica", lambda: not actor_exists(victim)
                   and len(replica_names(2) - {victim}) == 2)
        replaced_after = time.monotonic() - killed_at
    ok = len(load.results) - len(load.failures())
    assert load.results and ok / len(load.results) >= 0.999, load.failures()[:3]
    retries = requests.get(f"{deployed['url']}/health", timeout=30).json()["ingress_retries"]
    print(f"\nreplica kill: {ok}/{len(load.results)} requests succeeded (half of them streams); "
          f"replacement running {replaced_after:.1f}s after the kill; ingress retries {retries}")


def test_a_replica_started_after_a_refused_reload_serves_the_last_good_config(deployed):
    # The refused config stays Serve's target: the replacement of a replica killed after it
    # applied it at start, failed (nothing of its own to keep serving), and so did every
    # later one; the app stopped serving.
    import ray

    from ray_layer.serve_app import deploy_config

    good = deployed["checkpoint"]
    bad = app_config(deployed["port"], good, FIXED_TWO)
    bad["applications"][0]["deployments"][-1]["user_config"] = {
        "checkpoint": good + "-missing"}
    try:
        deploy_config(bad)
        wait_until("both replicas refusing the reload", lambda: all(
            (stats := model_handle().replica_stats.remote().result(timeout_s=10))
            and stats["reload_error"] for _ in range(4)))
        victim = sorted(replica_names())[0]
        with Load(deployed["url"], clients=2) as load:
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            wait_until("a replacement replica", lambda: not actor_exists(victim)
                       and len(replica_names(2) - {victim}) == 2)
            time.sleep(1)
        ok = len(load.results) - len(load.failures())
        assert load.results and ok / len(load.results) >= 0.999, load.failures()[:3]
        for _ in range(4):  # every replica, the new one too, serves and says why
            stats = model_handle().replica_stats.remote().result(timeout_s=10)
            assert "-missing" in stats["reload_error"]["message"]
    finally:
        deployed["deploy"](FIXED_TWO, 2)


def test_a_replica_with_a_hung_batch_loop_fails_its_health_check_and_is_replaced(deployed):
    with Load(deployed["url"], clients=4) as load:
        time.sleep(1)
        wedged = model_handle().inject_fault.remote("hang_batch_loop").result(timeout_s=10)
        hung_at = time.monotonic()
        wait_until("the hung replica replaced", lambda: not actor_exists(wedged)
                   and len(replica_names(2) - {wedged}) == 2)
        replaced_after = time.monotonic() - hung_at
        time.sleep(1)
    assert load.results and not load.failures(), load.failures()[:3]
    print(f"\nhung batch loop: replica replaced {replaced_after:.1f}s after the hang; "
          f"{len(load.results)} requests, none failed")


def test_autoscaling_follows_a_load_ramp_up_and_back_down(deployed):
    deployed["deploy"](RAMP)
    wait_until("scale-in to min_replicas when idle", lambda: running_replicas() == 1)
    with Load(deployed["url"], clients=0) as load:
        ramp_started = time.monotonic()
        for clients in (4, 8, 12):  # one step every 4 s until replicas are added
            load.resize(clients)
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline and running_replicas() < 2:
                time.sleep(0.25)
            if running_replicas() >= 2:
                break
        # Then hold the top load: a new replica loads its model before it counts as RUNNING,
        # which takes a while on a busy 2-core machine.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running_replicas() < 2:
            time.sleep(0.25)
        most = running_replicas()
        scaled_up_after = time.monotonic() - ramp_started
    assert most >= 2, "no scale-up under load"
    assert not load.failures(), load.failures()[:3]
    stopped = time.monotonic()
    wait_until("scale-in after the load", lambda: running_replicas() == 1)
    print(f"\nautoscaling: {most} replicas {scaled_up_after:.1f}s into a ramp of up to {clients} "
          f"clients ({len(load.results)} requests, none failed); back to 1 replica "
          f"{time.monotonic() - stopped:.1f}s after the load stopped")


def test_with_no_model_replica_able_to_start_a_request_is_answered_503_naming_why(deployed):
    # A model replica asking for more CPUs than any node has never starts: without a bound
    # on the wait for one, every request hung until its client gave up. Another app name so
    # that the running app's replicas are removed, not kept serving through a rolling update.
    from ray import serve

    from ray_layer.serve_app import deploy_config

    config = app_config(deployed["port"], deployed["checkpoint"], FIXED_TWO)
    application = config["applications"][0]
    application["name"] = "gpt-no-replica"
    application["args"].update(cpus_per_replica=64, replica_wait_s=2)
    deploy_config(config)

    def ingress_up() -> bool:
        apps = serve.status().applications
        app = apps.get("gpt-no-replica")
        return APP not in apps and app is not None and \
            app.deployments.get("Ingress") is not None and \
            app.deployments["Ingress"].status == "HEALTHY"
    wait_until("the new app's ingress running, the old app gone", ingress_up)
    deadline, answer = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # HAProxy routes to the new ingress shortly
        started = time.monotonic()
        answer = requests.post(f"{deployed['url']}/v1/completions", timeout=30,
                               json={"prompt": "hi", "max_tokens": 2})
        took = time.monotonic() - started
        if answer.status_code == 503 and "no_replica" in answer.text:
            break
        time.sleep(0.5)
    assert answer is not None and answer.status_code == 503, answer and answer.text
    error = answer.json()["error"]
    assert error["code"] == "no_replica" and "within 2 s" in error["message"]
    assert "none is running (GPTModel is" in error["message"], error["message"]
    assert took < 15, f"answered after {took:.1f}s"
    print(f"\nno replica able to start: 503 after {took:.1f}s: {error['message']}")
