"""Hand-made node reports for placement and inventory tests."""
from orchestrator.inventory import GIB, ClusterState, GpuInfo, NodeReport

NOW = 1_000.0


def node(node_id, cpus=8, gpus=0, gpu_free_gb=80.0, load=0.0, gpu_total_gb=80):
    gpu_list = tuple(GpuInfo(i, f"A100-{gpu_total_gb}GB", int(gpu_total_gb * GIB),
                             int(gpu_free_gb * GIB), source="declared")
                     for i in range(gpus))
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=cpus, ray_gpus=gpus,
                      cpu_count=cpus, load_avg_1m=load, ram_total_bytes=64 * GIB,
                      ram_available_bytes=32 * GIB, gpus=gpu_list)


def cluster(*reports, seen=NOW):
    state = ClusterState(suspect_after_s=30, dead_after_s=120)
    for r in reports:
        state.update(r, now=seen)
    return state
