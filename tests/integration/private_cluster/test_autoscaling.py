"""cluster.local.yaml on Ray's fake_multinode autoscaler: a job needing a node type that is not
running waits, and the scheduler asks the autoscaler for it, which adds one; the scheduler
gives it a node agent without being asked; the job is placed there, and Ray runs the job's
worker there. A job no one node type holds within its max_workers gets one node of each of
two types, and runs across them.

The cluster is this test's own (private_ray.py beside it): the autoscaler needs a head
started with `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, which cannot
share a process with the session cluster, so the driver runs in a subprocess.
"""
import json

import pytest


# The driver: what a job launcher does, step by step, printing one JSON line of evidence.
# Nobody here asks the autoscaler for anything: the scheduler does, for the job it queued.
DRIVER = r'''
import json, time
import ray
from ray_layer.cluster import ensure_control_plane
from orchestrator.config import JobSpec
from orchestrator.inventory import LABEL_ACCELERATOR_TYPE
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.polling import wait_for

ray.init()
scheduler, agents = ensure_control_plane()
alive = [n for n in ray.nodes() if n["Alive"]]
before = {n["NodeID"] for n in alive}
spec = JobSpec(name="needs-a-t4", num_workers=1, cpus_per_worker=1, gpus_per_worker=1,
               accelerator_types=("T4",))
owner = ray.get_runtime_context().get_job_id()
first = ray.get(scheduler.submit.remote(spec, owner))  # no T4 node is up
asked = time.monotonic()
asked_for = wait_for("the scheduler's request to the autoscaler", lambda: ray.get(
    scheduler.snapshot.remote())["autoscaling"]["asked_for"], timeout_s=30)
new = wait_for("a new T4 node", lambda: [n for n in ray.nodes() if n["Alive"]
                                         and n["NodeID"] not in before
                                         and n["Labels"].get(LABEL_ACCELERATOR_TYPE) == "T4"],
               timeout_s=120)
joined_s = time.monotonic() - asked
node_id = new[0]["NodeID"]
# Nobody here starts an agent there: the scheduler's maintenance pass does.
wait_for("a report from the new node's agent",
         lambda: node_id in ray.get(scheduler.snapshot.remote())["reports"], timeout_s=90)
registered_s = time.monotonic() - asked
decision = wait_for("the job's placement", lambda: (lambda d: d if not isinstance(d, Queued)
                    else None)(ray.get(scheduler.poll.remote(spec.name, owner))), timeout_s=60)

@ray.remote(num_cpus=1, num_gpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = None
if isinstance(decision, Placement):  # run the worker exactly where placed, as Ray Train does
    ran_on = ray.get(where.options(label_selector={"ray.io/node-id": decision.worker_nodes[0]})
                     .remote(), timeout=60)
    ray.get(scheduler.release.remote(spec.name))
# Nothing waits for new nodes any more: the request is withdrawn (else the autoscaler keeps
# the node up for it).
withdrawn = wait_for("the request withdrawn", lambda: ray.get(scheduler.snapshot.remote())[
    "autoscaling"]["asked_for"] == [] or None, timeout_s=30)
snapshot = ray.get(scheduler.snapshot.remote())
report = snapshot["reports"][node_id]
print(json.dumps({
    "first": type(first).__name__, "first_reason": getattr(first, "reason", ""),
    "node_types": [t["name"] for t in snapshot["autoscaling"]["node_types"]],
    "autoscaler": snapshot["autoscaling"]["autoscaler"],
    "asked_for": asked_for,
    "withdrawn": bool(withdrawn),
    "before": sorted(n["Labels"].get("orchestrator.io/node-type", "") for n in alive),
    "node_id": node_id, "node_type": new[0]["Labels"].get(
        "orchestrator.io/node-type"), "joined_s": joined_s, "registered_s": registered_s,
    "decision": type(decision).__name__,
    "worker_nodes": list(getattr(decision, "worker_nodes", [])),
    "ran_on": ran_on, "reported_gpus": [g.name for g in report.gpus],
    "agent": ray.get_actor(f"node-agent-{node_id}", namespace="orchestrator") is not None,
}))
'''


@pytest.fixture(scope="module")
def autoscaling_cluster(local_cluster):
    yield local_cluster
    # The package's next module (test_observability) gets the cluster as it started: the
    # T4, A100 and H100 nodes added here would otherwise idle on for idle_timeout_minutes
    # (2) beside its training job, on the same CPUs.
    local_cluster.stop_nodes_added_since(local_cluster.initial_nodes)


def test_a_job_needing_an_absent_node_type_scales_up_registers_and_places(autoscaling_cluster):
    out = autoscaling_cluster.run_python(DRIVER, timeout_s=240)
    result = json.loads(out.strip().splitlines()[-1])
    # Before: the head and a CPU worker. The T4 job is not refused: it waits, and the
    # scheduler asks the autoscaler (cluster.local.yaml's node types) for its worker.
    assert result["before"] == ["cpu", "head"]
    assert "infer_t4" in result["node_types"] and "head" not in result["node_types"]
    # `ray start --head --autoscaling-config` (no RAY_enable_autoscaler_v2) runs v1, and the
    # scheduler reads so from Ray's GCS: its scale-up notes name v1 only.
    assert result["autoscaler"] == "v1"
    assert result["first"] == "Queued", result
    assert "waiting for the autoscaler to add 1 x infer_t4" in result["first_reason"]
    assert result["asked_for"] == [{"CPU": 1.0, "GPU": 1, "accelerator_type:T4": 0.001}]
    assert result["withdrawn"]  # once placed, nothing is asked for
    # The autoscaler added a node of the right type, with the labels cluster.local.yaml gives.
    assert result["node_type"] == "inference"
    assert result["reported_gpus"] == ["T4"] * 4  # declared through labels, marked "declared"
    assert result["agent"]
    # The job went there, and Ray ran its worker there.
    assert result["decision"] == "Placement"
    assert result["worker_nodes"] == [result["node_id"]]
    assert result["ran_on"] == result["node_id"]
    print(f"T4 node joined {result['joined_s']:.1f}s after the request, its agent reported "
          f"after {result['registered_s']:.1f}s")


