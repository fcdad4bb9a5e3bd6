"""Training the VAE through the one trainer, and the DiT in its latent space."""

import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LATENT_SMALL, TINY, VAE, VAE_SMALL, compiled_train_step, restore_run, train_vae_small
from jaxvid import cli, config
from jaxvid.data import pipeline, synthetic
from jaxvid.models import autoencoder
from jaxvid.models import vae as vae_lib
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib
from jaxvid.train import vae_step
from jaxvid.train import video_quality


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_vae_run_writes_the_usual_metrics_and_held_out_psnr_ssim(trained_vae):
  rows = _metrics(trained_vae)
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert {"loss", "lr", "grad_norm", "steps_per_sec", "tokens_per_sec", "time", "recon/l1", "kl"} <= set(r)
    assert 0 < r["eval/psnr"] < 60 and -1 <= r["eval/ssim"] <= 1
  assert sorted(os.listdir(trained_vae / "checkpoints")) == ["2", "4"]
  with open(trained_vae / autoencoder.LATENT_STATS) as f:
    stats = json.load(f)
  assert stats["step"] == 4 and stats["clips"] == 16 and len(stats["mean"]) == len(stats["std"]) == 4


def test_vae_resume_matches_an_uninterrupted_run(tmp_path):
  common = ("--config.checkpoint.every=2", "--config.train.log_every=1", "--config.vae.eval_clips=0",
            "--config.vae.stats_clips=8")
  assert train_vae_small(tmp_path / "once", "--config.train.steps=4", *common) == 0
  assert train_vae_small(tmp_path / "twice", "--config.train.steps=2", *common) == 0
  assert train_vae_small(tmp_path / "twice", "--config.train.steps=4", *common) == 0
  once, twice = _metrics(tmp_path / "once"), _metrics(tmp_path / "twice")
  assert [r["step"] for r in twice] == [1, 2, 3, 4]
  assert [r["loss"] for r in once] == [r["loss"] for r in twice]
  # Latent statistics follow the latest checkpoint of each invocation.
  assert json.load(open(tmp_path / "twice" / autoencoder.LATENT_STATS))["step"] == 4


