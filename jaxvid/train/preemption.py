"""Stopping cleanly: SIGTERM (cloud preemption, `kill`), Ctrl-C, or JAX's multi-host
preemption notice become a request to save a checkpoint at the next step boundary (the end of
the call with train.steps_per_call > 1) and exit 0; in `jaxvid sample`, to stop after the
current round of videos (each finished video is already on disk and in the manifest).

A second Ctrl-C (a second or more after the first) stops at once (the last complete checkpoint is
still there).
"""

import contextlib
import logging
import os
import signal
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

log = logging.getLogger("jaxvid")


# A second SIGINT this soon after the first is the same Ctrl-C: a terminal sends it to every process
# of its foreground group, and launch/local.sh forwards it to its processes too.
REPEAT_S = 1.0


class StopRequest:
  """Installs handlers for SIGTERM and SIGINT while in a `with` block; `action` is what the
  job does on a first signal (for the log line).

  Python runs signal handlers between bytecodes of the main thread, so while that thread waits
  on the device (a step, a video being read back) a second Ctrl-C would wait for it too, and two
  merge into one. A watcher thread sees each signal as it arrives (signal.set_wakeup_fd): if the
  main thread has not acted on a second Ctrl-C within REPEAT_S, the watcher ends the process
  (exit 130), as KeyboardInterrupt would.
  """

  def __init__(self, action: str = "saving a checkpoint at the end of this step (or call of steps), then exiting"):
    self.signal = None
    self.action = action
    self._previous = {}
    self._when = 0.0
    self._interrupted = threading.Event()   # the main thread raised KeyboardInterrupt
    self._wakeup = None                     # (previous wakeup fd, our pipe's write end)

  def __enter__(self) -> "StopRequest":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._wakeup = (signal.set_wakeup_fd(write, warn_on_full_buffer=False), write)
    threading.Thread(target=self._watch, args=(read,), name="jaxvid-stop-watcher", daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    previous, write = self._wakeup
    signal.set_wakeup_fd(previous)
    os.close(write)        # the watcher reads the end of the pipe and stops

  def _handle(self, signum, frame) -> None:
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      if time.monotonic() - self._when < REPEAT_S:
        return      # the same Ctrl-C twice: from the terminal and forwarded by launch/local.sh
      self._interrupted.set()
      raise KeyboardInterrupt
    self.signal, self._when = signum, time.monotonic()
    log.warning("received %s: %s", signal.Signals(signum).name, self.action)

  def _watch(self, read: int) -> None:
    first = None
    with os.fdopen(read, "rb", buffering=0) as pipe:
      while data := pipe.read(64):      # until __exit__ closes the write end
        for signum in data:
          if signum != signal.SIGINT:
            continue
          now = time.monotonic()
          if first is None:
            first = now
          elif now - first >= REPEAT_S and not self._interrupted.wait(REPEAT_S):
            # A second Ctrl-C the main thread has not acted on: it is waiting on the device.
            with contextlib.suppress(OSError, ValueError):   # stderr may be gone (a closed pipe)
              print("jaxvid: interrupted (a second Ctrl-C)", file=sys.stderr, flush=True)
            os._exit(130)

  def should_stop(self, count: int) -> bool:
    """True on every process at the same point once any process was asked to stop. `count`
    goes up by one at each such point, the same on every process (JAX's preemption sync
    point is one of these counts)."""
    if jax.process_count() == 1:
      return self.signal is not None
    asked = multihost_utils.process_allgather(np.array(self.signal is not None))
    return bool(np.any(asked)) or multihost_utils.reached_preemption_sync_point(count)
