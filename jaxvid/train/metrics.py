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

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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
