"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, and the console.

Only the primary process (process 0) writes.
"""

import json
import os
import time

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
  """write(step, {name: float}) appends one JSON line (with `step` and unix `time`) and
  adds TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """Appends to an existing metrics.jsonl, first dropping rows after `resume_step`: they
    belong to steps that were run past the checkpoint being resumed, and are run again."""
    self.enabled = jax.process_index() == 0
    if self.enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_after(path, resume_step)
      self._jsonl = open(path, "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):   # a line cut short by a killed process
      continue
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(line + "\n" for line in keep)
    os.replace(path + ".tmp", path)
