"""The causal video VAE: shapes, causality, chunked and tiled encode/decode against whole clips,
the latent mask, and the autoencoder interface on a trained run (restore, export round trip)."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LATENT_SMALL, TINY, VAE, VAE_SMALL
from jaxvid import config
from jaxvid.errors import UserError
from jaxvid.models import autoencoder, vae, vae_tiling
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.train import export as export_lib


def _cfg(*overrides):
  return config.load(f"{VAE}:S", VAE_SMALL + list(overrides))


def _model(*overrides, seed=0):
  """A VAE with random parameters, initialized in one compiled program (not op by op); its
  zero-initialized output layer made random too, so that every path reaches the output."""
  cfg = _cfg(*overrides)
  model = nnx.jit(lambda: vae.build(cfg, seed))()
  kernel = model.decoder.conv_out.kernel
  kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), kernel.shape)
  return model


def _jit(model):
  """(encode, decode) of `model`, compiled: video -> moments (whole clips), z -> video."""
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encoder(x)[0])
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  return (lambda x: encode(state, x)), (lambda z: decode(state, z))


def _video(frames, height=32, width=32, batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, frames, height, width, 3), minval=-1.0, maxval=1.0)


def _shapes(*overrides):
  """(encode, decode) on shapes only (jax.eval_shape of the abstract model: nothing runs)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae.build(_cfg(*overrides))))
  encode = lambda x: jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, x)
  decode = lambda z: jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, z)
  return encode, decode


def test_shapes():
  encode, decode = _shapes()
  for frames in (1, 5, 17):
    mean, logvar = encode(_video(frames))
    assert mean.shape == logvar.shape == (2, 1 + (frames - 1) // 4, 4, 4, 4)
    assert decode(mean).shape == (2, frames, 32, 32, 3)
    assert vae.latent_shape(_cfg().vae, frames, 32, 32) == mean.shape[1:]
  encode, decode = _shapes("--config.vae.temporal_compression=2", "--config.vae.spatial_compression=16",
                           "--config.vae.patch=2", "--config.vae.channel_mult=(1,1,1,1)")
  mean, _ = encode(_video(7, 32, 32, batch=1))
  assert mean.shape == (1, 4, 2, 2, 4)
  assert decode(mean).shape == (1, 7, 32, 32, 3)


@pytest.mark.parametrize("kernel, stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2)), ((1, 3, 3), (1, 2, 2)),
                                            ((1, 3, 3), (1, 1, 1)), ((3, 1, 1), (2, 1, 1)), ((3, 1, 1), (1, 1, 1)),
                                            ((1, 1, 1), (1, 1, 1))])
def test_folded_convolution_matches_the_3d_one(kernel, stride):
  """The CPU's folded convolution (frames of a window stacked along channels, then 2D) computes
  what the 3D one does, forward and gradients, for every kernel/stride the VAE and its
  discriminator use; odd sizes and a trailing frame a stride-2 window drops included (float32
  sums in another order: 1e-5)."""
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 8, 7, 6, 5))
  k = 0.2 * jax.random.normal(kk, (*kernel, 5, 4))
  with jax.default_matmul_precision("highest"):
    outs = {impl: jax.jit(lambda x, k, impl=impl: vae.conv3d(x, k, stride, impl))(x, k) for impl in ("3d", "folded")}
    g = jax.random.normal(kg, outs["3d"].shape)
    grads = {impl: jax.jit(jax.grad(lambda x, k, impl=impl: jnp.sum(g * vae.conv3d(x, k, stride, impl)), (0, 1)))(x, k)
             for impl in ("3d", "folded")}
  assert outs["3d"].shape == outs["folded"].shape == (2, (8 - kernel[0]) // stride[0] + 1, -(-7 // stride[1]),
                                                      -(-6 // stride[2]), 4)
  np.testing.assert_allclose(outs["folded"], outs["3d"], atol=1e-5)
  for folded, reference in zip(grads["folded"], grads["3d"]):
    np.testing.assert_allclose(folded, reference, atol=1e-4)
  with pytest.raises(ValueError, match="not one of"):
    vae.conv3d(x, k, stride, "2d")


@pytest.mark.parametrize("kernel, stride", [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (2, 1, 1)), ((3, 1, 1), (1, 1, 1)),
                                            ((3, 3, 3), (1, 2, 2))])
def test_an_image_runs_only_the_last_tap_and_keeps_the_same_cache(kernel, stride):
  """A lone first frame (no cache) convolves with the kernel's last tap only; output and cache
  are what the zero-padded clip gives (passing the zero past as a cache takes the general path)."""
  conv = nnx.jit(lambda: vae.CausalConv3d(5, 4, kernel, stride, dtype=jnp.float32, param_dtype=jnp.float32))()
  conv.kernel[...] = jax.random.normal(jax.random.key(0), conv.kernel.shape)
  conv.bias[...] = jnp.arange(4.0)
  x = jax.random.normal(jax.random.key(1), (2, 1, 6, 6, 5))
  with jax.default_matmul_precision("highest"):
    y, cache = conv(x)
    reference, reference_cache = conv(x, jnp.zeros((2, kernel[0] - 1, 6, 6, 5)))
  np.testing.assert_allclose(y, reference, atol=1e-5)
  np.testing.assert_array_equal(cache, reference_cache)
  assert float(jnp.max(jnp.abs(y))) > 1.0


@pytest.mark.parametrize("norm, shortcuts", [("rms", True), ("group", False)])
def test_encoder_is_causal_and_encodes_the_first_frame_alone(norm, shortcuts):
  encode, _ = _jit(_model(f"--config.vae.norm={norm}", "--config.vae.groups=4", f"--config.vae.shortcuts={shortcuts}"))
  video = _video(13)
  moments = encode(video)
  # Changing frame 6 changes latent frames j with 4j >= 6 (j >= 2) only.
  changed = encode(video.at[:, 6].add(0.5))
  np.testing.assert_allclose(changed[:, :2], moments[:, :2], atol=1e-6)
  assert float(jnp.max(jnp.abs(changed[:, 2:] - moments[:, 2:]))) > 1e-3
  # Frame 0 alone (an image) gives latent frame 0.
  np.testing.assert_allclose(encode(video[:, :1])[:, 0], moments[:, 0], atol=1e-5)


@pytest.mark.parametrize("shortcuts", [False, True])
def test_decoder_is_causal(shortcuts):
  _, decode = _jit(_model(f"--config.vae.shortcuts={shortcuts}"))
  z = jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 4))
  out = decode(z)
  changed = decode(z.at[:, 2].add(1.0))   # latent frame 2 decodes to frames 5..8
  np.testing.assert_allclose(changed[:, :5], out[:, :5], atol=1e-6)
  assert float(jnp.max(jnp.abs(changed[:, 5:9] - out[:, 5:9]))) > 1e-3