def test_steps_per_call_trains_the_vae_like_one_step_a_call(tmp_path):
  """Two VAE steps in one program (a lax.scan, where the convolutions' gradients run inside a
  loop) give the states and metrics of one step a call (float32 sums in another order: 1e-5)."""
  common = ("--config.train.steps=4", "--config.checkpoint.every=2", "--config.vae.eval_clips=0",
            "--config.vae.stats_clips=8", "--config.optim.warmup_steps=0")
  assert train_vae_small(tmp_path / "one", *common) == 0
  assert train_vae_small(tmp_path / "two", *common, "--config.train.steps_per_call=2") == 0
  one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
  assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4]
  for a, b in zip(one, two):
    np.testing.assert_allclose([b["loss"], b["grad_norm"]], [a["loss"], a["grad_norm"]], rtol=1e-5)
  for x, y in zip(*(jax.tree.leaves(restore_run(tmp_path / run, 4)) for run in ("one", "two"))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_a_vae_trained_on_images_starts_a_run_on_clips_inflated(tmp_path, capsys):
  """--init_from a run on 1-frame clips into a run on 5-frame clips: the parameters and the EMA
  arrive through `vae.inflate_from_images` (learning rate 0, so one step leaves the parameters
  as they came and moves the EMA towards them). Its optimizer state does not fit the inflated
  parameters, and a DiT on clips cannot use the image-only VAE."""
  common = ("--config.checkpoint.every=2", "--config.vae.eval_clips=0", "--config.vae.stats_clips=8")
  images = tmp_path / "images"
  assert train_vae_small(images, "--config.video.frames=1", "--config.train.steps=2", *common) == 0
  assert train_vae_small(tmp_path / "clips", "--config.train.steps=1", "--config.optim.lr=0.0", *common,
                         "--init_from", str(images)) == 0
  source, started = restore_run(images, 2), restore_run(tmp_path / "clips", 1)
  cfg = config.load(f"{VAE}:S", VAE_SMALL)
  graphdef, _ = state_lib.abstract_model(cfg)

  def inflated(params):   # [before, after] of each leaf
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, jax.device_get(params)))
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    vae_lib.inflate_from_images(model)
    return before, [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

  (before, params), (_, ema) = inflated(source.params), inflated(source.ema)
  d = float(step_lib.ema_decay(cfg.optim.ema_decay, 0))
  for p, e, got_p, got_e in zip(params, ema, jax.tree.leaves(started.params), jax.tree.leaves(started.ema)):
    np.testing.assert_array_equal(np.asarray(got_p), p)
    np.testing.assert_allclose(np.asarray(got_e), d * e + (1 - d) * p, rtol=1e-6, atol=1e-7)
  assert sum(not np.array_equal(x, y) for x, y in zip(before, params)) > 10   # every temporal kernel

  capsys.readouterr()
  assert train_vae_small(tmp_path / "opt", "--config.train.steps=1", *common, "--init_from", str(images),
                         "--init_optimizer") == 2
  assert "drop --init_optimizer" in capsys.readouterr().err
  assert cli.main(["train", "--config", f"{TINY}:latent", "--workdir", str(tmp_path / "dit"), *LATENT_SMALL,
                   f"--config.autoencoder.checkpoint={images}", "--config.train.steps=1"]) == 2
  assert "trained on images only" in capsys.readouterr().err


def test_frozen_parameters_keep_the_source_ema_while_the_rest_train(trained_vae, tmp_path, capsys):
  """optim.frozen="^encoder/" from a trained run (weight decay on, so a frozen parameter would move
  if it were updated at all): after two steps the encoder and its EMA are bit for bit the source's
  EMA encoder, the decoder has moved, and the latent statistics are the source's. A pattern that
  names nothing, or is not a regular expression, is a one-line error."""
  frozen = ("--config.optim.frozen=^encoder/", "--config.optim.weight_decay=0.1", "--config.vae.eval_clips=0",
            "--config.vae.stats_clips=16", "--config.checkpoint.every=2")
  assert train_vae_small(tmp_path / "dec", "--config.train.steps=2", *frozen, "--init_from", str(trained_vae)) == 0
  source, tuned = restore_run(trained_vae, 4), restore_run(tmp_path / "dec", 2)
  moved = {}
  for (path, e), p, got_p, got_e in zip(jax.tree_util.tree_flatten_with_path(source.ema)[0], jax.tree.leaves(source.params),
                                        jax.tree.leaves(tuned.params), jax.tree.leaves(tuned.ema)):
    name = state_lib.param_path(path)
    if name.startswith("encoder/"):
      np.testing.assert_array_equal(np.asarray(got_p), np.asarray(e), err_msg=name)
      np.testing.assert_array_equal(np.asarray(got_e), np.asarray(e), err_msg=name)
    else:
      moved[name] = not np.array_equal(np.asarray(got_p), np.asarray(p))
  assert moved and all(moved.values()), [k for k, v in moved.items() if not v]
  stats = [json.loads((run / autoencoder.LATENT_STATS).read_text()) for run in (trained_vae, tmp_path / "dec")]
  np.testing.assert_allclose(stats[1]["mean"], stats[0]["mean"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats[1]["std"], stats[0]["std"], rtol=1e-5, atol=1e-6)

  capsys.readouterr()
  assert train_vae_small(tmp_path / "none", "--config.train.steps=1", "--config.optim.frozen=^encoderz") == 2
  assert "matches no parameter" in capsys.readouterr().err
  assert train_vae_small(tmp_path / "bad", "--config.train.steps=1", "--config.optim.frozen=(") == 2
  assert "not a regular expression" in capsys.readouterr().err
  assert not (tmp_path / "bad" / "checkpoints").exists()


def _setup(*overrides):
  """State, compiled step and loader of VAE_SMALL on one device (compiles faster than 8)."""
  cfg = config.load(f"{VAE}:S", VAE_SMALL + list(overrides))
  t = compiled_train_step(cfg, jax.devices()[:1])
  return cfg, t.graphdef, t.state, t.step, t.loader


def test_a_few_steps_reduce_the_reconstruction_loss():
  cfg, graphdef, state, step, loader = _setup("--config.optim.lr=3e-3", "--config.optim.warmup_steps=1")
  batch = next(loader)

  @jax.jit
  def recon_l1(params):   # posterior means: the number only moves with the parameters
    model = nnx.merge(graphdef, params)
    x = autoencoder.normalize(batch["video"])
    return jnp.mean(jnp.abs(model.decode(model.encode(x)[0]) - x))

  before = float(recon_l1(state.params))
  for _ in range(20):
    state, metrics = step(state, batch, {})
  after = float(recon_l1(state.params))
  assert after < 0.7 * before, (before, after)


def test_going_past_the_pixel_range_costs_nothing_only_where_the_target_is_on_its_end():
  x = jnp.array([-1.0, -1.0, -1.0, 0.0, 0.2, 1.0, 1.0, 1.0])
  recon = jnp.array([-1.5, -0.5, -1.0, 1.5, -1.3, 1.5, 0.5, 1.0])
  np.testing.assert_allclose(vae_step.pixel_error(recon, x), [0.0, 0.5, 0.0, 1.5, -1.5, 0.0, -0.5, 0.0], atol=1e-7)
  # uint8 video that round-trips through normalize sits exactly on the ends
  ends = autoencoder.normalize(jnp.array([0, 255], jnp.uint8))
  np.testing.assert_array_equal(vae_step.pixel_error(ends + jnp.array([-0.1, 0.1]), ends), [0.0, 0.0])


def test_ssim_and_adversarial_terms_train_the_discriminator():
  cfg, graphdef, state, step, loader = _setup("--config.vae.ssim=0.5", "--config.vae.adversarial=0.1",
                                               "--config.vae.adversarial_start=1")
  disc = lambda s: jax.tree.map(np.asarray, s.params["discriminator"])
  before = disc(state)
  state, first = step(state, next(loader), {})
  state, second = step(state, next(loader), {})
  for key in ("recon/ssim", "adv/generator", "adv/discriminator"):
    assert np.isfinite(float(first[key])) and np.isfinite(float(second[key]))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(disc(state))))


