"""Pausing a training worker: SIGUSR1 asks it to save a checkpoint at the next step end and exit."""

import signal
import threading

PAUSE_SIGNAL = signal.SIGUSR1
_requested = threading.Event()


def install() -> None:
    """Make PAUSE_SIGNAL set the pause flag instead of killing the process (call once, in the worker)."""
    signal.signal(PAUSE_SIGNAL, lambda signum, frame: _requested.set())


def requested() -> bool:
    """Whether this process was asked to pause."""
    return _requested.is_set()
