"""Continuous batching over a paged KV cache (orchestrator/serving/engine.py, paged.py):
outputs equal to each request decoded alone, rows joining and leaving at every step, chunked
prefill interleaved with decoding, admission bounded by free blocks, cancellation, capacity."""
import dataclasses
import itertools

import pytest
import torch

from orchestrator.serving import decode_kernel
from orchestrator.serving.engine import (CapacityError, ContinuousEngine, EngineLimits,
                                         check_request, kv_cache_bytes, run_to_completion)
from orchestrator.serving.generation import GenerationRequest, SamplingParams, generate
from orchestrator.serving.paged import BlockPool, first_of_run
from orchestrator.tokenizer import ByteTokenizer
from tests.tiny_gpt import (BLOCK, greedy, model, non_finite_from_token,  # noqa: F401
                            overflowing_from, reference_greedy, torch_on_one_thread)

# Small blocks and prefill chunks, so prompts cross blocks and are prefilled over several steps.
LIMITS = EngineLimits(max_rows=8, num_blocks=64, block_tokens=4, prefill_chunk_tokens=6)


def engine(model, limits: EngineLimits = LIMITS, tokenizer=None) -> ContinuousEngine:
    return ContinuousEngine(model, BLOCK, tokenizer or ByteTokenizer(), limits)


def seeded(prompt: bytes, max_tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(max_tokens, 0.9, 0.95, seed=seed))


def alone(model, request: GenerationRequest) -> tuple[str, tuple[int, ...], str]:
    return run_to_completion(engine(model), [request])[0]


def staggered(eng: ContinuousEngine, arrivals: dict[int, list[GenerationRequest]],
              seen: list | None = None) -> tuple[dict, list[int]]:
    """Add the requests arriving at each step number, step until all are done: the results
    by request key (step, index), and the rows that ran in each step (the running
    sequences of each step appended to `seen`)."""
    out, rows = {}, []
    step = 0
    while step <= max(arrivals) or not eng.idle:
        for i, request in enumerate(arrivals.get(step, [])):
            eng.add((step, i), request)
            out[(step, i)] = ["", (), ""]
        for key, chunk in eng.step():
            out[key][0] += chunk.text
            out[key][1] += chunk.tokens
            out[key][2] = chunk.finish_reason or out[key][2]
        rows.append(len(eng.running))
        if seen is not None:
            seen.extend(eng.running)
        step += 1
    return {k: tuple(v) for k, v in out.items()}, rows


def test_paged_generation_equals_the_naive_loop(model):
    prompts = [b"Hello", b"A much longer prompt than the first one", b"x"]
    out = run_to_completion(engine(model), [greedy(p, 12) for p in prompts])
    for prompt, (_, tokens, reason) in zip(prompts, out, strict=True):
        assert tokens == reference_greedy(model, prompt, 12)
        assert reason == "length"


def test_requests_joining_and_leaving_every_step_get_what_they_get_alone(model):
    # Requests arrive while others run (steps 0, 1, 3, 7, 9); short ones leave early, so rows
    # join and leave the running batch at many steps. Greedy and seeded outputs are exactly
    # those of each request decoded alone, and those of static batching.
    arrivals = {0: [greedy(b"The fox", 10), seeded(b"Serving", 14, seed=3)],
                1: [greedy(b"a", 3)],
                3: [greedy(b"A rather longer prompt that takes steps", 8),
                    seeded(b"zz", 6, seed=9)],
                7: [greedy(b"Late", 5)], 9: [seeded(b"Later still", 7, seed=1)]}
    eng = engine(model)
    out, rows = staggered(eng, arrivals)
    for step, requests in arrivals.items():
        for i, request in enumerate(requests):
            assert out[(step, i)] == alone(model, request), (step, i)
            assert out[(step, i)] == generate(model, [request], BLOCK)[0]
    changes = sum(a != b for a, b in zip(rows, rows[1:]))
    assert max(rows) >= 4 and changes >= 5, rows  # the batch really changed as it ran
    assert eng.free_blocks == LIMITS.num_blocks  # every block back


