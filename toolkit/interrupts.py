"""Ctrl-C that always stops the run, promptly, as a ``KeyboardInterrupt``.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread
happens to be, and two places lose it:

- compiled code (the simulator's numba kernels) that returns to Python with
  the interrupt pending comes back as ``SystemError: ... returned a result
  with an exception set``, the interrupt only its cause: an ``except
  Exception`` (the report's per-experiment guard) then records a "failed"
  experiment instead of stopping. ``surface_interrupt`` turns it back;
- a ``KeyboardInterrupt`` raised inside a weakref callback or a ``__del__``
  is printed as "Exception ignored in ..." and dropped, and the run goes on.
  ``unraisable_interrupts`` (the CLI installs it) re-raises it in the main
  thread at its next bytecode.

Trial child processes ignore SIGINT instead (``ignore_interrupts``): the
parent, which the terminal interrupts too, stops them and reports once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

REDELIVER_S = 0.02  # a swallowed Ctrl-C is raised again this long after, outside the callback that lost it


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True when ``exc`` is a ``KeyboardInterrupt`` or was raised because of one (its cause or context chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def surface_interrupt():
    """Inside: an error caused by Ctrl-C (numba's ``SystemError``, say) is raised as ``KeyboardInterrupt``."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if caused_by_interrupt(e):
            raise KeyboardInterrupt from None
        raise


@contextlib.contextmanager
def unraisable_interrupts():
    """Inside: a Ctrl-C swallowed by a weakref callback or ``__del__`` interrupts the main thread again.

    ``sys.unraisablehook`` sees such an interrupt; it cannot raise there, so it
    asks for a new one (``_thread.interrupt_main``) from a helper thread a few
    milliseconds later, which Python delivers to the main thread at its next
    check, outside the callback (asked for in the hook itself, it would be
    delivered inside the hook, and lost again).
    """
    import _thread

    previous = sys.unraisablehook
    pending: list[threading.Timer] = []

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            later = threading.Timer(REDELIVER_S, _thread.interrupt_main)
            later.daemon = True
            later.start()
            pending.append(later)
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for later in pending:  # raised here at the latest, where the caller's ``except KeyboardInterrupt`` sees it
            later.join()


def ignore_interrupts() -> None:
    """Ignore SIGINT in this process (trial children: their parent stops them and reports)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


__all__ = ["caused_by_interrupt", "surface_interrupt", "unraisable_interrupts", "ignore_interrupts"]
