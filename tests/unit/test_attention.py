"""Learnable attention span, its block-sparse fast path, and the KV cache."""
import math
import sys

import pytest
import torch

from orchestrator.training import attention
from orchestrator.training.attention import (AdaptiveSpan, allowed_keys,
                                             blocked_span_attention, dense_span_attention)
from orchestrator.training.model import GPT, GPTConfig
from tests.support import host_reads_from

SPAN = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, attention_span=True,
                 span_ramp=4, span_init=0.1)


def span_module(fractions, max_span=64, ramp=4):
    span = AdaptiveSpan(len(fractions), max_span, ramp, 0.0)
    with torch.no_grad():
        span.span_fraction.copy_(torch.tensor(fractions))
    return span


def test_ramp_mask_follows_the_formula():
    span = span_module([0.25], max_span=16, ramp=2)  # z = 4
    mask = span.ramp_mask(torch.arange(8.0))[0]
    # clamp((R + z - x) / R, 0, 1) with R=2, z=4
    assert mask.tolist() == [1, 1, 1, 1, 1, 0.5, 0, 0]
    assert span.window() == 6  # distances 0..5 have weight > 0


@pytest.mark.parametrize("time", [7, 40, 56, 64])  # 56: a whole number of windows
def test_blocked_attention_equals_dense_span_attention(time):
    torch.manual_seed(0)
    span = span_module([0.05, 0.15])  # z = 3.2 and 9.6 tokens: window 14
    window = span.window()
    q, k, v = (torch.randn(2, 2, time, 8, requires_grad=True) for _ in range(3))
    allowed, distance = allowed_keys(time, time, None, q.device)
    dense = dense_span_attention(q, k, v, span, allowed, distance, 0.0)
    blocked = blocked_span_attention(q, k, v, span, window, 0.0)
    assert torch.allclose(dense, blocked, atol=1e-6)
    # Same gradients, the span parameter's included: training may use the fast path.
    grads_dense = torch.autograd.grad(dense.square().sum(), [q, k, v, span.span_fraction])
    grads_blocked = torch.autograd.grad(blocked.square().sum(), [q, k, v, span.span_fraction])
    for a, b in zip(grads_dense, grads_blocked):
        assert torch.allclose(a, b, atol=1e-5)


def test_full_span_is_standard_causal_attention():
    """A span covering the whole context masks nothing: the same weights give the same logits."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    spanned = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32,
                            attention_span=True, span_init=1.0)).eval()
    missing, unexpected = spanned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("span_fraction" in name for name in missing)
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.allclose(plain(idx)[0], spanned(idx)[0], atol=1e-5)


def test_span_learns_from_the_loss_and_the_penalty():
    torch.manual_seed(0)
    model = GPT(SPAN)
    idx = torch.randint(0, 256, (2, 64))
    _, loss = model(idx, idx)
    (loss + 1e-3 * model.span_penalty()).backward()
    for span in model.spans():
        assert span.span_fraction.grad is not None and span.span_fraction.grad.abs().sum() > 0
    assert model.span_penalty().item() == pytest.approx(2 * 0.1 * 64, rel=1e-5)


def test_clamp_keeps_spans_in_range():
    model = GPT(SPAN)
    with torch.no_grad():
        model.spans()[0].span_fraction.fill_(-0.5)
        model.spans()[1].span_fraction.fill_(3.0)
    model.clamp_spans_()
    assert model.spans()[0].span_fraction.tolist() == [0.0, 0.0]
    assert model.spans()[1].span_fraction.tolist() == [1.0, 1.0]


def test_forward_reads_the_window_once_per_change_of_the_spans(monkeypatch):
    """The window is a host value: reading it from the device in every layer's forward is a
    sync per layer per micro-batch on a GPU. It is read when the spans change (optimizer step
    + clamp, checkpoint load) and then served from the cache."""
    torch.manual_seed(0)
    model = GPT(SPAN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    idx = torch.randint(0, 256, (2, 64))
    # (host reads made by the attention module: the optimizer makes its own)
    reads = host_reads_from(monkeypatch, attention.__file__)
    for _ in range(3):  # three steps of two micro-batches each
        for _ in range(2):
            _, loss = model(idx, idx)
            (loss - 10 * model.span_penalty()).backward()  # grow the spans
        optimizer.step()
        optimizer.zero_grad()
        model.clamp_spans_()
    assert len(reads) == 3 + 2  # one per step (all layers), plus the first forward's
    # And the cached window follows the spans: after the steps it is the learnt one.
    for span in model.spans():
        widest = span.spans().max().item()
        assert span.window() == min(math.ceil(widest + span.ramp), span.max_span)
        assert span.window() > 11  # grown from the initial ceil(0.1 * 64) + 4


def test_after_a_step_every_layers_window_comes_in_one_host_read(monkeypatch):
    """The loop clamps the spans after each step that moved them (model.clamp_spans_) and each
    layer's new window is a host value: read layer by layer it was a device sync per layer per
    clamp (48 on gpt2-xl). One read serves them all, the fused AdamW step included (it leaves
    the spans' version counter as it was: only the clamp marks them changed)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, n_layer=4, n_head=2, n_embd=32, attention_span=True,
                       span_ramp=4, span_init=0.1)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    idx = torch.randint(0, 256, (2, 64))
    model(idx, idx)  # (the first forward reads each layer's window: none was cached yet)
    reads = host_reads_from(monkeypatch, attention.__file__,
                            sys.modules[GPT.__module__].__file__)
    for step in range(4):  # four micro-batches, the optimizer stepping on every second
        _, loss = model(idx, idx)
        (loss - 10 * model.span_penalty()).backward()  # grow the spans
        if step % 2:
            optimizer.step()
            optimizer.zero_grad()
        model.clamp_spans_()
    monkeypatch.undo()
    assert len(reads) == 4  # one per clamp, whatever the layer count
    for span in model.spans():  # and each window is its own layer's new one
        widest = span.spans().max().item()
        assert span.window() == min(math.ceil(widest + span.ramp), span.max_span)
        assert span.window() > 11  # grown from the initial ceil(0.1 * 64) + 4


