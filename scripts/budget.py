"""Shared by the benchmark scripts: run `jaxvid train` within a time budget."""

import signal
import subprocess
import sys
import time


def train_for(name: str, minutes: float, args: list[str]) -> float:
  """Runs `jaxvid train ARGS` (rerunning resumes) until it ends or `minutes` are up; then it
  gets SIGTERM, saves a checkpoint at the next step and exits 0. Exits the script (naming
  itself `name`) if training fails. Returns the seconds spent."""
  t0 = time.time()
  train = subprocess.Popen([sys.executable, "-m", "jaxvid", "train", *args])
  try:
    train.wait(timeout=minutes * 60)
  except subprocess.TimeoutExpired:
    print(f"{name}: {minutes} minutes are up; stopping training (it saves a checkpoint)", flush=True)
    train.send_signal(signal.SIGTERM)
    train.wait()
  if train.returncode:
    sys.exit(f"{name}: jaxvid train failed with exit status {train.returncode}")
  return time.time() - t0