@pytest.mark.parametrize("use_decode_kernel", [True, False], ids=["kernel", "matmul-paths"])
def test_every_rows_logits_are_those_of_the_whole_sequence_recomputed(model, use_decode_kernel,
                                                                      monkeypatch):
    # At the logits, not the tokens (on these tiny models an error must flip an argmax to
    # change a token): every sampled row's logits are those of the model's forward pass over
    # its whole sequence so far, within fp32 rounding. Rows join at steps 0-9 and leave at
    # others; prompts of exactly one and two blocks of 4, one past each, and shorter, are
    # prefilled 3 tokens a step; one request fills the model's context, two stop after their
    # prefill (max_tokens 1); rows sit in lanes, other runs and scattered blocks (24 blocks:
    # the pool fragments).
    from orchestrator.serving import engine as engine_module

    limits = EngineLimits(max_rows=6, num_blocks=24, block_tokens=4, prefill_chunk_tokens=3)
    eng = engine(model, limits)
    eng.cache.use_decode_kernel = use_decode_kernel
    sampled = []
    sample = engine_module.sample_tokens
    monkeypatch.setattr(engine_module, "sample_tokens", lambda logits, *args, **kw:
                        sampled.append(logits) or sample(logits, *args, **kw))
    arrivals = {0: [(4, 9), (5, 3), (1, 1)], 1: [(8, 6), (10, BLOCK - 10)], 2: [(3, 12), (12, 1)],
                5: [(7, 20)], 9: [(16, 5), (17, 4)]}
    sequences, kinds, step = {}, set(), 0
    while step <= max(arrivals) or not eng.idle:
        for i, (length, max_tokens) in enumerate(arrivals.get(step, [])):
            prompt = tuple((7 * j + 3 * i + step) % 250 for j in range(length))
            eng.add((step, i), greedy(bytes(prompt), max_tokens))
            sequences[(step, i)] = list(prompt)
        sampled.clear()
        chunks = eng.step()
        kinds |= {"lane" if eng.cache.lane_of(s.first_block) is not None
                  else "run" if s.first_block is not None else "scattered" for s in eng.running}
        for (key, chunk), logits in zip(chunks, sampled[0] if chunks else [], strict=True):
            with torch.no_grad():
                expected = model(torch.tensor([sequences[key]]))[0][0, -1]
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=str(key))
            sequences[key] += chunk.tokens
        step += 1
    assert kinds == {"lane", "run", "scattered"}
    assert len(sequences[(1, 1)]) == BLOCK and eng.free_blocks == limits.num_blocks


def test_seeded_rows_do_not_depend_on_their_neighbours(model):
    request = seeded(b"The fox", 16, seed=7)
    crowded = run_to_completion(engine(model), [seeded(b"other", 16, seed=1), request,
                                                greedy(b"third one", 9)])
    assert crowded[1] == alone(model, request)
    assert crowded[0][1] != crowded[1][1]  # another seed, another sample


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(model):
    eng = engine(model, dataclasses.replace(LIMITS, prefill_chunk_tokens=5))
    eng.add("short", greedy(b"hi", 20))
    eng.step()  # "short" prefilled and decoding
    eng.add("long", greedy(b"y" * 40, 4))
    produced_by_short = []
    while any(s.key == "long" and s.pending and s.fed < 40 for s in eng.running) \
            or eng.waiting:
        chunks = dict(eng.step())
        produced_by_short.append("short" in chunks)
    # 40 prompt tokens at 5 per step: 8 steps of prefill, and "short" got a token in each.
    assert len(produced_by_short) >= 7 and all(produced_by_short)
    assert eng.stats.prefill_tokens == 2 + 40


def test_a_prompt_whose_last_chunk_is_one_token_counts_it_as_prefill(model):
    # 7 tokens in chunks of 6: the seventh was counted as a decode token (7 / 2 read 6 / 3)
    # and fed outside the step's prefill budget.
    eng = engine(model, dataclasses.replace(LIMITS, prefill_chunk_tokens=6))
    eng.add("a", greedy(b"1234567", 3))
    while not eng.idle:
        eng.step()
    assert (eng.stats.prefill_tokens, eng.stats.decode_tokens) == (7, 2)


def test_most_rows_counts_the_rows_of_a_step_that_finish_in_it(model):
    # It was taken after the step's finished rows had left: three one-token requests that
    # ran together in one step counted 0.
    eng = engine(model, dataclasses.replace(LIMITS, prefill_chunk_tokens=64))
    for key in range(3):
        eng.add(key, greedy(b"one token %d" % key, 1))
    assert len(eng.step()) == 3 and eng.idle
    assert eng.stats.most_rows == 3 and eng.stats.rows_per_step == {3: 1}


