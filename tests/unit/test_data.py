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
