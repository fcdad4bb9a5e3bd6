"""scripts/bench_loader.py's train-step figure: the step `jaxvid train` runs, steps per call included."""

import os
import sys

import pytest

from conftest import REPO, SMALL


@pytest.fixture
def bench_loader(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
  monkeypatch.chdir(REPO)                      # the script names configs/tiny.py from the repo root
  import bench_loader
  yield bench_loader
  sys.modules.pop("bench_loader", None)


def test_tiny_step_is_timed_per_step_at_its_steps_per_call(bench_loader):
  r = bench_loader.measure_tiny_step(3, SMALL + ["--config.train.steps_per_call=2"])
  assert r["steps_per_call"] == 2 and r["steps"] == 4          # whole calls covering 3 steps
  assert r["clip"] == [4, 16, 16] and r["batch"] == 8
  assert 0 < r["min_step_s"] <= r["median_step_s"]
  assert r["clips_per_s"] == pytest.approx(8 / r["median_step_s"], rel=0.01)