def test_admission_waits_for_free_blocks_and_never_drops_a_request(model):
    # Each request needs 8 + 12 - 1 = 19 positions = 5 blocks of 4; 12 blocks hold two.
    limits = EngineLimits(max_rows=8, num_blocks=12, block_tokens=4, prefill_chunk_tokens=64)
    eng = engine(model, limits)
    requests = [greedy(b"prompt-%d" % i, 12) for i in range(5)]
    for i, request in enumerate(requests):
        eng.add(i, request)
    running_counts, outputs = [], {i: () for i in range(5)}
    while not eng.idle:
        for key, chunk in eng.step():
            outputs[key] += chunk.tokens
        running_counts.append(len(eng.running))
        assert eng.free_blocks >= 0
    assert max(running_counts) <= 2  # bounded by blocks, not by max_rows (8)
    assert all(len(tokens) == 12 for tokens in outputs.values())  # every one ran, in full
    assert outputs == {i: alone(model, r)[1] for i, r in enumerate(requests)}
    assert eng.free_blocks == 12


def test_admission_is_first_come_first_in(model):
    # A big request at the head waits for blocks; a small one behind it does not overtake it
    # (it would starve the big one under a steady stream of small ones).
    limits = EngineLimits(max_rows=8, num_blocks=10, block_tokens=4, prefill_chunk_tokens=64)
    eng = engine(model, limits)
    eng.add("first", greedy(b"a" * 10, 20))  # 29 positions: 8 blocks
    eng.step()
    eng.add("big", greedy(b"b" * 10, 20))  # 8 blocks: waits
    eng.add("small", greedy(b"c", 2))  # 1 block: would fit, waits behind "big"
    eng.step()
    assert [key for key, _, _ in eng.waiting] == ["big", "small"]
    order = []
    while not eng.idle:
        eng.step()
        order += [q for q, _ in eng.queue_seconds]
    assert order == ["big", "small"]


def test_running_rows_are_never_moved_or_copied_as_the_batch_changes(model):
    eng = engine(model)
    eng.add("stay", greedy(b"stays for a while", 30))
    eng.step()
    (stay,) = eng.running
    blocks = list(stay.blocks)
    storage = eng.cache.layers[0].data_ptr()
    for step in range(20):
        if step % 3 == 0:
            eng.add(step, greedy(b"visitor %d" % step, 2 + step % 4))
        eng.step()
        assert stay.blocks == blocks  # its block table is never changed
    assert eng.cache.layers[0].data_ptr() == storage  # the pool is never reallocated
    assert eng.stats.admitted == 8 and eng.stats.finished >= 5


def test_cancelling_frees_the_row_and_its_blocks_at_once(model):
    eng = engine(model)
    eng.add("gone", greedy(b"client left", 40))
    eng.add("stays", greedy(b"client stays", 5))
    eng.step()
    assert eng.free_blocks < LIMITS.num_blocks
    assert eng.cancel("gone")
    assert [s.key for s in eng.running] == ["stays"]
    assert eng.free_blocks == LIMITS.num_blocks - eng.cache.blocks_for(12 + 5 - 1)
    eng.add("queued", greedy(b"q", 3))
    assert eng.cancel("queued") and not eng.waiting
    assert not eng.cancel("unknown")
    while not eng.idle:
        assert "gone" not in dict(eng.step())
    assert eng.free_blocks == LIMITS.num_blocks and eng.stats.cancelled == 2


def test_requests_that_can_never_fit_are_refused_naming_the_limit(model):
    small = engine(model, EngineLimits(max_rows=4, num_blocks=4, block_tokens=4,
                                       prefill_chunk_tokens=8))
    # (the need is the positions fed, 17; the largest max_tokens that fits, 7, is named)
    with pytest.raises(CapacityError, match=r"need 17 positions of KV cache; this replica's "
                       r"cache holds 16 \(setting kv_cache_tokens\); at most max_tokens 7 fits"):
        small.add("x", greedy(b"0123456789", 8))  # 17 positions fed > 16
    small.add("ok", greedy(b"0123456789", 7))  # 16: fits exactly
    with pytest.raises(CapacityError, match="maximum context length is 64"):
        engine(model).add("y", greedy(b"z" * 60, 5))
    assert len(small.waiting) == 1


