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
