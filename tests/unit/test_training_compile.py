"""torch.compile in the training loop, on CPU (on by default on CUDA, where CI cannot look):
the compiled model trains like the eager one and compiles once, so a change to the model that
breaks its graph or recompiles it every step fails here rather than on a user's GPU."""
import pytest
import torch
from torch._dynamo.utils import counters

from orchestrator.config import TrainConfig
from orchestrator.training import loss
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession


def run(tmp_path, compile_: bool) -> dict:
    # A vocabulary off the 64 alignment: the compiled graph holds the padded LM head.
    config = TrainConfig(model_size="tiny", seq_len=32, batch_size=4, max_steps=8, log_every=4,
                         checkpoint_every=4, warmup_steps=2, compile=compile_, vocab_size=300,
                         accumulation="embeddings=1,lower=2,upper=1,head=1")
    return train(config, LocalSession(tmp_path / str(compile_), device=torch.device("cpu")))


def test_compiled_training_matches_eager_in_one_graph(tmp_path, monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    eager_gradients = []  # the loss's eager backward, which compiled training must not trace
    eager_gradient = loss._eager_gradient
    monkeypatch.setattr(loss, "_eager_gradient",
                        lambda *args: eager_gradients.append(1) or eager_gradient(*args))
    compiled = run(tmp_path, True)
    assert not eager_gradients
    # Steps with and without an optimizer step (hierarchical accumulation) and a checkpoint
    # between them: one graph (a recompile would add one), no break. (Evaluation runs the
    # uncompiled model.)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    eager = run(tmp_path, False)
    assert eager_gradients  # (the count works)
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)
    assert compiled["held_out_loss"] == pytest.approx(eager["held_out_loss"], abs=1e-4)


def test_the_compiling_step_is_left_out_of_the_step_rate(tmp_path):
    """The first step compiles (seconds; 15-65 s on a GPU): the step rate (tokens/s, MFU, the
    low-MFU warning) times the steps after it, while the phase rate, which counts everything
    from the first step on, still includes it. Timed in, the two would be about equal."""
    torch._dynamo.reset()
    compiled = run(tmp_path, True)
    assert compiled["run_tokens_per_s"] > 3 * compiled["phase_tokens_per_s"]
