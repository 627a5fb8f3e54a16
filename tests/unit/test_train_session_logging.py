"""A Ray Train worker's log: the loop's one-line progress, not Ray Train's per-report dump."""
import logging

from ray.train.v2._internal.execution import context

from ray_layer.train_session import quiet_ray_train_reports


def test_ray_train_report_dump_is_silenced_and_its_warnings_kept():
    reporter = context.logger  # the logger Ray Train's report() writes its INFO line to
    level = reporter.level
    try:
        reporter.setLevel(logging.INFO)  # as a Ray worker's logging setup leaves it
        quiet_ray_train_reports()
        assert not reporter.isEnabledFor(logging.INFO)
        assert reporter.isEnabledFor(logging.WARNING)
    finally:
        reporter.setLevel(level)


def test_a_user_loop_under_the_launcher_is_silenced_too():
    """A job file's loop (`submit`, launch.fit) printed that dump for every report, a
    screenful a step beside the loop's own output, where jobs/pretrain.py's did not."""
    from ray_layer import user_loop

    reporter = context.logger
    level = reporter.level
    seen = []

    def loop():
        seen.append(reporter.isEnabledFor(logging.INFO))  # as its reports would find it
        raise user_loop.Yielded("preempt: test", 0)  # (ends the loop as a yield does)

    try:
        reporter.setLevel(logging.INFO)
        user_loop.yielding(loop)({})
        assert seen == [False]
    finally:
        reporter.setLevel(level)