def test_a_prompt_alone_over_the_limit_is_refused_naming_the_prompt():
    # The replica's 400 said param "max_tokens" and "and max_tokens (1) need ..." for a prompt
    # no max_tokens could make fit.
    cache_of_64 = EngineLimits(max_rows=4, num_blocks=4, block_tokens=16)
    with pytest.raises(CapacityError) as refused:
        check_request(GenerationRequest((1,) * 100, SamplingParams(1)), 512, cache_of_64, 257)
    assert refused.value.param == "prompt" and "max_tokens" not in str(refused.value)
    assert str(refused.value).startswith("the prompt (100 tokens) is over the KV cache alone")
    with pytest.raises(CapacityError) as refused:  # the prompt fits: max_tokens is at fault
        check_request(GenerationRequest((1,) * 60, SamplingParams(10)), 512, cache_of_64, 257)
    assert refused.value.param == "max_tokens" and "at most max_tokens 5 fits" in \
        str(refused.value)
    # Over the model's context (after a hot reload to a shorter one), the same.
    for prompt, param in ((64, "prompt"), (60, "max_tokens")):
        with pytest.raises(CapacityError, match="maximum context length is 64") as refused:
            check_request(GenerationRequest((1,) * prompt, SamplingParams(5)), 64,
                          EngineLimits(), 257)
        assert refused.value.param == param


def test_a_resumed_request_over_the_kv_cache_names_the_clients_prompt_and_delivered():
    # The tokens a stream delivered before its replica was lost were counted as its prompt:
    # "the prompt (323 tokens) is over the KV cache alone ... shorten it" to a 5-token prompt.
    resumed = GenerationRequest((1,) * 5, SamplingParams(400)).resumed_after((7,) * 318)
    with pytest.raises(CapacityError) as refused:
        check_request(resumed, 1024, EngineLimits(max_rows=4, num_blocks=4, block_tokens=16),
                      257)
    assert refused.value.param == "max_tokens"
    assert str(refused.value).startswith("the prompt (5 tokens) and max_tokens (400) need 404 "
                                         "positions of KV cache"), str(refused.value)
    assert "318 of the completion's tokens were already delivered" in str(refused.value)


def test_a_token_the_model_cannot_read_is_refused_without_failing_the_others(model):
    # After a hot reload to a smaller vocabulary a prompt encoded for the old model may come
    # in: refused alone (its embedding lookup used to fail the step of every row).
    eng = engine(model)
    eng.add("good", greedy(b"Hello", 6))
    produced = [chunk for _, chunk in eng.step()]
    vocab = model.config.vocab_size
    with pytest.raises(CapacityError, match=f"token id {vocab} is not one this model reads"):
        eng.add("bad", GenerationRequest((72, vocab), SamplingParams(3, 0.0)))
    while not eng.idle:
        produced += [chunk for _, chunk in eng.step()]
    assert sum(len(c.tokens) for c in produced) == 6
    assert produced[-1].finish_reason == "length"


@pytest.mark.parametrize("num_blocks", [64, 50, 4])  # whole lanes, a part one, under one
def test_the_kv_cache_size_is_known_before_it_is_allocated(model, num_blocks):
    limits = dataclasses.replace(LIMITS, num_blocks=num_blocks)
    eng = engine(model, limits)
    run_to_completion(eng, [greedy(b"Hello", 4)])  # every layer has written
    allocated = sum(t.numel() * t.element_size() for t in eng.cache.layers)
    assert kv_cache_bytes(model, limits) == allocated
    # Exactly its blocks: rounded up to whole lanes (contexts), a cache set to 16 positions
    # allocated 64, and 200 allocated 256, positions never handed out.
    per_position = allocated // eng.cache.slots
    assert allocated == num_blocks * LIMITS.block_tokens * per_position


def test_resumed_requests_continue_exactly(model):
    request = GenerationRequest(tuple(b"The fox"), SamplingParams(16, 0.8, seed=11))
    _, tokens, _ = alone(model, request)
    _, rest, reason = alone(model, request.resumed_after(tokens[:6]))
    assert tokens[:6] + rest == tokens and reason == "length"


