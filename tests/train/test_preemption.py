"""The stop request: SIGTERM or Ctrl-C asks for a checkpoint and a clean exit; a second Ctrl-C
stops at once. (A whole run stopped by SIGTERM and resumed: test_checkpoint.py.)"""

import os
import signal
import time

import pytest

from jaxvid.train import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_stop_request(sig):
  before = signal.getsignal(sig)
  with preemption.StopRequest() as stop:
    assert not stop.should_stop(0)
    os.kill(os.getpid(), sig)
    assert stop.should_stop(1) and stop.signal == sig
  assert signal.getsignal(sig) == before                 # the handler is restored on exit


def test_a_second_ctrl_c_stops_at_once():
  with preemption.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    # The same Ctrl-C delivered twice (the terminal's, and launch/local.sh forwarding it) is one.
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(preemption.REPEAT_S)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal == signal.SIGINT