@pytest.mark.parametrize("shortcuts", [False, True])
def test_an_inflated_image_vae_codes_a_still_clip_as_its_image(shortcuts):
  """After `inflate_from_images` a clip of one image repeated is coded, latent frame by latent
  frame, as that image was, and decodes to that image's decode repeated; images are unchanged."""
  model = _model(f"--config.vae.shortcuts={shortcuts}")
  image = _video(1)
  still = jnp.repeat(image, 9, axis=1)
  encode, decode = _jit(model)
  image_moments = encode(image)
  image_z = image_moments[..., :4]
  image_decoded = decode(image_z)
  # Before: the random earlier taps of the temporal kernels mix the frames.
  assert float(jnp.max(jnp.abs(encode(still)[:, 1:] - image_moments))) > 1e-2
  vae.inflate_from_images(model)
  encode, decode = _jit(model)
  np.testing.assert_allclose(encode(image), image_moments, atol=1e-5)
  np.testing.assert_allclose(decode(image_z), image_decoded, atol=1e-5)
  moments = encode(still)
  np.testing.assert_allclose(moments, jnp.repeat(image_moments, 3, axis=1), atol=1e-5)
  np.testing.assert_allclose(decode(moments[..., :4]), jnp.repeat(image_decoded, 9, axis=1), atol=1e-5)


@pytest.mark.parametrize("norm, chunks, shortcuts", [("rms", (1, 2), True), ("group", (2,), False)])
def test_chunked_encode_and_decode_match_the_whole_clip(norm, chunks, shortcuts):
  """Exact up to float reassociation (1e-5 of the largest value): each causal convolution
  carries the frames its next window needs, no norm mixes frames, and the shortcuts' frame
  pairs never cross a chunk boundary."""
  model = _model(f"--config.vae.norm={norm}", "--config.vae.groups=4", f"--config.vae.shortcuts={shortcuts}")
  encode, decode = _jit(model)
  video = _video(13, batch=1)                                   # 4 latent frames
  whole = encode(video)
  z = whole[..., :4]
  whole_video = decode(z)
  for chunk in chunks:   # 4 = 1 + 3: a first chunk of 1 then 3 of 1, or of 2 (1 + 3 mod 2) then 1 of 2
    plan = vae_tiling.Plan(tc=4, sc=8, chunk=chunk)
    chunked = jax.jit(lambda v: vae_tiling.encode(model.encoder, v, plan))(video)
    np.testing.assert_allclose(chunked, whole, atol=1e-5 * float(jnp.max(jnp.abs(whole))))
    chunked_video = jax.jit(lambda z: vae_tiling.decode(model.decoder, z, plan))(z)
    np.testing.assert_allclose(chunked_video, whole_video, atol=1e-5 * float(jnp.max(jnp.abs(whole_video))))