def test_loading_other_spans_refreshes_the_window():
    model, other = GPT(SPAN), GPT(SPAN)
    with torch.no_grad():
        for span in other.spans():
            span.span_fraction.fill_(0.5)
    before = [span.window() for span in model.spans()]
    model.load_state_dict(other.state_dict())
    assert before == [11, 11]  # ceil(0.1 * 64) + 4
    assert [span.window() for span in model.spans()] == [36, 36]  # 0.5 * 64 + 4


@pytest.mark.parametrize("config", [GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),
                                    SPAN], ids=["standard", "span"])
def test_incremental_decoding_with_a_cache_matches_the_full_forward(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        prefill, _ = model(idx[:, :25], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(25, 40)]
    incremental = torch.cat([prefill] + steps, dim=1)
    assert torch.allclose(full, incremental, atol=1e-5)
    if config.attention_span:
        # The cache holds only what a query can still see, not the whole history.
        window = max(span.window() for span in model.spans())
        assert all(layer.keys.size(2) <= window for layer in cache.layers)
        assert window < 40


@pytest.mark.parametrize("config", [GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),
                                    SPAN], ids=["standard", "span"])
def test_left_padded_batch_matches_each_prompt_alone(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 12)]
    width = max(len(p) for p in prompts)
    idx = torch.zeros(2, width, dtype=torch.long)
    real = torch.zeros(2, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt):] = prompt
        real[row, width - len(prompt):] = True
    positions = (real.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_cache()
        batched, _ = model(idx, cache=cache, key_is_real=real, positions=positions)
        # One decoding step for both rows, with the next position of each.
        next_tokens = torch.tensor([[7], [9]])
        real = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        stepped, _ = model(next_tokens, cache=cache, key_is_real=real,
                           positions=positions[:, -1:] + 1)
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.cat([prompt, next_tokens[row]]).unsqueeze(0))
            assert torch.allclose(batched[row, width - len(prompt):], alone[0, :-1], atol=1e-5)
            assert torch.allclose(stepped[row, 0], alone[0, -1], atol=1e-5)
        assert torch.isfinite(batched).all()  # padding rows never turn into NaN


@pytest.mark.parametrize("config", [GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),
                                    SPAN], ids=["standard", "span"])
def test_a_preallocated_cache_writes_in_place_and_decodes_as_the_growing_one(config):
    # The cache grew by torch.cat, a copy of every layer's keys and values per step (17% of a
    # 64-row static batch's decode on a CPU). With a capacity each step writes in place; a
    # learnt span keeps only its window, by copies as before (no buffers of the whole reach).
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 30, 12)]
    width, steps = 30, 20
    idx = torch.zeros(3, width, dtype=torch.long)
    real = torch.zeros(3, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt):] = prompt
        real[row, width - len(prompt):] = True
    tokens = torch.randint(0, 256, (3, steps))
    for capacity in (width + steps, width + 8):  # the second overruns: back to copies
        with torch.inference_mode():
            growing, fixed = model.new_cache(), model.new_cache(capacity)
            keep, mask, positions = torch.arange(3), real, (real.cumsum(1) - 1).clamp(min=0)
            step_input, previous = idx, None
            for t in range(steps):
                expected, _ = model(step_input, cache=growing, key_is_real=mask,
                                    positions=positions)
                got, _ = model(step_input, cache=fixed, key_is_real=mask, positions=positions)
                assert torch.equal(got, expected), (capacity, t)
                for a, b in zip(fixed.layers, growing.layers, strict=True):
                    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                pointers = [(layer.keys.untyped_storage().data_ptr(),
                             layer.values.untyped_storage().data_ptr()) for layer in fixed.layers]
                if config.attention_span:
                    window = max(span.window() for span in model.spans())
                    assert all(layer.keys.size(2) <= window for layer in fixed.layers)
                elif previous is not None and capacity == width + steps:
                    assert pointers == previous, f"step {t} reallocated the cache"
                previous = pointers
                if t == 10:  # a row finishes: both caches drop it (one copy, into new buffers)
                    keep = torch.tensor([0, 2])
                    growing.select(keep)
                    fixed.select(keep)
                    mask, positions, previous = mask[keep], positions[keep], None
                mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.bool)], dim=1)
                positions = positions[:, -1:] + 1
                step_input = tokens[keep, t:t + 1]


def test_cache_refuses_to_run_past_the_context():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    cache = model.new_cache()
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_a_span_model_exports_to_onnx_and_matches(tmp_path):
    """torch.export cannot branch on the learnt window (a host value): exporting takes the
    dense span path, exact for any window, so compressed span models deploy too."""
    import numpy as np
    import onnxruntime

    from orchestrator.compression.export import export_fp32_onnx

    torch.manual_seed(0)
    model = GPT(SPAN).eval()
    path = export_fp32_onnx(model, tmp_path / "span.onnx")
    idx = torch.randint(0, 256, (2, 40))
    got = onnxruntime.InferenceSession(str(path)).run(None, {"idx": idx.numpy()})[0]
    with torch.no_grad():
        expected = model(idx)[0].numpy()
    assert np.abs(got - expected).max() < 1e-4
