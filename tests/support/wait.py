"""The one way tests wait: poll observable state until it holds, or fail saying what was last seen."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")
V = TypeVar("V")

_SHOWN = 600  # characters of the last value a failure shows


class WaitTimeout(AssertionError):
    """What was awaited did not come in time (an AssertionError: the test fails, saying what)."""


@overload
def wait_until(predicate: Callable[[], T], timeout: float = ..., interval: float = ...,
               message: str | Callable[[], str] = ..., *, until: None = ...,
               ignore: tuple[type[BaseException], ...] = ...) -> T: ...
@overload
def wait_until(predicate: Callable[[], V], timeout: float = ..., interval: float = ...,
               message: str | Callable[[], str] = ..., *, until: Callable[[V], bool],
               ignore: tuple[type[BaseException], ...] = ...) -> V: ...
def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.2,
               message: str | Callable[[], str] = "the condition", *, until: Callable[[Any], bool] | None = None,
               ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``predicate`` every ``interval`` seconds until its value is truthy (or, with ``until``,
    until ``until(value)`` holds) and return that value.

    After ``timeout`` seconds, WaitTimeout (an AssertionError): what was awaited (``message``; a callable is called
    then, to describe the state, a process's output, say) and the last value seen, or the last
    exception of the ``ignore`` types (a server coming back). Any other exception, an
    AssertionError from the predicate included ("the relay exited"), ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    seen: str = "nothing (the predicate never returned)"
    while True:
        try:
            value = predicate()
        except ignore as exc:
            seen = f"{type(exc).__name__}: {str(exc).strip()}"
        else:
            if (until(value) if until is not None else value):
                return value
            seen = repr(value)
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            if len(seen) > _SHOWN:
                seen = seen[:_SHOWN] + f"... ({len(seen)} characters)"
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}; last seen: {seen}")
        time.sleep(interval)