def test_psnr_and_ssim_of_known_videos():
  a = np.zeros((2, 3, 16, 16, 3), np.float32)
  b = a.copy()
  b[1] += 0.1                                  # mse 0.01 -> 20 dB
  np.testing.assert_allclose(video_quality.psnr(a, b)[1], 20.0, rtol=1e-5)
  np.testing.assert_allclose(video_quality.ssim(a + 0.5, a + 0.5), 1.0, atol=1e-6)
  noisy = a + 0.5 + np.random.default_rng(0).normal(0, 0.2, a.shape).astype(np.float32)
  assert float(video_quality.ssim(a + 0.5, noisy)[0]) < 0.5


@pytest.fixture(scope="module")
def latent_dit(trained_vae, tmp_path_factory):
  """configs/tiny.py:latent (LATENT_SMALL) trained for 2 steps on the latents of `trained_vae`."""
  workdir = tmp_path_factory.mktemp("latent_dit") / "run"
  argv = ["train", "--config", f"{TINY}:latent", "--workdir", str(workdir), *LATENT_SMALL,
          f"--config.autoencoder.checkpoint={trained_vae}", "--config.train.steps=2", "--config.train.log_every=1"]
  assert cli.main(argv) == 0
  return workdir


def test_dit_trains_on_the_latents_of_a_vae_checkpoint(latent_dit):
  workdir = latent_dit
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  cfg = config.from_json(open(workdir / "config.json").read())
  assert config.num_tokens(cfg) == 2 * 2 * 2          # 5x32x32 clips -> 2x4x4 latents, patch 1x2x2
  _, abstract = state_lib.abstract_model(cfg)
  assert abstract["patch_embedding"]["kernel"].shape[0] == 2 * 2 * (4 + 1)   # patch 1x2x2 of 4 channels + the known mask
  # The DiT's checkpoint holds no VAE parameters: those stay in the VAE's run.
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_sampling_noise_decodes_through_the_vae(trained_vae):
  """What the sampler does with an autoencoder: noise of ae.latent_shape, decoded with ae_params
  passed to the jitted function."""
  cfg = config.load(f"{TINY}:latent", LATENT_SMALL + [f"--config.autoencoder.checkpoint={trained_vae}"])
  ae = autoencoder.make(cfg)
  mesh = mesh_lib.make_mesh(cfg)
  params = ae.load(mesh)
  v = cfg.video
  shape = ae.latent_shape(v.frames, v.height, v.width, v.channels)

  @jax.jit
  def generate(params, seeds):
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape))(seeds)
    return autoencoder.denormalize(ae.decode(params, noise))

  videos = generate(params, jnp.arange(8))
  assert videos.shape == (8, v.frames, v.height, v.width, 3) and videos.dtype == jnp.uint8


