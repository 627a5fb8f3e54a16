"""Tiny GPTs and greedy references shared by the generation and continuous-batching tests
(tests/unit/test_serving_generation.py, test_serving_engine.py). Their fixtures are imported
into those modules by name, which is how pytest finds them."""
from contextlib import contextmanager

import pytest
import torch

from orchestrator.serving.generation import GenerationRequest, SamplingParams
from orchestrator.training.model import GPT, GPTConfig
from tests.support import one_thread

BLOCK = 64
CONFIGS = {
    "standard": GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32),
    "span": GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, attention_span=True,
                      span_ramp=4, span_init=0.1),
}


@pytest.fixture(scope="module", autouse=True)
def torch_on_one_thread():
    """Tiny matmuls: a second intra-op thread only contends (10x slower on a busy 2-core box)."""
    with one_thread():
        yield


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    """Each tiny GPT (standard attention, learnt span), seeded, in eval mode."""
    torch.manual_seed(0)
    return GPT(CONFIGS[request.param]).eval()


def greedy(prompt: bytes, max_tokens: int, **params) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(max_tokens, 0.0, **params))


@torch.no_grad()
def reference_greedy(model: GPT, prompt: bytes, max_tokens: int) -> tuple[int, ...]:
    """Greedy decoding the slow obvious way: the whole sequence again for every token."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        logits, _ = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tuple(tokens[len(prompt):])


@contextmanager
def overflowing_from(model: GPT, position: int):
    """The model's logits are NaN at every position from `position` on (its position
    embedding is infinite there), its weights finite: what an fp16 overflow, or a position
    past those training reached, does to a request that gets there."""
    def infinite_from_position(module, inputs, output):
        return output.masked_fill((inputs[0] >= position).unsqueeze(-1), float("inf"))
    handle = model.pos_emb.register_forward_hook(infinite_from_position)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def non_finite_from_token(model: GPT, token: int):
    """The model's logits are NaN at every position of a sequence from its first `token` on
    (that token's embedding is infinite), its weights finite: an overflow of one request's
    own, which the other rows of its batch, not holding the token, never meet."""
    def infinite_at_token(module, inputs, output):
        return output.masked_fill((inputs[0] == token).unsqueeze(-1), float("inf"))
    handle = model.tok_emb.register_forward_hook(infinite_at_token)
    try:
        yield
    finally:
        handle.remove()
