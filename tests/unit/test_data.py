import pytest
import torch

from orchestrator.training.data import decode, encode, get_batch, load_corpus, split_corpus


def test_corpus_is_real_english_text():
    corpus = load_corpus()
    assert len(corpus) > 300_000
    assert b"The " in corpus and b"statement" in corpus


def test_byte_tokenizer_round_trips_unicode():
    text = "naïve café — ok"
    assert decode(encode(text)) == text


def test_batches_are_a_function_of_seed_rank_step():
    train, held_out = split_corpus(load_corpus())
    assert len(held_out) > 0 and len(train) > 8 * len(held_out)
    a = get_batch(train, 4, 32, seed=1, rank=0, step=5)
    b = get_batch(train, 4, 32, seed=1, rank=0, step=5)
    c = get_batch(train, 4, 32, seed=1, rank=1, step=5)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    x, y = a
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_every_window_can_be_drawn_and_the_last_token_is_a_target():
    """randint's high is exclusive: the last start was never drawn (nor the corpus's last
    token ever a target), and a corpus of exactly one window was refused."""
    tokens = torch.arange(12)
    starts, targets = set(), set()
    for step in range(300):
        x, y = get_batch(tokens, 8, 4, seed=0, rank=0, step=step)
        starts |= set(x[:, 0].tolist())
        targets |= set(y.flatten().tolist())
    assert starts == set(range(8)) and targets == set(range(1, 12))
    x, y = get_batch(torch.arange(5), 2, 4, seed=0, rank=0, step=0)  # one window: 5 tokens
    assert x.tolist() == [[0, 1, 2, 3]] * 2 and y.tolist() == [[1, 2, 3, 4]] * 2
    with pytest.raises(ValueError, match="corpus of 4 tokens is too short for seq_len 4"):
        get_batch(torch.arange(4), 2, 4, seed=0, rank=0, step=0)