def test_jaxvid_sample_decodes_and_extends_through_the_vae(latent_dit, tmp_path):
  """Text-to-video, extension and in-painting through the VAE: the given frames and pixels come
  out as given (one latent frame of context: 1 + 4 k pixel frames)."""
  from jaxvid.sample import writer
  clip = synthetic.render(synthetic.make_scene(0, 1), 5, 32, 32)
  writer.write_mp4(tmp_path / "clip.mp4", clip, fps=8)
  given = writer.read_mp4(tmp_path / "clip.mp4")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "a red circle moving left on a gray background", "id": "t2v"}) + "\n" +
                     json.dumps({"prompt": "a red circle", "id": "ext", "video": "clip.mp4", "extend": 8}) + "\n" +
                     json.dumps({"prompt": "a red circle", "id": "inp", "video": "clip.mp4", "mask": [[8, 8, 24, 24]]}) +
                     "\n")
  out = tmp_path / "samples"
  assert cli.main(["sample", "--workdir", str(latent_dit), "--prompts", str(prompts), "--output", str(out)]) == 0
  assert writer.read_mp4(out / "t2v.mp4").shape == (5, 32, 32, 3)
  extended = writer.read_mp4(out / "ext.mp4")
  assert extended.shape == (13, 32, 32, 3)
  # The clip itself is pasted back (up to re-encoding); the rest is new.
  assert np.abs(extended[:5].astype(int) - given).mean() < 3.0
  assert json.loads((out / "ext.json").read_text())["mode"] == "extend"
  # In-painting: outside the box the clip as given (pasted back, not the VAE's reconstruction).
  inpainted = writer.read_mp4(out / "inp.mp4").astype(int)
  outside = np.ones((32, 32), bool)
  outside[8:24, 8:24] = False
  assert np.abs(inpainted - given)[:, outside].mean() < 3.0


def test_a_run_samples_only_through_the_vae_it_was_trained_with(latent_dit, trained_vae, tmp_path, capsys):
  record = json.loads((latent_dit / autoencoder.RECORD).read_text())
  assert record["checkpoint"] == os.path.abspath(trained_vae)
  prompt = ["--prompt", "a red circle", "--output"]
  # The VAE run itself is not a text-to-video model.
  assert cli.main(["sample", "--workdir", str(trained_vae), *prompt, str(tmp_path / "a")]) == 2
  assert "not a text-to-video DiT" in capsys.readouterr().err
  # A VAE whose latent statistics changed since (trained further, or another one) is refused.
  other = tmp_path / "other_vae"
  shutil.copytree(trained_vae, other)
  stats = json.loads((other / autoencoder.LATENT_STATS).read_text())
  stats["std"] = [2 * x for x in stats["std"]]
  (other / autoencoder.LATENT_STATS).write_text(json.dumps(stats))
  assert cli.main(["sample", "--workdir", str(latent_dit), *prompt, str(tmp_path / "b"),
                   f"--config.autoencoder.checkpoint={other}"]) == 2
  assert "was trained in the latents of the VAE" in capsys.readouterr().err
  assert not (tmp_path / "b").exists()
  # An export of the same VAE step is the same VAE (its latent statistics are copied, not recomputed).
  export = tmp_path / "vae_export"
  assert cli.main(["export", "--workdir", str(trained_vae), "--output", str(export)]) == 0
  assert (export / autoencoder.LATENT_STATS).read_bytes() == (trained_vae / autoencoder.LATENT_STATS).read_bytes()
  assert cli.main(["sample", "--workdir", str(latent_dit), *prompt, str(tmp_path / "c"),
                   f"--config.autoencoder.checkpoint={export}", "--config.sample.steps=1"]) == 0
  # Resuming the run with another VAE is refused before anything in the workdir changes.
  run = tmp_path / "latent_run"
  shutil.copytree(latent_dit, run)
  before = (run / "config.json").read_bytes()
  assert cli.main(["train", "--config", f"{TINY}:latent", "--workdir", str(run), *LATENT_SMALL,
                   f"--config.autoencoder.checkpoint={other}", "--config.train.steps=3"]) == 2
  assert "was trained in the latents of the VAE" in capsys.readouterr().err
  assert (run / "config.json").read_bytes() == before