def test_stops_and_the_tokenizers_end_of_text_end_a_row(model):
    full, tokens, _ = alone(model, greedy(b"Hello", 20))
    stop = full[5:7]
    text, _, reason = alone(model, greedy(b"Hello", 20, stop=(stop,)))
    assert reason == "stop" and text == full[:full.index(stop)]

    sampled = seeded(b"Hello", 20, seed=3)
    _, tokens, _ = alone(model, sampled)
    end = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])

    class EndsThere(ByteTokenizer):
        eos_id = tokens[end]

    out = run_to_completion(engine(model, tokenizer=EndsThere()), [sampled])
    assert out[0][1] == tokens[:end + 1] and out[0][2] == "stop"


def test_multi_byte_tokens_decode_across_token_boundaries():
    # A tokenizer whose tokens carry several bytes, one ending inside a character.
    class Pairs(ByteTokenizer):
        def token_bytes(self, token_id: int) -> bytes:
            return {0: b"\xe2\x82", 1: b"\xacA"}.get(token_id % 2, b"")

    from orchestrator.serving.generation import Row

    row = Row(greedy(b"x", 2), Pairs())
    assert row.accept(0).text == "" and row.accept(1).text == "\u20acA"


def test_block_pool_hands_out_each_block_once_in_runs_where_it_can():
    pool = BlockPool(8)
    a, b = pool.allocate(2), pool.allocate(3)
    assert (a, b) == ([0, 1], [2, 3, 4]) and pool.free == 3  # runs of adjacent blocks
    with pytest.raises(MemoryError):
        pool.allocate(4)
    pool.release(a)
    # Free: 0, 1, 5, 6, 7. A run of 3 exists (5-7); a run of 4 does not: scattered blocks.
    assert pool.allocate(3) == [5, 6, 7]
    pool.release([5, 6, 7])
    assert pool.allocate(4) == [0, 1, 5, 6] and pool.free == 1
    assert first_of_run([5, 6, 7]) == 5 and first_of_run([0, 1, 5, 6]) is None


@pytest.mark.parametrize("use_decode_kernel", [True, False], ids=["kernel", "matmul-paths"])
def test_rows_in_lanes_runs_and_scattered_blocks_all_decode_as_alone(model, use_decode_kernel,
                                                                    monkeypatch):
    # Fragment the pool so that rows of every placement decode side by side: rows at a lane
    # start, rows in other runs of blocks and rows in scattered blocks. Through the CPU's
    # decode kernel, each walks its own block table (a scattered row as several runs);
    # without it, as on CUDA, these are the three matrix-product paths: the lanes' view
    # together, runs in place one by one, scattered rows through a gather. Step 0 fills all 24 blocks
    # (one whole lane of 16 blocks, and 8 that make no lane): the first request takes the
    # lane start, the rest runs after it; four 1-block rows end after 2 tokens, so at step 3
    # the free blocks are holes and a 3-block request gets them scattered.
    limits = EngineLimits(max_rows=12, num_blocks=24, block_tokens=4, prefill_chunk_tokens=64)
    eng = engine(model, limits)
    eng.cache.use_decode_kernel = use_decode_kernel
    kernel_calls = []
    real_attend = decode_kernel.attend
    monkeypatch.setattr(decode_kernel, "attend",
                        lambda *args: kernel_calls.append(1) or real_attend(*args))
    arrivals = {0: [greedy(b"a%d" % i, 2 + 6 * (i % 2)) for i in range(8)]
                + [greedy(b"filler", 27)],
                3: [greedy(b"scattered", 4), seeded(b"zz", 3, seed=5)],
                12: [greedy(b"late", 9)]}
    seen: list = []
    out, _ = staggered(eng, arrivals, seen)
    assert eng.stats.admitted == 12
    kinds = {"lane" if eng.cache.lane_of(s.first_block) is not None
             else "run" if s.first_block is not None else "scattered" for s in seen}
    assert kinds == {"lane", "run", "scattered"}
    assert bool(kernel_calls) == use_decode_kernel  # the path named is the path taken
    for step, requests in arrivals.items():
        for i, request in enumerate(requests):
            assert out[(step, i)] == alone(model, request), (step, i)