# A job no one node type holds within its max_workers (cluster.local.yaml: train_a100 and
# train_h100 at max_workers 1, 8 GPUs a node): two workers of 8 GPUs, taking A100 or H100.
# The scheduler plans one node of each type and asks for one bundle steered to each; the
# autoscaler must add one node of EACH type, and the job's workers run one on each.
ACROSS_TYPES_DRIVER = r'''
import json, time
import ray
from ray_layer.cluster import ensure_control_plane
from orchestrator.config import JobSpec
from orchestrator.inventory import LABEL_ACCELERATOR_TYPE
from orchestrator.placement import Placement, Queued
from orchestrator.polling import wait_for

ray.init()
scheduler, agents = ensure_control_plane()
before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
spec = JobSpec(name="needs-a100-and-h100", num_workers=2, cpus_per_worker=1, gpus_per_worker=8,
               accelerator_types=("A100", "H100"))
owner = ray.get_runtime_context().get_job_id()
first = ray.get(scheduler.submit.remote(spec, owner))
asked = time.monotonic()
asked_for = wait_for("the scheduler's request to the autoscaler", lambda: ray.get(
    scheduler.snapshot.remote())["autoscaling"]["asked_for"], timeout_s=30)
asked_by = ray.get(scheduler.snapshot.remote())["autoscaling"]["asked_by_job"]

def new_gpu_nodes():
    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before
            and n["Labels"].get(LABEL_ACCELERATOR_TYPE, "").startswith(("A100", "H100"))]

new = wait_for("a new A100 node and a new H100 node", lambda: (lambda nodes: nodes if len(
    {n["Labels"][LABEL_ACCELERATOR_TYPE] for n in nodes}) == 2 else None)(new_gpu_nodes()),
    timeout_s=120)
joined_s = time.monotonic() - asked
ids = [n["NodeID"] for n in new]
wait_for("reports from the new nodes' agents", lambda: set(ids) <= set(
    ray.get(scheduler.snapshot.remote())["reports"]), timeout_s=90)
decision = wait_for("the job's placement", lambda: (lambda d: d if not isinstance(d, Queued)
                    else None)(ray.get(scheduler.poll.remote(spec.name, owner))), timeout_s=60)

@ray.remote(num_cpus=1, num_gpus=8)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = []
if isinstance(decision, Placement):  # each worker exactly where placed, as Ray Train does
    ran_on = ray.get([where.options(label_selector={"ray.io/node-id": node}).remote()
                      for node in decision.worker_nodes], timeout=60)
    ray.get(scheduler.release.remote(spec.name))
withdrawn = wait_for("the request withdrawn", lambda: ray.get(scheduler.snapshot.remote())[
    "autoscaling"]["asked_for"] == [] or None, timeout_s=30)
print(json.dumps({
    "first": type(first).__name__, "first_reason": getattr(first, "reason", ""),
    "asked_for": asked_for, "asked_by": asked_by, "withdrawn": bool(withdrawn),
    "new": {n["NodeID"]: n["Labels"].get(LABEL_ACCELERATOR_TYPE) for n in new_gpu_nodes()},
    "joined_s": joined_s, "decision": type(decision).__name__,
    "worker_nodes": list(getattr(decision, "worker_nodes", [])), "ran_on": ran_on,
}))
'''


def test_a_job_no_one_node_type_holds_scales_up_one_node_of_each_type(autoscaling_cluster):
    out = autoscaling_cluster.run_python(ACROSS_TYPES_DRIVER, timeout_s=240)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["first"] == "Queued", result
    assert "1 x train_a100 + 1 x train_h100" in result["first_reason"], result
    # One bundle steered to each type (its accelerator_type resource), not two of one.
    assert sorted(result["asked_for"], key=str) == [
        {"CPU": 1, "GPU": 8, "accelerator_type:A100": 0.001},
        {"CPU": 1, "GPU": 8, "accelerator_type:H100": 0.001}], result
    assert sorted((p["node_type"], p["nodes"], p["workers"]) for p in result["asked_by"]) == [
        ("train_a100", 1, 1), ("train_h100", 1, 1)], result
    # The autoscaler added exactly one node of each type, and nothing else of theirs.
    assert sorted(result["new"].values()) == ["A100-80GB", "H100-80GB"], result
    # The job went across them, one worker a node, and Ray ran each worker there.
    assert result["decision"] == "Placement", result
    assert sorted(result["worker_nodes"]) == sorted(result["new"]), result
    assert result["ran_on"] == result["worker_nodes"], result
    assert result["withdrawn"]
    print(f"A100 and H100 nodes joined {result['joined_s']:.1f}s after the request")
