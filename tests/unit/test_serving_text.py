"""Bytes to text one token at a time: split characters, split stop sequences."""
from orchestrator.serving.text import TextStream


def feed_all(stream: TextStream, data: bytes) -> list[str]:
    return [stream.feed(b) for b in data]


def test_a_character_split_over_tokens_is_released_whole():
    stream = TextStream()
    assert feed_all(stream, "é€".encode()) == ["", "é", "", "", "€"]
    assert stream.finish() == ""


def test_stop_sequence_split_over_tokens_is_cut_and_ends_the_stream():
    stream = TextStream(stop=("\n\n",))
    out = feed_all(stream, b"ab\n\ncd")
    assert "".join(out) == "ab"
    assert out[:3] == ["a", "b", ""]  # the first "\n" is held: it may start the stop
    assert stream.stopped and stream.finish() == ""


def test_held_text_that_never_becomes_a_stop_is_released():
    stream = TextStream(stop=("END",))
    assert "".join(feed_all(stream, b"xEN")) == "x"
    assert stream.feed(ord("d")) == "ENd"  # no longer a possible "END"
    assert "".join(feed_all(stream, b"EN")) == ""
    assert stream.finish() == "EN"  # generation ended: nothing can complete it now
    assert not stream.stopped


def test_earliest_of_several_stops_wins():
    stream = TextStream(stop=("cd", "b"))
    assert "".join(feed_all(stream, b"abcd")) == "a"
    assert stream.stopped


def test_invalid_utf8_from_the_model_becomes_replacement_characters():
    stream = TextStream()
    text = "".join(feed_all(stream, b"a\xffb\xc3")) + stream.finish()
    assert text == "a\ufffdb\ufffd"


def test_replaying_the_same_bytes_rebuilds_the_same_state():
    """What lets a stream resume on another replica: the state is a function of the bytes."""
    data = "ab\u00e9 STO".encode()
    first, second = TextStream(stop=("STOP",)), TextStream(stop=("STOP",))
    feed_all(first, data)
    feed_all(second, data)
    assert first.feed(ord("P")) == second.feed(ord("P")) == ""
    assert first.stopped and second.stopped


def test_a_stop_completed_by_the_last_partial_characters_replacement_is_cut():
    # finish() turned a partial character into U+FFFD and released it unchecked: with stop
    # "\ufffd" (ending a byte model's answer at its first invalid byte), an answer cut by
    # max_tokens inside a character ended in the very stop sequence it asked to be cut at.
    stream = TextStream(stop=("\ufffd",))
    assert "".join(feed_all(stream, b"ab\xc3")) == "ab"
    assert stream.finish() == "" and stream.stopped
    stream = TextStream(stop=("b\ufffd",))
    assert "".join(feed_all(stream, b"ab\xe2\x82")) == "a"
    assert stream.finish() == "" and stream.stopped


def test_a_row_whose_last_token_completes_a_stop_at_its_end_finishes_with_stop():
    from orchestrator.serving.generation import GenerationRequest, Row, SamplingParams

    row = Row(GenerationRequest((1,), SamplingParams(3, temperature=0.0, stop=("\ufffd",))))
    chunks = [row.accept(t) for t in b"ab\xc3"]
    assert "".join(c.text for c in chunks) == "ab"
    assert chunks[-1].finish_reason == "stop"
