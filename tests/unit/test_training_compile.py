"""torch.compile in the training loop, on CPU (on by default on CUDA, where CI cannot look):
the compiled model trains like the eager one and compiles once, so a change to the model that
breaks its graph or recompiles it every step fails here rather than on a user's GPU."""
import pytest
import torch
from torch._dynamo.utils import counters

from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession


def run(tmp_path, compile_: bool) -> dict:
    config = TrainConfig(model_size="tiny", seq_len=32, batch_size=4, max_steps=8, log_every=4,
                         checkpoint_every=4, warmup_steps=2, compile=compile_,
                         accumulation="embeddings=1,lower=2,upper=1,head=1")
    return train(config, LocalSession(tmp_path / str(compile_), device=torch.device("cpu")))


def test_compiled_training_matches_eager_in_one_graph(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    compiled = run(tmp_path, True)
    # Steps with and without an optimizer step (hierarchical accumulation), a checkpoint and
    # the held-out evaluation: one graph, no break, no recompile.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    eager = run(tmp_path, False)
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)
    assert compiled["held_out_loss"] == pytest.approx(eager["held_out_loss"], abs=1e-4)