def test_time_chunks_split_the_latent_frames():
  assert vae_tiling.time_chunks(6, 2) == (2, 2)     # 1 + 1 left over, then 2 chunks of 2
  assert vae_tiling.time_chunks(5, 2) == (1, 2)
  assert vae_tiling.time_chunks(5, 0) == (5, 0)
  assert vae_tiling.time_chunks(1, 3) == (1, 0)


def test_tile_starts_cover_with_equal_tiles_and_the_overlap():
  for size, tile, overlap in [(10, 4, 2), (16, 6, 2), (7, 4, 1), (5, 8, 2)]:
    starts = vae_tiling.tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:]))


def _spatially_local(model):
  """The model with every spatial kernel tap but the centre zeroed: each output pixel then depends
  only on its own latent cell (and the decoder's upsampling of it), so tiles must match exactly."""
  for _, p in nnx.iter_graph(model):
    if isinstance(p, nnx.Param) and p.ndim == 5 and p.shape[1] == 3:
      mask = np.zeros(p.shape, np.float32)
      mask[:, 1, 1] = 1.0
      p[...] = p[...] * mask
  return model


def test_tiled_decode_blends_tiles_into_the_whole_frame():
  model = _spatially_local(_model())
  encode, decode = _jit(model)
  z = jax.random.normal(jax.random.key(2), (1, 2, 7, 9, 4))     # 56 x 72 pixels
  whole = decode(z)
  for tile, overlap in [(4, 2), (5, 3)]:
    plan = vae_tiling.Plan(tc=4, sc=8, chunk=1, tile=tile, overlap=overlap)
    tiled = jax.jit(lambda z: vae_tiling.decode(model.decoder, z, plan))(z)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
  tiled_moments = jax.jit(lambda v: vae_tiling.encode(model.encoder, v, plan))(whole)
  np.testing.assert_allclose(tiled_moments, encode(whole), atol=1e-4)


def test_tiled_decode_seams_are_blended():
  """With the full receptive field a tile's border sees zero padding where the whole frame has
  its neighbours. Linear blending across the overlap keeps the difference from the whole-frame
  decode below cutting the frame into tiles without overlap, at the seams and overall."""
  model = _model()
  z = jax.random.normal(jax.random.key(3), (1, 1, 8, 8, 4))
  whole = np.asarray(_jit(model)[1](z))
  err = {}
  for name, overlap in (("blended", 2), ("cut", 0)):
    plan = vae_tiling.Plan(tc=4, sc=8, tile=4 + overlap, overlap=overlap)
    tiled = np.asarray(jax.jit(lambda z: vae_tiling.decode(model.decoder, z, plan))(z))
    seam = np.abs(tiled - whole)[:, :, 24:40, :] if overlap else np.abs(tiled - whole)[:, :, 28:36, :]
    err[name] = (np.sqrt(np.mean((tiled - whole) ** 2)), np.max(seam))
  assert err["blended"][0] < err["cut"][0] and err["blended"][1] < err["cut"][1], err


def test_latent_mask_keeps_only_cells_whose_pixels_are_all_known():
  ae = autoencoder.VAE(checkpoint="", run_config=_cfg(), plan=vae_tiling.Plan(tc=4, sc=8), encoder_def=None,
                       decoder_def=None)
  mask = np.ones((1, 9, 16, 16, 1), bool)
  mask[0, 0, 0, 0] = False         # frame 0 -> latent frame 0, cell (0, 0)
  mask[0, 6, 15, 8] = False        # frames 5..8 -> latent frame 2, cell (1, 1)
  cells = np.asarray(ae.latent_mask(jnp.asarray(mask)))
  assert cells.shape == (1, 3, 2, 2, 1)
  assert sorted(zip(*np.nonzero(~cells[..., 0]))) == [(0, 0, 0, 0), (0, 2, 1, 1)]
  assert ae.latent_shape(9, 16, 16) == (3, 2, 2, 4)


def _ae_config(checkpoint, *overrides):
  return config.load(f"{TINY}:latent", LATENT_SMALL + [f"--config.autoencoder.checkpoint={checkpoint}", *overrides])


def test_trained_vae_loads_and_its_latents_are_normalized(trained_vae):
  stats = autoencoder.read_latent_stats(str(trained_vae), 4)
  assert stats[0].shape == stats[1].shape == (4,) and np.all(stats[1] > 0)
  cfg = _ae_config(trained_vae)
  ae = autoencoder.make(cfg)
  mesh = mesh_lib.make_mesh(cfg)
  params = ae.load(mesh)
  assert set(params) == {"encoder", "decoder", "mean", "std"}
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.is_fully_replicated and leaf.sharding.mesh.shape == mesh.shape
  # The statistics were taken over the first clips of the run's own training stream.
  from jaxvid.data import pipeline
  video = np.concatenate([pipeline.make_source(_cfg(), 0, 1).batches[j]["video"] for j in range(2)])
  latents = jax.jit(ae.encode)(params, video)
  assert latents.shape == (16, *ae.latent_shape(5, 32, 32))
  flat = np.asarray(latents).reshape(-1, 4)
  np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-3)
  decoded = jax.jit(ae.decode)(params, latents)
  assert decoded.shape == video.shape and float(jnp.max(jnp.abs(decoded))) <= 1.0


