"""What differs between model families in the one trainer (loop.py), chosen by `model.name`.

  dit  the text-to-video diffusion transformer: the flow-matching step (step.py) on the
       autoencoder's latents; no evaluation; nothing kept beside its parameters
  vae  the causal video autoencoder: the reconstruction + KL step (vae_step.py); held-out PSNR
       and SSIM (vae_eval.py); the per-channel latent statistics, written beside its
       parameters when training stops and into exports (vae_eval.py); a VAE trained on images
       that --init_from brings to a run on clips is inflated (vae.inflate_from_images)

Everything else (mesh, input, state, checkpoints, preemption, metrics) is shared.
"""

import dataclasses
import logging
from typing import Callable

from flax import nnx
import jax
import ml_collections

from jaxvid import config as config_lib
from jaxvid.diffusion import flow as flow_lib
from jaxvid.models import vae as vae_lib
from jaxvid.train import step as step_lib
from jaxvid.train import vae_eval
from jaxvid.train import vae_step

log = logging.getLogger("jaxvid")


@dataclasses.dataclass(frozen=True)
class Task:
  # (cfg, graphdef, tx, schedule) -> train_step(state, batch, ae_params) -> (state, metrics)
  make_train_step: Callable
  # (cfg, global batch spec) -> tokens in the batch, for tokens_per_sec
  tokens: Callable
  # (cfg, num_params) -> one line describing the model for the log
  describe: Callable
  # (cfg, graphdef, mesh, rules) -> evaluate(state) -> {name: float}, with `.every` (steps); or None
  make_evaluator: Callable = lambda cfg, graphdef, mesh, rules: None
  # (cfg, graphdef, params, step, directory, mesh, rules, source=run directory or None): files kept
  # beside the parameters of `step` (an export passes the run it is made from)
  finalize: Callable = lambda cfg, graphdef, params, step, directory, mesh, rules, source=None: None
  # (source cfg, cfg, graphdef) -> None, or f(params) -> params that makes the parameters (and
  # EMA) --init_from takes from a run of config `source` fit this run
  adapt_init: Callable = lambda source, cfg, graphdef: None


def _dit_tokens(cfg: ml_collections.ConfigDict, spec: dict) -> int:
  """Spacetime patches: of the pixel clips' latent grid, or of the stored latents."""
  if "video" in spec:
    b, *clip = spec["video"].shape[:4]
    return b * config_lib.num_tokens(cfg, tuple(clip))
  b, t, h, w = spec["latents"].shape[:4]
  pt, ph, pw = cfg.model.patch
  return b * (t // pt) * (h // ph) * (w // pw)


def _vae_tokens(cfg: ml_collections.ConfigDict, spec: dict) -> int:
  """Latent cells (T' H' W' per clip): the positions the VAE compresses each clip to."""
  b, *clip = spec["video"].shape[:4]
  t, h, w, _ = vae_lib.latent_shape(cfg.vae, *clip)
  return b * t * h * w


def _dit_describe(cfg: ml_collections.ConfigDict, num_params: int) -> str:
  return (f"{num_params / 1e6:.2f}M parameters, {config_lib.num_tokens(cfg)} tokens per clip, "
          f"flow shift {flow_lib.resolve_shift(cfg):.2f}, autoencoder {cfg.autoencoder.name}")


def _vae_describe(cfg: ml_collections.ConfigDict, num_params: int) -> str:
  v = cfg.video
  latent = vae_lib.latent_shape(cfg.vae, v.frames, v.height, v.width)
  return (f"VAE, {num_params / 1e6:.2f}M parameters, {v.frames}x{v.height}x{v.width} clips -> "
          f"{'x'.join(map(str, latent))} latents")


def _vae_adapt_init(source: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, graphdef):
  """A VAE trained on images only starting a run on clips: inflated (`vae.inflate_from_images`:
  every frame coded as the images were), in one compiled call that keeps each parameter's
  sharding. Otherwise None: the parameters fit as they are."""
  if not vae_lib.trained_on_images(source) or vae_lib.trained_on_images(cfg):
    return None

  def inflate(params):
    model = nnx.merge(graphdef, params)
    vae_lib.inflate_from_images(model)
    return nnx.state(model, nnx.Param)

  log.info("--init_from a VAE trained on images: inflated to clips (earlier temporal taps zero, each "
           "temporal upsample's first frame a copy of its second)")
  return lambda params: jax.jit(inflate, out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


TASKS = {
    "dit": Task(make_train_step=step_lib.make_train_step, tokens=_dit_tokens, describe=_dit_describe),
    "vae": Task(make_train_step=vae_step.make_train_step, tokens=_vae_tokens, describe=_vae_describe,
                make_evaluator=vae_eval.make_evaluator, finalize=vae_eval.write_latent_statistics,
                adapt_init=_vae_adapt_init),
}


def get(cfg: ml_collections.ConfigDict) -> Task:
  return TASKS[cfg.model.name]
