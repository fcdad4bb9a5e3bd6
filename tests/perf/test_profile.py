"""`jaxvid bench --profile`: a real profiler trace of a train step and a forward, read back and
summed by kind of XLA op (jaxvid/perf/profile.py)."""

import glob
import json
import re

import pytest

from conftest import SMALL, TINY
from jaxvid import cli
from jaxvid.perf import profile


def test_kinds_of_ops():
  assert [profile.kind(n) for n in ("dot.3", "ynn_fusion.58", "convolution.1", "all-reduce.253", "Rendezvous",
                                    "Wait: pending_threads=1/2", "multiply_add_fusion.2", "while.905", "convert.3",
                                    "convert_bitcast_fusion")] == \
      ["matmul", "matmul", "matmul", "collective", "collective", "collective", "other", "other", "other", "other"]


def test_a_lone_matmul_is_all_matmul(tmp_path):
  # One matmul on one device: whichever thread runs it, its time is found and counted as matmul.
  import jax
  import jax.numpy as jnp
  x = jax.device_put(jnp.ones((512, 512)), jax.devices()[0])
  f = jax.jit(lambda x: x @ x).lower(x).compile()
  f(x).block_until_ready()
  b = profile.breakdown(profile.trace(lambda: f(x).block_until_ready(), str(tmp_path)), f.as_text())
  assert b["seconds"]["matmul"] > 0 and b["fraction"]["matmul"] > 0.5, b
  assert ["f32[512,512]"] == [shape for _, k, _, shape in b["top"] if k == "matmul"]   # from the compiled HLO


def test_bench_profile_says_where_the_time_went(tmp_path, capsys):
  assert cli.main(["bench", "--config", TINY, *SMALL, "--steps", "1", "--config.mesh.data=-1",
                   "--profile", str(tmp_path / "prof")]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  for name in ("train", "forward"):
    assert glob.glob(str(tmp_path / "prof" / name / "**" / "*.xplane.pb"), recursive=True), name
    title = "train step" if name == "train" else f"forward ({result['forward_steps_per_call']} sampling steps in one call)"
    assert any(line.startswith(f"{title}, op time by kind") for line in lines[:-1])
    b = result["profile"][name]
    assert sum(b["fraction"].values()) == pytest.approx(1.0)
    assert b["seconds"]["matmul"] > 0 and all(s >= 0 for s in b["seconds"].values())
    assert b["top"] and all(s >= 0 for _, _, s, _ in b["top"])
    # Shapes from the compiled HLO ("" for a tuple or a rendezvous; on 8 devices sharing 2 cores the
    # top ten can be all waits and tuple all-reduces, so a shape is not required here).
    assert all(re.fullmatch(r"([a-z]\w*\[[\d,]*\])?", shape) for _, _, _, shape in b["top"]), b["top"]
  # 8 devices, data-parallel: the gradients are all-reduced, and no device can have run ops for
  # longer than the traced step (one step of at most a few times the median; 8 devices).
  train = result["profile"]["train"]["seconds"]
  assert train["collective"] > 0
  assert sum(train.values()) < 8 * 5 * result["train_step_s"]
