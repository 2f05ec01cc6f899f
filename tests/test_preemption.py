"""PreemptionHandler: a signal becomes a stop request, a launcher's duplicate is the same request, a later one kills."""

import os
import signal
import time

from nanochat.preemption import PreemptionHandler


def test_signal_sets_the_flag_and_a_duplicate_is_the_same_request():
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler().install()
    try:
        assert not handler.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the scheduler ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... and torchrun forwarding the same one: no exit
        time.sleep(0.01)
        assert handler.received == "SIGTERM" and handler.stop_requested()
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_after_the_window_exits_at_once():
    pid = os.fork()
    if pid == 0:  # a real process: the second signal must end it by the signal, not by an exception or exit code
        try:
            handler = PreemptionHandler(duplicate_window_s=0.0).install()
            os.kill(os.getpid(), signal.SIGINT)
            if handler.received != "SIGINT":
                os._exit(3)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        finally:
            os._exit(4)  # reached only if the second signal did not kill it
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT, status
