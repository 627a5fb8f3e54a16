"""Workarounds for CPython bugs this project has hit, in one place."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

# CPython 3.11's AST constructor can raise this spuriously (python/cpython#106905): it is not
# about the code parsed. Seen here inside torch.onnx.export and in ast.parse of the project's
# own sources, once each in full test runs; the same call then succeeds.
SPURIOUS_AST_ERROR = "AST constructor recursion depth mismatch"


def retry_spurious_ast_error(call: Callable[[], T]) -> T:
    """call(), tried once more if it raises CPython's spurious AST SystemError; any other
    error, or the same one twice, is raised as is."""
    for attempt in (1, 2):
        try:
            return call()
        except SystemError as e:
            if attempt == 2 or SPURIOUS_AST_ERROR not in str(e):
                raise
    raise AssertionError("unreachable")