def test_export_round_trip_gives_the_same_autoencoder(trained_vae, tmp_path):
  export_lib.export_run(export_lib.run_config(str(trained_vae)), str(trained_vae), str(tmp_path / "export"))
  assert os.path.isfile(tmp_path / "export" / autoencoder.LATENT_STATS)
  video = np.asarray(_video(5, batch=2) * 127 + 128).astype(np.uint8)
  outs = []
  for checkpoint in (trained_vae, tmp_path / "export"):
    ae = autoencoder.make(_ae_config(checkpoint))
    params = ae.load()
    outs.append((np.asarray(ae.encode(params, video)), params))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_autoencoder_checkpoint_errors_name_the_fix(trained_vae, tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    autoencoder.make(_ae_config(tmp_path / "nowhere"))
  (tmp_path / "dit").mkdir()
  (tmp_path / "dit" / "config.json").write_text(config.to_json(config.load(TINY)))
  with pytest.raises(UserError, match="holds a 'dit' model, not a VAE"):
    autoencoder.make(_ae_config(tmp_path / "dit"))
  with pytest.raises(UserError, match=r"set --config.autoencoder.latent_channels=4"):
    autoencoder.make(_ae_config(trained_vae, "--config.autoencoder.latent_channels=8"))
  with pytest.raises(UserError, match="needs --config.autoencoder.checkpoint"):
    config.validate(config.load(f"{TINY}:latent", ["--config.autoencoder.checkpoint="]), 8)
  with pytest.raises(UserError, match=r"takes 1 \+ 4k frames"):
    config.validate(_ae_config(trained_vae, "--config.video.frames=8"), 8)


@pytest.mark.parametrize("overrides, words", [
    (["--config.video.frames=8"], r"takes 1 \+ 4k frames and sides divisible by 8, not 8x32x32"),
    (["--config.video.height=36"], "sides divisible by 8"),
    (["--config.vae.channel_mult=(1,2)"], r"needs 3 positive entries"),
    (["--config.vae.temporal_compression=3"], "must be powers of two"),
    (["--config.vae.temporal_compression=16"], "temporal <= spatial"),
    (["--config.vae.patch=16"], "vae.patch=16 must be a power of two, at most"),
    (["--config.vae.norm=batch"], "vae.norm='batch' must be one of"),
    (["--config.vae.norm=group", "--config.vae.groups=3"], "vae.groups=3 must divide"),
    (["--config.vae.shortcuts=True", "--config.vae.latent_channels=3"], "latent_channels=3 to divide the last.*or --config.vae.shortcuts=False"),
    (["--config.vae.l1=0", "--config.vae.mse=0"], "vae.l1 \\+ vae.mse > 0"),
    (["--config.data.source=latents", "--config.data.store=x"], "a VAE trains on pixels"),
    (["--config.autoencoder.name=vae", "--config.autoencoder.checkpoint=x"], "set --config.autoencoder.name=identity"),
    (["--config.data.source=files", "--config.data.manifest=m.jsonl", "--config.data.buckets=((8,32,32),)"],
     r"data.buckets entry \(8, 32, 32\): a causal VAE"),
])
def test_vae_config_errors_name_the_key(overrides, words):
  with pytest.raises(UserError, match=words):
    config.validate(_cfg(*overrides), 8, train=True)


def test_latent_model_config_errors_name_the_key():
  latent = lambda *o: config.load(f"{TINY}:latent", list(o))
  config.validate(latent(), 8, train=True)
  with pytest.raises(UserError, match=r"video.height=48 \(6 latent height\) is not divisible by its patch size 4"):
    config.validate(latent("--config.video.height=48", "--config.model.patch=(1,4,4)"), 8)
  with pytest.raises(UserError, match="autoencoder.tile_overlap in"):
    config.validate(latent("--config.autoencoder.tile=2", "--config.autoencoder.tile_overlap=2"), 8)
  with pytest.raises(UserError, match="encodes RGB video"):
    config.validate(latent("--config.video.channels=4"), 8)
  cfg = latent()
  assert config.latent_shape(cfg) == (3, 4, 4, 16) and config.num_tokens(cfg) == 48
  assert config.model_hash(cfg) != config.model_hash(config.load(TINY, ["--config.video.frames=9",
                                                                        "--config.model.patch=(1,1,1)"]))