def test_block_pool_puts_a_request_at_a_free_lane_start_first():
    pool = BlockPool(20, lane_blocks=8)  # lanes start at 0 and 8 (16-19: no whole lane)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [8, 9]  # lane 1's start, not block 3
    assert pool.allocate(4) == [3, 4, 5, 6]  # no lane start free: first fit
    assert pool.allocate(5) == [10, 11, 12, 13, 14]
    assert pool.free == 6  # blocks 7, 15-19
    pool.release([0, 1, 2])
    assert pool.allocate(2) == [0, 1]  # the lane start is free again


def test_the_late_requests_really_got_scattered_blocks():
    pool = BlockPool(40)
    held = [pool.allocate(3) for _ in range(8)]  # 24 blocks in runs
    for blocks in held[::2]:
        pool.release(blocks)  # holes of 3
    pool.allocate(16)  # the tail run 24-39
    assert first_of_run(pool.allocate(5)) is None  # no run of 5 left: scattered


def test_decoding_rows_are_grouped_by_length_to_limit_padding():
    from orchestrator.serving.paged import decode_groups

    lengths = [10, 300, 12, 290, 150, 11, 1]
    groups = decode_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[i] for i in group) <= 1.25 * min(lengths[i] for i in group)
    assert len(groups) == 4  # {300, 290}, {150}, {12, 11, 10}, {1}


def test_an_engine_whose_decode_kernel_cannot_compile_decodes_through_matrix_products(
        model, monkeypatch):
    def broken() -> None:
        raise OSError("No space left on device")  # numba writing its cache

    monkeypatch.setattr(decode_kernel, "warm_up", broken)
    eng = engine(model)
    assert not eng.cache.use_decode_kernel
    monkeypatch.undo()
    request = greedy(b"still served", 6)
    assert run_to_completion(eng, [request])[0] == alone(model, request)


def test_a_model_with_more_ids_than_its_tokenizer_never_emits_one_it_cannot_decode():
    # A sampled id past the tokenizer's failed decoding inside the step, and with it every
    # request of the batch, in both batching modes
    import torch

    from orchestrator.config import TrainConfig
    from orchestrator.training.model import GPT, GPTConfig

    torch.manual_seed(0)
    wide = GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=64),
                                           vocab_size=300)).eval()
    with torch.no_grad():  # the ids the byte tokenizer lacks are the likeliest
        wide.lm_head.weight[257:] += 5.0 * wide.lm_head.weight[257:].sign()
    tokenizer = ByteTokenizer()
    requests = [GenerationRequest(tuple(b"hello"), SamplingParams(20, temperature=0.0)),
                GenerationRequest(tuple(b"world"), SamplingParams(20, temperature=1.0, seed=3))]
    engine = ContinuousEngine(wide, 64, tokenizer, EngineLimits.sized_for(4, 64, 16, 256))
    for i, request in enumerate(requests):
        engine.add(i, request)
    while not engine.idle:
        engine.step()  # raised ValueError: token id ... is outside the byte tokenizer's
    assert len(generate(wide, requests, 64, tokenizer)) == 2


def test_the_engines_refusals_over_the_context_or_cache_carry_openais_code():
    # The ingress's 400s had code context_length_exceeded, the replica's own (a request
    # reaching it after a reload shrank the context or the cache) had none.
    cache_of_64 = EngineLimits(max_rows=4, num_blocks=4, block_tokens=16)
    for prompt, max_tokens, context in ((100, 1, 512), (60, 10, 512), (64, 5, 64), (60, 5, 64)):
        with pytest.raises(CapacityError) as refused:
            check_request(GenerationRequest((1,) * prompt, SamplingParams(max_tokens)), context,
                          cache_of_64, 257)
        assert refused.value.code == "context_length_exceeded", str(refused.value)
    with pytest.raises(CapacityError) as refused:  # not a length: no code
        check_request(GenerationRequest((300,), SamplingParams(1)), 64, cache_of_64, 257)
    assert refused.value.code is None


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_row_whose_logits_go_non_finite_ends_with_an_error_and_the_others_run_on(
        model, temperature):
    # A row whose logits were NaN (an fp16 overflow, a position past training's) sampled from
    # NaN probabilities: it decoded token 0 or garbage to its max_tokens, and nobody knew.
    # Its 23-token prompt reaches position 30 after 8 tokens; the short row never does.
    doomed = GenerationRequest(tuple(b"a prompt of twenty-four"),
                               SamplingParams(20, temperature, seed=5))
    short = seeded(b"hi", 12, seed=7)
    eng = engine(model)
    chunks = {"doomed": [], "short": []}
    with overflowing_from(model, 30):
        eng.add("doomed", doomed)
        eng.add("short", short)
        while not eng.idle:
            for key, chunk in eng.step():
                chunks[key].append(chunk)
    short_tokens = sum((c.tokens for c in chunks["short"]), ())
    assert (short_tokens, chunks["short"][-1].finish_reason) == alone(model, short)[1:]
    *tokens, failed = chunks["doomed"]
    assert (failed.finish_reason, failed.tokens, failed.text) == ("error", (), "")
    assert "NaN or infinite" in failed.error and "position 30" in failed.error, failed.error
    assert sum((c.tokens for c in tokens), ()) == alone(model, doomed)[1][:8]
    assert all(c.error is None for c in tokens + chunks["short"])
    assert eng.free_blocks == LIMITS.num_blocks  # its blocks were freed with it
    assert (eng.stats.failed, eng.stats.finished) == (1, 1)


