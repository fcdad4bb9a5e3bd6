"""The scripts' own train-step timings (scripts/bench_loader.py, scripts/bench_mesh.py): they run,
and time the step `jaxvid train` runs, steps per call included."""

import importlib
import os
import sys

import pytest

from conftest import REPO, SMALL, TINY
from jaxvid.perf import bench


@pytest.fixture
def scripts(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
  monkeypatch.chdir(REPO)                      # bench_loader names configs/tiny.py from the repo root
  yield importlib.import_module
  for name in ("bench_loader", "bench_mesh"):
    sys.modules.pop(name, None)


def test_loader_bench_times_the_tiny_step_per_step_at_its_steps_per_call(scripts):
  r = scripts("bench_loader").measure_tiny_step(3, SMALL + ["--config.train.steps_per_call=2"])
  assert r["steps_per_call"] == 2 and r["steps"] == 4          # whole calls covering 3 steps
  assert r["clip"] == [4, 16, 16] and r["batch"] == 8
  assert 0 < r["min_step_s"] <= r["median_step_s"]
  assert r["clips_per_s"] == pytest.approx(8 / r["median_step_s"], rel=0.01)


def test_mesh_bench_compiles_measures_memory_and_runs_a_mesh(scripts):
  bench_mesh = scripts("bench_mesh")
  cfg = bench_mesh._cfg(TINY, SMALL + ["--config.train.steps_per_call=2"], (2, 2, 2, 1), "ulysses")
  row = bench_mesh.measure(cfg, run_steps=2, host_gb=16.0)
  assert row["compile_s"] > 0 and row["state_and_batch_mb"] > 0 and row["temp_mb"] > 0
  assert row["step_s"] > 0 and row["steps_per_call"] == 2


def test_per_step_times_cover_the_steps_in_whole_calls(monkeypatch):
  clock, calls = [0.0], []

  def call():                                   # a call of 2 steps taking 1, 2, 3, ... seconds
    calls.append(len(calls) + 1)
    clock[0] += len(calls)

  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
  assert bench.per_step_times(call, 2, steps=3, warmup=1) == [1.0, 1.5]    # 1 warm-up call, then 2
  assert len(calls) == 3
  calls.clear()
  assert bench.per_step_times(call, 2, steps=1, warmup=0) == [0.5]         # no warm-up; one call at least
