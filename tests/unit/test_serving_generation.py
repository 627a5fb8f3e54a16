"""Batched KV-cache generation: equal to decoding each prompt alone without a cache, per-row
sampling independent of the batch, stops, budgets and resumption."""
import pytest
import torch

from orchestrator.serving.generation import (BatchGeneration, GenerationRequest,
                                             SamplingParams, generate, plan_groups,
                                             sample_tokens)
from tests.tiny_gpt import (BLOCK, greedy, model, overflowing_from, reference_greedy,  # noqa: F401
                            torch_on_one_thread)


def test_batched_left_padded_cached_generation_equals_the_naive_loop(model):
    prompts = [b"Hello", b"A much longer prompt than the first", b"x"]
    out = generate(model, [greedy(p, 12) for p in prompts], BLOCK)
    for prompt, (_, tokens, reason) in zip(prompts, out, strict=True):
        assert tokens == reference_greedy(model, prompt, 12)
        assert reason == "length"


def test_greedy_is_deterministic_and_independent_of_the_batch(model):
    alone = generate(model, [greedy(b"The fox", 10)], BLOCK)[0]
    again = generate(model, [greedy(b"The fox", 10)], BLOCK)[0]
    crowded = generate(model, [greedy(b"Something else entirely", 10), greedy(b"The fox", 10),
                               greedy(b"z", 3)], BLOCK)[1]
    assert alone == again == crowded


def test_seeded_sampling_is_reproducible_and_per_row(model):
    def sampled(seed):
        return GenerationRequest(tuple(b"The fox"), SamplingParams(20, 0.9, 0.95, seed=seed))

    alone = generate(model, [sampled(7)], BLOCK)[0]
    in_batch = generate(model, [sampled(1), sampled(7), greedy(b"other", 5)], BLOCK)
    assert in_batch[1] == alone
    assert in_batch[0][1] != alone[1]  # another seed, another sample
    unseeded = {generate(model, [GenerationRequest(tuple(b"The fox"),
                                                   SamplingParams(20, 1.0))], BLOCK)[0][1]
                for _ in range(3)}
    assert len(unseeded) > 1


def test_seeds_that_differ_above_32_bits_or_in_sign_sample_differently(model):
    # torch's CPU generator keeps only a seed's low 32 bits: seeds 1 and 2**32 + 1 (and -1
    # and 2**32 - 1) drew the same numbers, so two int64 seeds gave the same completion.
    def sampled(seed):
        return GenerationRequest(tuple(b"The fox"), SamplingParams(20, 1.0, seed=seed))

    for a, b in ((1, 2 ** 32 + 1), (-1, 2 ** 32 - 1), (0, -(2 ** 63)), (5, -5)):
        first, second = generate(model, [sampled(a), sampled(b)], BLOCK)
        assert first[1] != second[1], (a, b)
    assert generate(model, [sampled(-(2 ** 63))], BLOCK) == \
        generate(model, [sampled(-(2 ** 63))], BLOCK)  # still reproducible


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1e-6, 1.0, 1.0])
    uniform = torch.tensor([0.99, 0.99, 0.0, 0.9999])
    tokens = sample_tokens(logits, temperature, top_p, uniform).tolist()
    assert tokens[0] == 1  # temperature 0: argmax
    assert tokens[1] == 1  # top_p ~ 0 keeps only the most likely token
    assert tokens[2] == 1  # u = 0 picks the first of the sorted distribution
    assert tokens[3] == 0  # u -> 1 reaches the least likely token
    # The empirical distribution follows softmax(logits / T).
    torch.manual_seed(0)
    n = 20000
    draws = sample_tokens(logits[:1].expand(n, 4), torch.full((n,), 1.0), torch.ones(n),
                          torch.rand(n))
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.02)