@pytest.mark.parametrize("use_decode_kernel", [True, False], ids=["kernel", "matmul-paths"])
def test_a_request_given_the_blocks_of_one_that_failed_decodes_as_alone(model,
                                                                        use_decode_kernel):
    # The failed row's keys and values past its overflow are NaN, and its blocks went back to
    # the pool holding them. The matrix-product paths (CUDA, half precision) attend a lane
    # row over every lane's longest length, its unwritten positions masked: a masked NaN
    # still made its softmax NaN, and the next request given that lane failed as well, blamed
    # for the other's overflow. "after" takes the freed lane 0, "long" lane 1 past position 30.
    eng = engine(model, dataclasses.replace(LIMITS, prefill_chunk_tokens=64))
    eng.cache.use_decode_kernel = use_decode_kernel
    with overflowing_from(model, 30):
        eng.add("doomed", greedy(b"a prompt of twenty-four", 20))
        while not eng.idle:
            eng.step()
    after = greedy(b"hi", 8)
    eng.add("after", after)
    eng.add("long", greedy(b"a much longer prompt, forty tokens long.", 10))
    out, first_blocks = {"after": ["", (), ""], "long": ["", (), ""]}, {}
    while not eng.idle:
        for key, chunk in eng.step():
            first_blocks.update((s.key, s.blocks[0]) for s in eng.running)
            assert chunk.error is None, (key, chunk.error)
            out[key][1] += chunk.tokens
            out[key][2] = chunk.finish_reason or out[key][2]
    assert first_blocks == {"after": 0, "long": 16}  # (the two lanes' starts)
    assert (out["after"][1], out["after"][2]) == alone(model, after)[1:]
    assert (eng.stats.failed, eng.stats.finished) == (1, 2)


@pytest.mark.parametrize("use_decode_kernel", [True, False], ids=["kernel", "matmul-paths"])
def test_a_row_whose_logits_go_non_finite_fails_alone_not_the_rows_sharing_its_lane(
        model, use_decode_kernel):
    # Two lanes of 16 blocks. "short" takes lane 0's start, "long" lane 1's; "doomed", added
    # once they decode, gets the blocks after "short" in lane 0, and NaN keys and values from
    # its first position (slot 16 of lane 0) on. The matrix-product paths attend the lane rows
    # over every lane up to the longest row ("long", past 40), "short"'s positions past its
    # own masked: 0 x NaN made its output NaN, and "short" failed with "doomed" (from the
    # doomed prompt's first chunk on): an innocent request given a 500.
    poison = ord("~")
    limits = dataclasses.replace(LIMITS, num_blocks=32)
    short, long = greedy(b"hi", 12), greedy(b"a much longer prompt, forty tokens long.", 12)

    def run(doomed: GenerationRequest | None) -> tuple[dict, ContinuousEngine, dict]:
        eng = engine(model, limits)
        eng.cache.use_decode_kernel = use_decode_kernel
        chunks, first_blocks = {"short": [], "long": [], "doomed": []}, {}
        eng.add("short", short)
        eng.add("long", long)
        with non_finite_from_token(model, poison):
            while not eng.idle:
                if doomed is not None and eng.stats.steps == 8:  # both decode by then
                    eng.add("doomed", doomed)
                for key, chunk in eng.step():
                    chunks[key].append(chunk)
                first_blocks.update((s.key, s.blocks[0]) for s in eng.running)
        return chunks, eng, first_blocks

    without, _, _ = run(None)
    chunks, eng, first_blocks = run(greedy(b"~ overflows", 6))
    assert first_blocks == {"short": 0, "long": 16, "doomed": 4}  # (lane 0: blocks 0-15)
    for key in ("short", "long"):
        assert all(c.error is None for c in chunks[key]), (key, chunks[key][-1].error)
        assert chunks[key] == without[key]  # token for token, as if "doomed" never came
    assert [c.finish_reason for c in chunks["doomed"]] == ["error"]
    assert "NaN or infinite" in chunks["doomed"][0].error
    assert (eng.stats.failed, eng.stats.finished) == (1, 2)
    assert eng.free_blocks == limits.num_blocks


