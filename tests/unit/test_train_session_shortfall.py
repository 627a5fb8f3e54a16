"""train_under_ray (ray_layer/train_session.py) when a worker's GPU lacks the free memory
asked: every worker stops before training and returns the shortfall. No step ran, so nothing
goes to the run's metrics.jsonl (MetricsLog appends every report of rank 0) nor to the step
gauge: a `step 0` report there read as a step the run took (a resumed run's dashboard and
`orchestrator logs` went back to step 0)."""
from ray_layer import train_session
from orchestrator.runs import append_metrics, read_metrics

SHORT = {"node_id": "n1" * 8, "gpu_index": 1, "free_gb": 2.0, "needed_gb": 40.0}


def test_a_gpu_shortfall_writes_no_step_to_the_metrics_log(monkeypatch, tmp_path):
    class ShortSession:  # a Ray Train worker's session, as MetricsLog sees its reports
        world_rank, world_size, node_id = 0, 1, "n1" * 8

        def gpu_memory_shortfall(self, min_gpu_memory_gb):
            return SHORT

        def report(self, metrics, checkpoint_dir):
            append_metrics(tmp_path, metrics, checkpoint_dir)

    def train(config, session):
        raise AssertionError("trained on a GPU short of memory")
    monkeypatch.setattr(train_session, "RayTrainSession", ShortSession)
    monkeypatch.setattr(train_session, "train", train)
    returned = train_session.train_under_ray({"train": {}, "min_gpu_memory_gb": 40.0})
    assert returned == {train_session.GPU_SHORTFALL: [SHORT]}
    assert read_metrics(tmp_path) == []
