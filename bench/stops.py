"""How a run stops before its end without failing: a signal (SIGINT, SIGTERM) or a loss that is no
longer finite. Both end with a result file holding what was measured until then."""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.log_path = None  # a launcher's kept worker log, when no worker wrote a result

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Diverged(Exception):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, last_finite: float | None, last_finite_step: int | None):
        at = (f"; last finite loss {last_finite:.4g} at step {last_finite_step}" if last_finite is not None
              else "; no finite loss before it")
        super().__init__(f"diverged: the training loss is not finite from step {step}{at}")
        self.step = step


class Stopped(Exception):
    """A run that ended early, with the summary of what it measured (bench.results.RunSummary)."""

    def __init__(self, status: str, message: str, summary, exit_code: int):
        super().__init__(message)
        self.status, self.summary, self.exit_code = status, summary, exit_code


@contextlib.contextmanager
def signals_raise():
    """Within: SIGINT and SIGTERM raise Interrupted in the main thread (elsewhere: nothing changes).

    Only the first signal raises. Later ones are ignored while the run writes what it measured:
    a torchrun worker gets SIGTERM twice (the launcher signals the process group, and torchrun
    forwards its own), and a second raise in the middle of writing the result would lose the
    measurements. The launcher's SIGKILL after its grace period still bounds it all.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired, outer = _FIRED, list(_FIRED)
    fired.clear()

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        fired[:] = outer


_FIRED: list[int] = []  # the signal signals_raise() has raised for, while it is active


def raise_if_signalled() -> None:
    """Raise Interrupted when a signal has arrived (or is about to be handled) within signals_raise().

    For a failure that a signal caused indirectly: a rank blocked in a collective sees its peer,
    stopped by the same signal, go away ("Connection reset by peer") and fails before its own
    handler has run, and would record a failure without its measured steps. Entering this function
    gives a pending handler its turn (CPython runs them at the next function call); if it ran
    earlier, its signal is on record."""
    if _FIRED:
        raise Interrupted(_FIRED[0])
