"""The stop request: SIGTERM or Ctrl-C asks for a checkpoint and a clean exit; a second Ctrl-C
stops at once. (A whole run stopped by SIGTERM and resumed: test_checkpoint.py.)"""

import os
import signal
import subprocess
import sys
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


def test_a_second_ctrl_c_stops_at_once_while_the_device_is_busy(tmp_path):
  """The main thread waiting on a long computation runs no Python signal handler: the second
  Ctrl-C still ends the process within a couple of seconds, exit 130."""
  script = tmp_path / "busy.py"
  script.write_text(
      "import sys, time, jax, jax.numpy as jnp\n"
      "from jaxvid.train import preemption\n"
      "spin = jax.jit(lambda x: jax.lax.while_loop(lambda y: y[0] > -1.0, lambda y: y * 1.0000001 + 1e-9, x))\n"
      "with preemption.StopRequest('finishing'):\n"
      "  print('busy', flush=True)\n"
      "  spin(jnp.ones(8)).block_until_ready()     # never ends\n")
  from conftest import one_device_env
  proc = subprocess.Popen([sys.executable, str(script)], env=one_device_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "busy\n"
    time.sleep(2)         # compiling or running: the main thread is in XLA either way
    proc.send_signal(signal.SIGINT)
    time.sleep(preemption.REPEAT_S + 0.5)
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
  finally:
    proc.kill()          # it never ends by itself
    proc.wait()
  assert proc.returncode == 130 and "interrupted (a second Ctrl-C)" in err, err
  assert time.monotonic() - t < 10