@pytest.mark.parametrize("use_decode_kernel", [True, False], ids=["kernel", "matmul-paths"])
def test_a_prompt_token_fed_alone_beside_a_neighbours_overflow_does_not_poison_its_row(
        model, use_decode_kernel):
    # A prefill chunk of one token that does not end its prompt (the step's prefill budget
    # had one token left) takes the decoding rows' attention, which on the matrix-product
    # paths reads its lane masked up to the step's longest row. "doomed" (blocks 17-19, lane
    # 1, after "x") holds NaN keys from its first chunk on; "victim", given lane 1's start
    # when "x" left, is fed one token of "hi" beside doomed's last chunk. Not sampled, its
    # row was never recomputed: its keys past layer 0 kept the NaN, and it failed a step
    # later, alone, as if it had overflowed.
    limits = dataclasses.replace(LIMITS, num_blocks=32)
    arrivals = {0: [("long", greedy(b"ab", 60)), ("x", greedy(b"x", 4))],
                3: [("doomed", greedy(b"~ overflows", 2))], 4: [("victim", greedy(b"hi", 3))]}

    def run(keys: set[str]) -> tuple[dict, dict]:
        eng = engine(model, limits)
        eng.cache.use_decode_kernel = use_decode_kernel
        chunks, blocks = {key: [] for key in keys}, {}
        with non_finite_from_token(model, ord("~")):
            for step in itertools.count():
                if step > max(arrivals) and eng.idle:
                    return chunks, blocks
                for key, request in arrivals.get(step, []):
                    if key in keys:
                        eng.add(key, request)
                for key, chunk in eng.step():
                    chunks[key].append(chunk)
                blocks.update((s.key, s.blocks[0]) for s in eng.running)

    without, _ = run({"long", "x", "victim"})
    chunks, first_blocks = run({"long", "x", "doomed", "victim"})
    assert first_blocks == {"long": 0, "x": 16, "doomed": 17, "victim": 16}
    assert [c.finish_reason for c in chunks["doomed"]] == ["error"]
    for key in ("long", "x", "victim"):
        assert all(c.error is None for c in chunks[key]), (key, chunks[key][-1].error)
        assert chunks[key] == without[key]  # token for token, as if "doomed" never came


def test_a_request_cancelled_while_its_prompt_overflows_leaves_no_nan_in_the_cache(model):
    # Its prompt's keys and values hold the NaN before it samples (and fails, its blocks
    # zeroed): cancelled then (the client left), its blocks went back unzeroed, and on the
    # matrix-product paths every row reading them masked (its lane-mate here, "short") was
    # recomputed alone at every step after, twice the work, until the blocks were written over.
    eng = engine(model, dataclasses.replace(LIMITS, num_blocks=32))
    eng.cache.use_decode_kernel = False
    eng.add("short", greedy(b"hi", 30))
    with non_finite_from_token(model, ord("~")):
        while eng.stats.steps < 2:  # "short" decodes
            eng.step()
        eng.add("doomed", greedy(b"~" + b"x" * 30, 2))
        eng.step()  # the doomed prompt's first chunk: NaN from its first position
        assert "doomed" in {s.key for s in eng.running} and eng.cancel("doomed")
    assert all(torch.isfinite(layer).all() for layer in eng.cache.layers if layer is not None)
