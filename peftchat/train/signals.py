"""Ctrl-C, SIGTERM and SIGHUP stop a run with its work saved (`GracefulInterrupt`)."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from peftchat.errors import Interrupted


class GracefulInterrupt:
    """SIGINT, SIGTERM and SIGHUP (what Ctrl-C, Slurm, Kubernetes and systemd send before a kill)
    stop the run with its work saved.

    Before the steps start (`deferring` false) a signal stops at once: nothing is trained yet.
    While the steps run, the first signal only sets `signum` (the loop finishes the step under way,
    checkpoints and raises `Interrupted`). A second Ctrl-C while a step runs quits at once (as
    documented); any other second signal, and every signal while a checkpoint is written
    (`saving`), waits for the save: a kill mid-save would throw away the one complete state the
    run is about to have. After the stop has begun, further signals are only noted, so the lock
    and the temp dirs are still cleaned up. A signal the process inherited as ignored (SIGHUP
    under `nohup`, SIGINT of a background job) stays ignored. The handlers found on entry are put
    back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deferring = False
        self.stopping = False
        self._saving = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def _say(text: str) -> None:
        try:
            print(text, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # SIGHUP: the terminal may be gone
            pass

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            self._say(f"{name}: stopping already")
            return
        if not self.deferring:  # nothing trained yet: nothing to save
            self.stopping = True
            raise Interrupted(signum, "before training started; nothing to save")
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again to quit now)" if signum == signal.SIGINT else ""
            self._say(f"\n{name}: saving a checkpoint after this step{again}")
        elif signum == signal.SIGINT and self.signum == signal.SIGINT and not self._saving:
            self.stopping = True
            raise Interrupted(signum, "quit at once; the last saved checkpoint is kept")
        else:
            self._say(f"{name}: a checkpoint is being saved; stopping when it is complete")

    @contextmanager
    def saving(self) -> Iterator[None]:
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
