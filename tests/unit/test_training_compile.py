"""torch.compile in the training loop, on CPU (on by default on CUDA, where CI cannot look):
the compiled model trains like the eager one and compiles once, so a change to the model that
breaks its graph or recompiles it every step fails here rather than on a user's GPU."""
import time

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


def test_the_compiling_step_is_left_out_of_the_step_rate(tmp_path, monkeypatch):
    """The first step compiles (seconds; 15-65 s on a GPU): the step rate (tokens/s, MFU, the
    low-MFU warning) times the steps after it, while the phase rate, which counts everything
    from the first step on, still includes it. The compile is stood in for by a first step
    known to take FIRST_STEP_S (a warm inductor cache compiles this model in well under a
    second, less than the steps take on a loaded machine): the timed steps and that first step
    are then disjoint parts of the phase, whatever the machine's speed; timed in, the first
    step would be counted twice and the sum would pass the phase by about FIRST_STEP_S."""
    first_step_s = 1.0

    def compile_slowly(module):
        calls = []

        def forward(*args, **kwargs):
            if not calls:
                time.sleep(first_step_s)
            calls.append(1)
            return module(*args, **kwargs)
        return forward

    monkeypatch.setattr(torch, "compile", compile_slowly)
    compiled = run(tmp_path, True)
    assert compiled["compiled"]
    tokens_per_step = 4 * 32
    timed_s = 7 * tokens_per_step / compiled["run_tokens_per_s"]  # the 7 steps after the first
    phase_s = 8 * tokens_per_step / compiled["phase_tokens_per_s"]
    assert timed_s + first_step_s <= phase_s + 1e-3