def test_a_relative_vae_path_is_recorded_absolute(trained_vae, monkeypatch):
  monkeypatch.chdir(trained_vae.parent)
  cfg = config.load(f"{TINY}:latent", [*LATENT_SMALL, f"--config.autoencoder.checkpoint={trained_vae.name}"])
  assert cfg.autoencoder.checkpoint == str(trained_vae)      # config.json then works from any directory


def test_latent_cache_through_the_vae(trained_vae, tmp_path):
  """`jaxvid encode` writes the VAE's normalized latents; the DiT trains from the store, and a
  store of another VAE (other latent statistics) is refused."""
  import imageio.v3 as iio
  from jaxvid.data import latents
  rows = []
  for i in range(4):
    frames = synthetic.render(synthetic.make_scene(0, i), 8, 32, 32)
    iio.imwrite(tmp_path / f"clip{i}.mp4", frames, fps=8, codec="libx264", macro_block_size=1)
    rows.append(json.dumps({"path": f"clip{i}.mp4", "caption": synthetic.make_scene(0, i).caption}))
  (tmp_path / "clips.jsonl").write_text("\n".join(rows) + "\n")
  common = [*LATENT_SMALL, f"--config.autoencoder.checkpoint={trained_vae}", "--config.train.batch_size=8",
            "--config.data.buckets=((5,32,32,8),)"]
  store = tmp_path / "store"
  assert cli.main(["encode", "--config", f"{TINY}:latent", *common, "--manifest", str(tmp_path / "clips.jsonl"),
                   "--output", str(store)]) == 0
  meta = latents.read_meta(str(store))
  assert meta["autoencoder"] == "vae" and meta["buckets"][0]["latent_shape"] == [2, 4, 4, 4]
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", f"{TINY}:latent", "--workdir", str(workdir), *common,
                   "--config.data.source=latents", f"--config.data.store={store}", "--config.train.steps=1"]) == 0
  assert np.isfinite(_metrics(workdir)[-1]["loss"])
  # Other latent statistics: another VAE as far as the store is concerned.
  stats = json.load(open(trained_vae / autoencoder.LATENT_STATS))
  other = tmp_path / "other_vae"
  import shutil
  shutil.copytree(trained_vae, other)
  autoencoder.write_latent_stats(str(other), stats["step"], 1, np.zeros(4), np.ones(4))
  cfg = config.load(f"{TINY}:latent", common + [f"--config.autoencoder.checkpoint={other}",
                                                 "--config.data.source=latents", f"--config.data.store={store}"])
  with pytest.raises(Exception, match="holds latents of another vae"):
    pipeline.make_source(cfg, 0, 1, 8)
  # A VAE that cannot load (here: no latent statistics) fails before a store is made, so the
  # corrected command can write to the same --output.
  (other / autoencoder.LATENT_STATS).unlink()
  assert cli.main(["encode", "--config", f"{TINY}:latent", *common, f"--config.autoencoder.checkpoint={other}",
                   "--manifest", str(tmp_path / "clips.jsonl"), "--output", str(tmp_path / "store2")]) == 2
  assert not (tmp_path / "store2").exists()
