"""The VAE's train step: (state, batch, ae_params) -> (state, metrics), like the DiT's (step.py).

  jaxvid train --config configs/vae.py --workdir runs/vae

The loss of a batch of clips x (pixels scaled to [-1, 1]) reconstructed through a posterior
sample, x' = decode(mean + sigma eps):

  vae.l1 |e| + vae.mse e^2 + vae.kl KL(q(z|x) || N(0, 1))     (means over elements)
  + vae.ssim (1 - SSIM(x, x'))                     a structural term that needs no pretrained network
  + vae.adversarial (-D(x'))                       from step vae.adversarial_start, hinge GAN

where e = x' - x; with vae.clipped_range going past -1 or 1 where x is -1 or 1 costs nothing
(`pixel_error`).
With an adversarial term the discriminator D (part of the model's parameters) is trained in the
same step on its hinge loss, relu(1 - D(x)) + relu(1 + D(x')), with x' held fixed; the VAE's
terms see D held fixed. One optimizer updates both.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxvid.models import autoencoder
from jaxvid.models import layers
from jaxvid.models import vae as vae_lib
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib
from jaxvid.train import video_quality
from jaxvid.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossWeights:
  l1: float = 0.0
  mse: float = 1.0
  kl: float = 1e-6
  ssim: float = 0.0
  adversarial: float = 0.0
  adversarial_start: int = 0
  clipped_range: bool = False

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "LossWeights":
    v = cfg.vae
    return cls(l1=v.l1, mse=v.mse, kl=v.kl, ssim=v.ssim, adversarial=v.adversarial,
               adversarial_start=v.adversarial_start, clipped_range=v.clipped_range)


def psnr_of_mse(mse: jax.Array) -> jax.Array:
  """PSNR in dB of a mean squared error on the [-1, 1] scale (peak to peak 2)."""
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def pixel_error(recon: jax.Array, x: jax.Array) -> jax.Array:
  """recon - x (both [B, T, H, W, 3], x in [-1, 1]), but zero where x sits on an end of the range
  and recon is past it: a decoded video is clipped to [-1, 1] (as `autoencoder.VAE.decode` and a
  saved video do), so saturated colors and black need not be hit exactly (`vae.clipped_range`). On
  a 1,500-step clip stage of S: held-out PSNR 27.7 against 26.9 dB, SSIM 0.948 against 0.857; but
  see configs/vae.py for what it did to a latent DiT."""
  err = recon - x
  return jnp.where(x >= 1.0, jnp.minimum(err, 0.0), jnp.where(x <= -1.0, jnp.maximum(err, 0.0), err))


def vae_loss(model: vae_lib.VAE, x: jax.Array, rng: jax.Array, w: LossWeights, adversarial: jax.Array):
  """(objective, (loss, terms)) for clips x [B, T, H, W, 3] in [-1, 1]. `adversarial` is the
  weight of the generator's adversarial term at this step (0 before vae.adversarial_start).
  The objective adds the discriminator's loss to the VAE's; gradients keep them apart."""
  recon, mean, logvar = model(x, rng)
  err = pixel_error(recon, x) if w.clipped_range else recon - x
  l1, mse = layers.mean(jnp.abs(err)), layers.mean(jnp.square(err))
  kl = vae_lib.kl_divergence(mean, logvar)
  loss = w.l1 * l1 + w.mse * mse + w.kl * kl
  terms = {"recon/l1": l1, "recon/mse": mse, "recon/psnr": psnr_of_mse(mse), "kl": kl,
           "latent/std": jnp.std(mean)}
  if w.ssim > 0:
    similarity = jnp.mean(video_quality.ssim((recon + 1) / 2, (x + 1) / 2))
    loss = loss + w.ssim * (1.0 - similarity)
    terms["recon/ssim"] = similarity
  objective = loss
  if model.discriminator is not None:
    graphdef, state = nnx.split(model.discriminator)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))   # the VAE's term does not train D
    generator = -jnp.mean(frozen(recon))
    loss = loss + adversarial * generator
    real, fake = model.discriminator(x), model.discriminator(jax.lax.stop_gradient(recon))
    discriminator = jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
    objective = loss + discriminator
    terms.update({"adv/generator": generator, "adv/discriminator": discriminator})
  return objective, (loss, terms)


def make_train_step(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule):
  """Returns train_step(state, batch, ae_params) -> (state, metrics); batch {"video" uint8
  [B, T, H, W, 3], "skipped"} as from `pipeline.Loader`. The posterior noise comes from
  fold_in(seed, step), so a resumed run draws what the uninterrupted one would have."""
  seed, decay, weights = cfg.seed, cfg.optim.ema_decay, LossWeights.from_config(cfg)

  def train_step(state: TrainState, batch: dict, ae_params) -> tuple[TrainState, dict]:
    del ae_params   # a VAE trains on pixels (autoencoder.name = identity)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    x = autoencoder.normalize(batch["video"])
    adversarial = jnp.where(state.step >= weights.adversarial_start, weights.adversarial, 0.0)

    frozen = state_lib.frozen_mask(cfg, state.params)   # python bools: optim.frozen

    def loss_fn(params):
      return vae_loss(nnx.merge(graphdef, state_lib.stop_frozen(frozen, params)), x, rng, weights, adversarial)

    (_, (loss, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = step_lib.ema_decay(decay, state.step)
    ema = state_lib.update_ema(state.ema, params, d, frozen)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "data/skipped": jnp.sum(batch["skipped"])}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step
