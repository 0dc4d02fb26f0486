"""Which Python thread may enter Julia, and what happens to Julia objects that die elsewhere.

Policy: every call into Julia runs on the main thread, which is the thread that starts Julia.
A call from any other thread is refused with `JuliaThreadError` before it reaches juliacall.

Why: a Julia garbage collection started on another thread stops the world and waits for every
Julia thread to reach a safepoint, including the main thread. When the main thread is blocked
outside Julia (in `Thread.join()`, a lock, a sleep), it never gets there and the process hangs for
good (PythonCall.jl issue #578, open; seen in `jl_gc_wait_for_the_world`). A lock cannot help:
the GIL already serialises juliacall calls, and the hang needs no concurrent Julia call at all.

Releasing a Julia object is a call into Julia too. Objects the adapter keeps (a pullback, the
Julia function, Julia memory behind a view) are wrapped in `Held`: when one dies on another thread
(a graph freed by a worker), its Julia value is parked and released by the next Julia call on the
main thread instead.
"""
from __future__ import annotations

import threading


class JuliaThreadError(RuntimeError):
    """Julia was called from a thread other than the main thread, which started it."""


def on_julia_thread() -> bool:
    return threading.get_ident() == threading.main_thread().ident


def check_thread(where: str) -> None:
    """Raise JuliaThreadError unless this is the main thread."""
    if not on_julia_thread():
        raise JuliaThreadError(
            f"{where}: called from thread {threading.current_thread().name!r}, but bridges "
            f"runs Julia only on the main thread, which started it. A call into Julia from "
            f"another thread can hang the process for good: a Julia garbage collection started "
            f"there waits for the main thread, which may be blocked, e.g. in Thread.join() "
            f"(PythonCall.jl issue #578). Call the Julia function and run backward() through it "
            f"on the main thread; use other threads only for work that does not touch Julia")


_parked: list = []  # Julia values whose holder died off the main thread


class Held:
    """Holds a Julia value; if the holder dies off the main thread, the value is parked instead
    of released there."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __del__(self):
        if not on_julia_thread():
            _parked.append(self.value)


def release_parked() -> int:
    """Release the parked Julia values (call on the main thread); returns how many there were."""
    n = len(_parked)
    if n:
        del _parked[:n]
    return n
