"""Preemption: SIGTERM / SIGINT become "finish this step, save, stop", agreed by every rank.

A cluster scheduler or a spot-instance reclaim sends SIGTERM some seconds before SIGKILL, and
Ctrl-C sends SIGINT. `PreemptionHandler` owns that signal state: the handler only records the
signal (a Python handler runs between bytecodes of the main thread, so it cannot interrupt a
step halfway); the training loop calls `stop_requested()` once per step, an all-reduce (MAX) of
the flag, so all ranks stop after the same step and meet in the collective checkpoint save even
when only one of them was signalled.

A second signal exits at once with the signal's default action (the process dies of it, as it
would have without this handler). Launchers duplicate signals: torchrun re-sends the SIGTERM or
SIGINT it receives to every worker, and a scheduler or a terminal's Ctrl-C often signals the
workers directly as well, so a repeat within `duplicate_window_s` of the first is the same request.
There is no state_dict(): a stop request must not survive into the resumed run.
"""

import os
import signal
import time

import torch.distributed as dist

from nanochat.common import across_ranks

DUPLICATE_WINDOW_S = 2.0


class PreemptionHandler:
    """install() -> signals set a flag; stop_requested() (collective) -> every rank agrees; uninstall() restores."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), duplicate_window_s=DUPLICATE_WINDOW_S):
        self.signals = tuple(signals)
        self.duplicate_window_s = duplicate_window_s
        self.received = None        # the first signal's name, once one arrived
        self._received_at = None
        self._previous = {}

    def install(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signal.Signals(signum).name, now
            # os.write, not print: the handler may run while the main thread is inside a print
            os.write(2, f"{self.received} received: finishing the current step, then saving a checkpoint "
                        f"and stopping (send it again to exit at once)\n".encode())
        elif now - self._received_at > self.duplicate_window_s:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now, without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def stop_requested(self):
        """True on every rank if any rank got a signal. Collective: every rank calls it at the same point."""
        return bool(across_ranks(self.received is not None, dist.ReduceOp.MAX))
