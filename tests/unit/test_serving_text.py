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
