"""`--help` for the job commands: each flag's default said once."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, except where the help already says its
    default in words, or there is no value to show (None, off, an empty list): argparse's
    own printed "(default: None)" after "default: the cluster's CPUs"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text.lower() or unset:  # (0 and 0.0 are values: `in` would drop them)
            return text
        return super()._get_help_string(action)
