"""orchestrator/polling.py: the one wait-until loop of the scripts and the tests."""
import pytest

from orchestrator.polling import wait_for


def test_returns_the_first_truthy_value_and_stops_asking():
    answers = iter([None, 0, [], {"ready": True}, "never asked"])
    calls = []

    def check():
        calls.append(1)
        return next(answers)

    assert wait_for("ready", check, timeout_s=5, every_s=0) == {"ready": True}
    assert len(calls) == 4


def test_times_out_naming_what_it_waited_for():
    calls = []
    with pytest.raises(TimeoutError, match=r"^the node joins: not within 0.05s$"):
        wait_for("the node joins", lambda: calls.append(1), timeout_s=0.05, every_s=0.01)
    assert len(calls) >= 2  # asked again until the deadline, not once


def test_a_zero_timeout_still_asks_once():
    assert wait_for("now", lambda: "yes", timeout_s=0) == "yes"


def test_ignored_exceptions_are_not_yet_and_are_named_at_the_timeout():
    answers = iter([ConnectionError("restarting"), ConnectionError("restarting"), "up"])

    def check():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for("up", check, timeout_s=5, every_s=0, ignore=(OSError,)) == "up"

    def down():
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match=r"last error: ConnectionError: refused"):
        wait_for("up", down, timeout_s=0.02, every_s=0.01, ignore=(OSError,))


def test_other_exceptions_end_the_wait_at_once():
    calls = []

    def check():
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_for("x", check, timeout_s=5, every_s=0, ignore=(OSError,))
    assert len(calls) == 1


def test_the_wait_ends_at_its_deadline_not_a_whole_interval_past_it():
    import time
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for("x", lambda: None, timeout_s=0.2, every_s=3.0)
    assert time.monotonic() - started < 2.0  # slept 3 s past a 0.2 s deadline before


@pytest.mark.parametrize("kwargs, name", [(dict(timeout_s=float("nan")), "timeout_s"),
                                          (dict(timeout_s=-1), "timeout_s"),
                                          (dict(every_s=float("inf")), "every_s"),
                                          (dict(timeout_s=10 ** 400), "timeout_s"),
                                          (dict(timeout_s=True), "timeout_s")])
def test_a_timeout_or_interval_that_is_not_a_number_is_refused(kwargs, name):
    # A NaN timeout never timed out: monotonic() >= nan is always False.
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        wait_for("x", lambda: None, **kwargs)
