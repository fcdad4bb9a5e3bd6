"""The trainer end to end: workdir contract, resume, refusing another model's workdir,
and that the loss goes down."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import SMALL, TINY, compiled_train_step, restore_run, train_small
from jaxvid import config
from jaxvid.diffusion import flow as flow_lib
from jaxvid.models import autoencoder
from jaxvid.parallel import sharding
from jaxvid.train import state as state_lib

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "steps_per_sec", "tokens_per_sec", "time"}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_workdir_contract(trained_run):
  cfg = json.load(open(trained_run / "config.json"))
  assert cfg["train"]["steps"] == 4 and cfg["model"]["depth"] == 1
  rows = _metrics(trained_run)
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert METRIC_KEYS <= set(r) and np.isfinite(r["loss"]) and r["steps_per_sec"] > 0
  assert sorted(os.listdir(trained_run / "checkpoints")) == ["2", "4"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(trained_run / "tensorboard"))
  state = restore_run(trained_run, 4)
  assert int(state.step) == 4


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
  common = ("--config.checkpoint.every=3", "--config.train.log_every=1")
  assert train_small(tmp_path / "once", "--config.train.steps=6", *common) == 0
  assert train_small(tmp_path / "twice", "--config.train.steps=3", *common) == 0
  assert train_small(tmp_path / "twice", "--config.train.steps=6", *common) == 0
  once, twice = _metrics(tmp_path / "once"), _metrics(tmp_path / "twice")
  assert [r["step"] for r in twice] == [1, 2, 3, 4, 5, 6]          # continued at 4, not restarted
  np.testing.assert_allclose([r["loss"] for r in twice], [r["loss"] for r in once], rtol=1e-6)   # same batches, noise
  # The first 3 steps of "twice" ran a program compiled for a 3-step schedule (a constant in it),
  # which XLA:CPU may round differently: 2e-9 apart measured. Bitwise equality under one program,
  # after a kill: tests/train/test_checkpoint.py.
  _assert_states_match(restore_run(tmp_path / "once", 6), restore_run(tmp_path / "twice", 6))
  # Nothing left to do: a rerun at the same steps is a no-op that exits 0.
  assert train_small(tmp_path / "twice", "--config.train.steps=6", *common) == 0
  assert len(_metrics(tmp_path / "twice")) == 6


def test_steps_per_call_trains_like_one_step_a_call(tmp_path):
  # 7 steps logged and saved every 3, 3 steps a call, stopped at 4 and resumed: calls of 3, 1
  # (the end) | 2, 1 (never across a logging point), against one step a call. A constant
  # learning rate, so that the run stopped at 4 and extended to 7 has the same one.
  lr = ("--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0")
  common = ("--config.train.log_every=3", "--config.checkpoint.every=3", *lr)
  assert train_small(tmp_path / "one", *common, "--config.train.steps=7") == 0
  three = (tmp_path / "three", *common, "--config.train.steps_per_call=3")
  assert train_small(*three, "--config.train.steps=4") == 0
  assert train_small(*three, "--config.train.steps=7") == 0
  one, three = _metrics(tmp_path / "one"), _metrics(tmp_path / "three")
  assert [r["step"] for r in one] == [3, 6, 7] and [r["step"] for r in three] == [3, 4, 6, 7]
  three = [r for r in three if r["step"] != 4]
  for key in ("loss", "grad_norm", "lr"):           # the last step's metrics of each call
    np.testing.assert_allclose([r[key] for r in three], [r[key] for r in one], rtol=1e-5)
  kept = lambda run: sorted(os.listdir(tmp_path / run / "checkpoints"))
  assert kept("three") == kept("one") and "7" in kept("one")
  a, b = restore_run(tmp_path / "one", 7), restore_run(tmp_path / "three", 7)
  assert int(b.step) == 7
  _assert_states_match(a, b)


def _assert_states_match(a, b):
  """Two train states of the same run computed by two programs: equal up to rounding. (An Adam
  step moves a parameter by up to about the learning rate, 1e-3 here, so a step run twice or
  from a lost optimizer state would show.)"""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    # The text encoder's key bias (no QK-norm there) shifts every score of a row alike, which
    # the softmax ignores: its gradient is rounding noise that Adam turns into steps, so it
    # differs between any two programs. Every other leaf must match.
    name = jax.tree_util.keystr(path)
    if "['text_encoder']" in name and "['attn']['k']['bias']" in name:
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_call_of_steps_is_those_steps_one_by_one():
  """compile_train_step(steps=2) on two batches = two one-step calls: same state and last-step
  metrics, and the replaced clips of both batches counted (data/skipped)."""
  from jaxvid.data import pipeline
  from jaxvid.train import step as step_lib
  cfg = config.load(TINY, SMALL)
  run = compiled_train_step(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  shardings = jax.tree.map(lambda a: a.sharding, run.state)
  batch_shardings = run.loader.shardings(pipeline.batch_spec(cfg))
  two = step_lib.compile_train_step(step_lib.make_train_step(cfg, run.graphdef, tx, schedule), run.mesh,
                                    sharding.rules_from_config(cfg), shardings, batch_shardings, None, steps=2)
  batches = [next(run.loader) for _ in range(2)]
  for i, b in enumerate(batches):         # as if 1 and 2 clips of these batches had been replaced
    skipped = np.zeros(b["skipped"].shape, np.int32)
    skipped.reshape(-1)[:i + 1] = 1
    b["skipped"] = jax.device_put(skipped, b["skipped"].sharding)
  copy = lambda: jax.tree.map(jnp.copy, run.state)
  state, m1 = run.step(copy(), batches[0], {})
  state, m2 = run.step(state, batches[1], {})
  # Finished before the next call: on simulated CPU devices, two programs with collectives that
  # run at once can take all of XLA's threads (8 here, one per device) waiting in their
  # all-reduces, and hang until XLA aborts the process (40 s). A run only ever has one in flight:
  # each step takes the state of the step before.
  jax.block_until_ready(state)
  state2, m = two(copy(), batches, {})
  assert int(m1["data/skipped"]) + int(m2["data/skipped"]) == int(m["data/skipped"]) == 3
  assert int(state2.step) == int(state.step) == 2
  np.testing.assert_allclose(float(m["loss"]), float(m2["loss"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_steps_per_call_must_be_positive(tmp_path, capsys):
  assert train_small(tmp_path / "run", "--config.train.steps_per_call=0") != 0
  assert "train.steps_per_call=0 must be at least 1" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def _snapshot(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_workdir_of_another_model_is_refused_and_untouched(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert train_small(workdir, "--config.train.steps=2") == 0
  before = _snapshot(workdir)
  assert train_small(workdir, "--config.train.steps=4", "--config.model.width=64") == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "holds a run of a different model" in err and "model.width: saved 32, now 64" in err
  assert _snapshot(workdir) == before
  # Same with config.json gone: the checkpoint's own config is checked.
  os.remove(workdir / "config.json")
  before = _snapshot(workdir)
  assert train_small(workdir, "--config.train.steps=4", "--config.model.width=64") == 2
  assert "holds a different model" in capsys.readouterr().err
  assert _snapshot(workdir) == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert train_small(workdir, "--config.train.steps=2") == 0
  for d, _, files in os.walk(workdir / "checkpoints" / "2" / "config"):
    for f in files:
      open(os.path.join(d, f), "w").write("garbage{")
  assert train_small(workdir, "--config.train.steps=4") == 2
  err = capsys.readouterr().err
  assert "checkpoint" in err and "corrupt or not a jaxvid checkpoint" in err
  assert (workdir / "checkpoints" / "2").exists()


def test_a_frozen_text_encoder_stays_put_while_the_transformer_trains():
  """optim.frozen on the DiT (weight decay on): two steps leave every text-encoder parameter and
  its EMA exactly as created and move the others."""
  cfg = config.load(TINY, SMALL + ["--config.optim.frozen=^text_encoder/", "--config.optim.weight_decay=0.1",
                                   "--config.optim.warmup_steps=0"])
  t = compiled_train_step(cfg)
  before = jax.tree.map(np.asarray, t.state.params)
  state = t.state
  for _ in range(2):
    state, _ = t.step(state, next(t.loader), {})
  flat = jax.tree_util.tree_flatten_with_path(before)[0]
  frozen = 0
  for (path, b), p, e in zip(flat, jax.tree.leaves(state.params), jax.tree.leaves(state.ema)):
    name = state_lib.param_path(path)
    if name.startswith("text_encoder/"):
      frozen += 1
      np.testing.assert_array_equal(np.asarray(p), b, err_msg=name)
      np.testing.assert_array_equal(np.asarray(e), b, err_msg=name)
    elif name.endswith("kernel"):
      assert not np.array_equal(np.asarray(p), b), name
  assert frozen > 4


def test_flow_loss_decreases_when_overfitting_one_batch():
  cfg = config.load(TINY, SMALL + ["--config.optim.lr=3e-3", "--config.text.drop_rate=0.0",
                                   "--config.optim.warmup_steps=1", "--config.train.steps=40"])
  t = compiled_train_step(cfg)
  graphdef, state, step = t.graphdef, t.state, t.step
  batch = next(t.loader)
  flow = flow_lib.Flow.from_config(cfg)

  @jax.jit
  def eval_loss(params):   # fixed times and noise, so the number only moves with the parameters
    model = nnx.merge(graphdef, params)
    emb, mask = model.encode_text(batch["tokens"])
    losses = [flow_lib.loss(lambda x, t: model(x, t, emb, mask), autoencoder.normalize(batch["video"]),
                            jax.random.key(i), flow) for i in range(4)]
    return jnp.mean(jnp.stack(losses))

  before = float(eval_loss(state.params))
  for _ in range(40):
    state, _ = step(state, batch, {})
  after = float(eval_loss(state.params))
  assert after < 0.8 * before, (before, after)