def test_top_p_one_keeps_the_whole_vocabulary():
    # On 32,000 tokens the fp32 running mass reaches 1.0 hundreds of tokens before the end;
    # top_p 1 (OpenAI's "no nucleus cut") must still let a draw near u = 1 reach that tail.
    logits = torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)) * 3
    sorted_probs, order = torch.softmax(logits, -1).sort(descending=True)
    tail = (sorted_probs.cumsum(-1) - sorted_probs >= 1.0)[0]
    assert tail.sum() > 100, "this distribution no longer reaches 1.0 early in fp32"
    token = sample_tokens(logits, torch.ones(1), torch.ones(1), torch.tensor([1 - 2 ** -24]))
    rank = (order[0] == token).nonzero().item()
    assert tail[rank], f"picked rank {rank}; the tail starts at {tail.nonzero()[0].item()}"


def sorted_inverse_cdf(logits, temperature, top_p, uniform):
    """Sampling the slow obvious way: every row's whole vocabulary sorted, cut to top_p, its
    CDF inverted at the row's draw (times the nucleus's mass; with top_p >= 1, the whole
    mass, probs.sum(); past the end: the last token of any probability)."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-6).unsqueeze(1), -1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = torch.nn.functional.pad(sorted_probs.cumsum(-1)[:, :-1], (1, 0))
    kept = (before < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
    kept[:, 0] = True
    cdf = (sorted_probs * kept).cumsum(-1)
    total = torch.where(top_p >= 1, probs.sum(-1), cdf[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cdf, uniform.unsqueeze(1) * total).clamp(
        max=(sorted_probs > 0).sum(-1, keepdim=True) - 1)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


def test_sampling_sorts_a_whole_vocabulary_only_for_draws_past_its_most_likely_tokens(
        monkeypatch):
    # Every row sorted its whole vocabulary at every step: with 32,000 tokens, 64 rows at
    # temperature 1 (OpenAI's default) took 0.6-0.8 s a step in the sort alone against
    # 0.1-0.15 s for the forward pass (2-core CPU). The tokens drawn are the same.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=g) * 8  # peaked, as a trained model's are
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.5] * 16)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.0] * 16)
    uniform = torch.rand(64, generator=g)
    uniform[:2] = torch.tensor([1 - 2 ** -24, 0.0])  # row 0's draw reaches the tail
    sorted_rows = []
    real_sort = torch.Tensor.sort

    def sort(self, *args, **kwargs):
        sorted_rows.append(self.shape[0])
        return real_sort(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "sort", sort)
    tokens = sample_tokens(logits, temperature, top_p, uniform)
    monkeypatch.undo()
    assert sum(sorted_rows) == 1, sorted_rows  # row 0 only
    assert torch.equal(tokens, sorted_inverse_cdf(logits, temperature, top_p, uniform))
    flat = logits / 8  # most of the mass past the first tokens: those rows sort it all
    assert torch.equal(sample_tokens(flat, temperature, top_p, uniform),
                       sorted_inverse_cdf(flat, temperature, top_p, uniform))


def test_a_nucleus_ending_at_the_sorted_heads_last_token_keeps_what_a_whole_sort_keeps(
        monkeypatch):
    # top_p equal to the mass of the 256 most likely tokens: the whole sort's mass before token
    # 257, taken as (its running mass - its probability), rounded below top_p and kept it,
    # while the head ended the nucleus at 256; the draw nearest 1 then picked another token.
    from orchestrator.serving import generation
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 2000, generator=g) * 2
    head = torch.softmax(logits, -1).sort(-1, descending=True)[0][:, :generation.SORTED_HEAD]
    top_p, temperature = head.cumsum(-1)[:, -1], torch.ones(1)
    uniform = torch.tensor([1 - 2 ** -24])
    tokens = sample_tokens(logits, temperature, top_p, uniform)
    monkeypatch.setattr(generation, "SORTED_HEAD", 10 ** 6)  # every row sorts it all
    assert torch.equal(tokens, sample_tokens(logits, temperature, top_p, uniform))


def test_top_p_one_draws_at_the_sorted_heads_edge_pick_what_a_whole_sort_picks(monkeypatch):
    # top_p >= 1 (the default): the head's draw was u * probs.sum(), the whole sort's
    # u * its sorted running mass, which differ in the last bits: a draw near the head's mass
    # (or, on a peaked distribution, within ~1e-6 of 1) picked another token one way than the
    # other (1,724 of 24,300 such draws). The total is now the same number both ways.
    from orchestrator.serving import generation
    logits, uniform = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        row = torch.randn(4096, generator=g) * (2, 4, 8)[seed % 3]
        head = torch.softmax(row, -1).topk(generation.SORTED_HEAD)[0].cumsum(-1)[-1].item()
        for k in range(-12, 13):  # draws a few ulps either side of the head's mass
            logits.append(row)
            uniform.append(min(head + k * 2 ** -24, 1 - 2 ** -24))
    logits, uniform = torch.stack(logits), torch.tensor(uniform)
    temperature, top_p = torch.ones(len(uniform)), torch.ones(len(uniform))
    tokens = sample_tokens(logits, temperature, top_p, uniform)
    monkeypatch.setattr(generation, "SORTED_HEAD", 10 ** 6)  # every row sorts it all
    whole = sample_tokens(logits, temperature, top_p, uniform)
    assert torch.equal(tokens, whole), (tokens != whole).nonzero().squeeze(1).tolist()
    assert torch.equal(whole, sorted_inverse_cdf(logits, temperature, top_p, uniform))


def test_a_draw_past_the_sorted_running_mass_never_picks_a_token_of_no_probability():
    # (the total of a top_p >= 1 row is probs.sum(), which may round above the sorted running
    # mass: a draw near 1 then lands past its end, and must not take the last sorted token
    # where the softmax underflowed to 0)
    logits = torch.cat([torch.zeros(1, 300), torch.full((1, 1000), -200.0)], 1)
    probs = torch.softmax(logits, -1)
    assert (probs == 0).sum() == 1000
    uniform = torch.tensor([1 - 2 ** -24])
    token = sample_tokens(logits, torch.ones(1), torch.ones(1), uniform).item()
    assert probs[0, token] > 0, token


def test_stop_sequences_end_a_row_early(model):
    full = generate(model, [greedy(b"Hello", 20)], BLOCK)[0][0]
    stop = full[5:7]
    assert stop, "the reference completion is too short to pick a stop from"
    text, tokens, reason = generate(model, [greedy(b"Hello", 20, stop=(stop,))], BLOCK)[0]
    assert reason == "stop" and text == full[:full.index(stop)]
    assert len(tokens) < 20


def test_a_finished_row_leaves_the_batch(model):
    batch = BatchGeneration(model, [greedy(b"ab", 2), greedy(b"cd", 5)], BLOCK)
    steps = []
    while not batch.done:
        steps.append(batch.step())
    assert len(steps) == 5
    assert [c is not None for c in steps[2]] == [False, True]  # row 0 done after 2 tokens
    assert steps[1][0].finish_reason == "length" and steps[4][1].finish_reason == "length"
    assert all(len(c.tokens) == 1 for step in steps for c in step if c is not None)


def test_a_cancelled_row_stops_and_the_others_decode_as_before(model):
    prompts = [b"Hello", b"A longer prompt", b"x"]
    batch = BatchGeneration(model, [greedy(p, 12) for p in prompts], BLOCK)
    first = batch.step()
    batch.cancel(1)  # its client left after one token
    tokens: list[tuple[int, ...]] = [c.tokens for c in first]
    steps = 1
    while not batch.done:
        step = batch.step()
        steps += 1
        assert step[1] is None  # never decoded again
        tokens = [t + c.tokens if c is not None else t for t, c in zip(tokens, step)]
    assert steps == 12 and len(tokens[1]) == 1
    for i in (0, 2):  # the padded cache kept the right rows
        assert tokens[i] == reference_greedy(model, prompts[i], 12)
    before_any = BatchGeneration(model, [greedy(b"ab", 4), greedy(b"c", 4)], BLOCK)
    before_any.cancel(0)
    before_any.cancel(1)
    assert before_any.done


def test_groups_keep_padding_within_the_context():
    long_prompt = greedy(b"x" * 60, 4)  # 60 + 4 = 64: fits alone
    short_many = greedy(b"y", 60)  # 1 + 60: fits alone, but not padded to 60 next to the first
    short_few = greedy(b"z" * 50, 5)
    groups = plan_groups([long_prompt, short_many, short_few], BLOCK)
    assert sorted(sorted(g) for g in groups) == [[0, 2], [1]]
    for group in groups:
        width = max(len([long_prompt, short_many, short_few][i].context) for i in group)
        longest = max([long_prompt, short_many, short_few][i].remaining for i in group)
        assert width + longest - 1 <= BLOCK


def test_mixed_lengths_that_need_groups_still_decode_correctly(model):
    requests = [greedy(b"x" * 60, 4), greedy(b"y", 40)]
    out = generate(model, requests, BLOCK)
    assert out[0][1] == reference_greedy(model, b"x" * 60, 4)
    assert out[1][1] == reference_greedy(model, b"y", 40)


def test_resuming_after_delivered_tokens_continues_exactly(model):
    request = GenerationRequest(tuple(b"The fox"), SamplingParams(16, 0.8, seed=11))
    _, tokens, _ = generate(model, [request], BLOCK)[0]
    _, rest, reason = generate(model, [request.resumed_after(tokens[:6])], BLOCK)[0]
    assert tokens[:6] + rest == tokens and reason == "length"


def test_a_resumed_request_too_long_for_the_model_names_the_clients_prompt_and_delivered():
    # A stream resumed on a replica reloaded to a shorter context was refused with "(323 in
    # the prompt; ...)" and param "prompt" for a client that sent 5 tokens: the tokens already
    # delivered to it were counted as prompt.
    resumed = GenerationRequest((1,) * 5, SamplingParams(400)).resumed_after((7,) * 318)
    why, param, code = resumed.unfit_for(128, 257)
    assert why.startswith("This model's maximum context length is 128 tokens, however you "
                          "requested 405 tokens (5 in the prompt; 400 for the completion)")
    assert "318 of the completion's tokens were already delivered" in why, why
    assert param == "max_tokens" and code == "context_length_exceeded"
    # A request never resumed reads as before.
    fresh = GenerationRequest((1,) * 130, SamplingParams(4)).unfit_for(128, 257)
    assert fresh[0].endswith("(130 in the prompt; 4 for the completion)") and \
        fresh[1] == "prompt"


def test_requests_that_cannot_generate_are_refused():
    with pytest.raises(ValueError, match="prompt token"):
        GenerationRequest((), SamplingParams(4))
    with pytest.raises(ValueError, match="nothing left"):
        GenerationRequest((1,), SamplingParams(2), generated=(5, 6))


def test_static_batching_computes_logits_of_each_rows_last_position_only(model):
    # Every step reads only each row's last logits; the prefill ran the LM head over every
    # prompt position: with a 32,000-token vocabulary, 64 prompts of up to 200 tokens took
    # 10 s to prefill instead of 1.3 s (a (64, 200, 32000) float tensor, 1.6 GB, made and
    # dropped). The output is unchanged.
    head_rows = []
    hook = model.lm_head.register_forward_hook(
        lambda module, inputs, output: head_rows.append(inputs[0].shape[:-1].numel()))
    try:
        prompts = [b"Hello there", b"A much longer prompt than the first one", b"x"]
        out = generate(model, [greedy(p, 4) for p in prompts], BLOCK)
    finally:
        hook.remove()
    assert head_rows == [3, 3, 3, 3], head_rows  # one per row and step
    for prompt, (_, tokens, _) in zip(prompts, out, strict=True):
        assert tokens == reference_greedy(model, prompt, 4)


def test_static_batching_writes_its_kv_cache_in_place(model, monkeypatch):
    # The cache grew by torch.cat every step, copying every layer's keys and values (17% of a
    # 64-row static batch's decode on a CPU); it is now preallocated to the group's longest
    # reach (padded prompt + max_tokens - 1) and each step writes into it. Outputs unchanged.
    def requests():
        return [greedy(b"Hello", 12), greedy(b"A much longer prompt than the first", 9),
                GenerationRequest(tuple(b"x"), SamplingParams(12, 0.9, 0.95, seed=3))]

    batch = BatchGeneration(model, requests(), BLOCK)
    (group,) = batch.groups
    assert group.cache.layers[0].capacity == len(b"A much longer prompt than the first") + 11
    pointers, out = [], []
    while not batch.done:
        out.append(batch.step())
        if not group.done:
            pointers.append({(layer.keys.untyped_storage().data_ptr(),
                              layer.values.untyped_storage().data_ptr())
                             for layer in group.cache.layers})
    assert len(pointers) == 11  # the 12th step finished the group
    if not model.config.attention_span:  # a learnt span keeps its window by copies, as before
        # One row finishes at the 9th step and the cache keeps the other two: one copy there.
        assert pointers[:8] == [pointers[0]] * 8 and pointers[8:] == [pointers[8]] * 3
    tokens = [sum((step[i].tokens for step in out if step[i] is not None), ()) for i in range(3)]
    growing = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda capacity=None: growing())  # cat per step
    assert [t for _, t, _ in generate(model, requests(), BLOCK)] == tokens
    assert tokens[0] == reference_greedy(model, b"Hello", 12)


def test_a_row_whose_logits_go_non_finite_ends_with_an_error_and_its_batch_runs_on(model):
    # Static batching sampled from the NaN probabilities too (see test_serving_engine.py's
    # test of the same): the row must end with an error, its neighbours decode as alone.
    doomed = GenerationRequest(tuple(b"a prompt of twenty-four"), SamplingParams(20, 0.9, seed=5))
    others = [greedy(b"hi", 12), greedy(b"another prompt", 10)]
    batch = BatchGeneration(model, [doomed, *others], BLOCK)
    chunks: list[list] = [[], [], []]
    with overflowing_from(model, 30):
        while not batch.done:
            for i, chunk in enumerate(batch.step()):
                if chunk is not None:
                    chunks[i].append(chunk)
    for i, request in enumerate(others, 1):
        assert sum((c.tokens for c in chunks[i]), ()) == reference_greedy(
            model, bytes(request.prompt), request.params.max_tokens)
    *tokens, failed = chunks[0]
    assert (failed.finish_reason, failed.tokens) == ("error", ())
    assert "NaN or infinite" in failed.error and "position 30" in failed.error, failed.error
    assert sum((c.tokens for c in tokens), ()) == generate(model, [doomed], BLOCK)[0][1][:8]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_no_token_can_be_drawn_from_are_flagged_and_only_those(temperature):
    from orchestrator.serving.generation import NON_FINITE

    logits = torch.randn(5, 257)
    logits[0, 100] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, 7] = float("-inf")  # a token of probability 0: the row samples as ever
    rows = torch.full((5,), temperature)
    tokens = sample_tokens(logits, rows, torch.ones(5), torch.full((5,), 0.5))
    assert tokens[:3].tolist() == [NON_FINITE] * 3
    assert tokens[3:].tolist() == sample_tokens(logits[3:], rows[3:], torch.ones(2),
                                                torch.full((2,), 0.5)).tolist()
    assert NON_FINITE not in tokens[3:].tolist() and tokens[3] != 7


def test_the_wait_outside_a_replica_is_a_difference_of_durations_never_of_clocks():
    # The replica-side time to first token left out Serve's router (waiting for a replica
    # with room): the ingress tells it from its own wait less the replica's own time.
    from orchestrator.serving.generation import (Chunk, collect, first_token_after_s,
                                                 outside_replica_s)

    assert outside_replica_s(2.5, 0.5) == 2.0
    assert outside_replica_s(0.5, 0.5000001) == 0.0  # clock rates differ: never below 0
    assert outside_replica_s(1.0, None) is None  # a replica that did not say
    # Held 1.0 s, first token 0.2 s in: the answer reached the ingress 3.0 s after its start,
    # so the first token was 0.8 s before that, at 2.2 s.
    answer = collect([Chunk((1,), "a", first_token_s=0.2), Chunk((2,), "b", "length")],
                     held_s=1.0)
    assert (answer.first_token_s, answer.held_s) == (0.2, 1.0)
    assert first_token_after_s(3.0, answer) == pytest.approx(2.2)
    assert first_token_after_s(3.0, collect([Chunk((1,), "a", "length")])) is None
