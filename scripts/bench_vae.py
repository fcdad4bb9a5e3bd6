"""Quality and speed of the VAE: train it on the synthetic clips within a time budget, then
report held-out PSNR/SSIM and encode/decode throughput in frames per second.

  python scripts/bench_vae.py --workdir runs/vae_bench --minutes 30 [--config configs/vae.py:S] [--config.KEY=VALUE ...]
  python scripts/bench_vae.py --workdir runs/vae_bench2 --minutes 29 \
      --images configs/vae.py:S_images --config configs/vae.py:S_from_images

Step 1 runs the real CLI (`jaxvid train`; rerunning resumes): training stops at `--steps`
(default the config's train.steps) or after `--minutes`, whichever comes first (at the
deadline the script sends SIGTERM; the trainer saves a checkpoint and the latent statistics,
and exits 0). With `--images` training has two stages within the same `--minutes`: that
config trains on images into WORKDIR_images (`--image_steps`, at most `--image_minutes`),
then `--config` trains on clips into WORKDIR (`--steps`, the rest of the time) with
`--init_from` the image run (inflated to clips); once WORKDIR has begun, a rerun resumes it and
leaves the image run alone. `--config.KEY=VALUE` overrides apply to both stages (the stage
configs set their own train.steps and optim.lr: give those with --image_steps / --steps, or
leave them). Step 2 loads the run through the
autoencoder interface (`autoencoder.name=vae`, EMA parameters) and measures, on `--clips`
held-out clips (combinations of color, shape, direction and background that training never
shows): PSNR (uint8, peak 255) and SSIM of the reconstructions, whole clips and in temporal
chunks of one latent frame with spatial tiles (the bounded-memory path), and the encode and
decode throughput (median of `--reps` after a warm-up) at the training shape and at
`--large`. Prints one JSON object last and writes it to WORKDIR/vae_quality.json.
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from jaxvid import config as config_lib
from jaxvid.data import synthetic
from jaxvid.models import autoencoder
from jaxvid.parallel import distributed
from jaxvid.train import video_quality

import budget   # scripts/budget.py

distributed.set_xla_cpu_flags()   # XLA:CPU as jaxvid's commands set it up (before JAX makes a device)


def _autoencoder(run: str, chunk: int = 0, tile: int = 0, overlap: int = 2):
  """The trained VAE of `run` through the interface the diffusion model uses."""
  with open(os.path.join(run, "config.json")) as f:
    v = config_lib.from_json(f.read()).vae
  cfg = config_lib.base_config()
  cfg.autoencoder.update(name="vae", checkpoint=run, latent_channels=v.latent_channels, chunk=chunk, tile=tile,
                         tile_overlap=overlap, temporal_compression=v.temporal_compression,
                         spatial_compression=v.spatial_compression)
  return autoencoder.make(cfg)


def quality(run: str, clips: np.ndarray, batch: int, **plan) -> dict:
  """Mean PSNR and SSIM of the reconstructions of `clips` (uint8 [N, T, H, W, 3])."""
  ae = _autoencoder(run, **plan)
  params = ae.load()
  recon = jax.jit(lambda p, v: autoencoder.denormalize(ae.decode(p, ae.encode(p, v))))
  psnr, ssim = [], []
  for start in range(0, len(clips), batch):
    video = clips[start:start + batch]
    out = recon(params, video)
    psnr.append(np.asarray(video_quality.psnr(out, video, 255.0)))
    ssim.append(np.asarray(video_quality.ssim(out / 255.0, video / 255.0)))
  return {"psnr": float(np.mean(np.concatenate(psnr))), "ssim": float(np.mean(np.concatenate(ssim)))}


def throughput(run: str, shape: tuple[int, int, int], batch: int, reps: int, chunk: int) -> dict:
  """Frames per second of encode (uint8 -> latents) and decode (latents -> video)."""
  ae = _autoencoder(run, chunk=chunk)
  params = ae.load()
  frames, height, width = shape
  video = np.random.default_rng(0).integers(0, 256, (batch, frames, height, width, 3), np.uint8)
  encode, decode = jax.jit(ae.encode), jax.jit(ae.decode)
  latents = jax.block_until_ready(encode(params, video))
  jax.block_until_ready(decode(params, latents))

  def median_s(fn):
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  enc_s, dec_s = median_s(lambda: encode(params, video)), median_s(lambda: decode(params, latents))
  return {"shape": f"{frames}x{height}x{width}", "batch": batch, "chunk_latent_frames": chunk,
          "encode_fps": batch * frames / enc_s, "decode_fps": batch * frames / dec_s}


def _last_step(run: str) -> int:
  """The last step a run logged."""
  with open(os.path.join(run, "metrics.jsonl")) as f:
    return json.loads(f.read().splitlines()[-1])["step"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/vae_bench")
  p.add_argument("--config", default="configs/vae.py:S")
  p.add_argument("--steps", type=int, default=None,
                 help="train.steps (default: the config's; the learning rate decays over them; the run stops "
                      "earlier at --minutes)")
  p.add_argument("--minutes", type=float, default=30.0, help="training time limit of this invocation")
  p.add_argument("--images", default=None,
                 help="a first stage on images, e.g. configs/vae.py:S_images (then --config starts from it)")
  p.add_argument("--image_minutes", type=float, default=None,
                 help="time limit of the image stage (default half of --minutes; the clip stage gets the rest)")
  p.add_argument("--image_steps", type=int, default=None, help="train.steps of the image stage (default: its config's)")
  p.add_argument("--clips", type=int, default=64, help="held-out clips for PSNR/SSIM")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--large", default="33x128x128", help="a second clip shape for throughput (FxHxW)")
  args, overrides = p.parse_known_args()
  args.overrides = [o for o in overrides if o.startswith("--config.")]
  if len(args.overrides) != len(overrides):
    p.error(f"unrecognized arguments: {[o for o in overrides if not o.startswith('--config.')]}")
  image_minutes = args.minutes / 2 if args.image_minutes is None else args.image_minutes
  if args.images and not 0 < image_minutes <= args.minutes - 1:
    p.error(f"--image_minutes {image_minutes:g} must leave the clip stage at least 1 of --minutes {args.minutes:g}")
  os.makedirs(args.workdir, exist_ok=True)

  first, image_s, image_run = [], 0.0, args.workdir.rstrip("/") + "_images"
  if args.images:
    if os.path.exists(os.path.join(args.workdir, "config.json")):   # the clip stage has begun: it resumes
      print(f"bench_vae: {args.workdir} has begun on clips; {image_run} is not trained further", flush=True)
    else:
      steps = [f"--config.train.steps={args.image_steps}"] if args.image_steps else []
      image_s = budget.train_for("bench_vae", image_minutes,
                                 ["--config", args.images, "--workdir", image_run, *args.overrides, *steps])
    first = ["--init_from", image_run]
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  train_s = image_s + budget.train_for("bench_vae", args.minutes - image_s / 60,
                                       ["--config", args.config, "--workdir", args.workdir, *args.overrides,
                                        *steps, *first])

  with open(os.path.join(args.workdir, "config.json")) as f:
    cfg = config_lib.from_json(f.read())
  v = cfg.video
  scenes = synthetic.heldout_scenes(args.clips, seed=1234)
  clips = np.stack([synthetic.render(s, v.frames, v.height, v.width) for s in scenes])
  batch = cfg.train.batch_size
  whole = quality(args.workdir, clips, batch)
  tile = max(2, v.height // cfg.vae.spatial_compression // 2 + 1)   # at least two tiles a side
  bounded = quality(args.workdir, clips, batch, chunk=1, tile=tile, overlap=1)
  large = tuple(int(x) for x in args.large.split("x"))
  speed = [throughput(args.workdir, (v.frames, v.height, v.width), batch, args.reps, chunk=0),
           throughput(args.workdir, large, 1, args.reps, chunk=1)]

  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(args.workdir, autoencoder.LATENT_STATS)) as f:
    stats = json.load(f)
  params = sum(x.size for x in jax.tree.leaves(_autoencoder(args.workdir).load()))
  report = {
      "heldout_clips": len(clips), "clip": f"{v.frames}x{v.height}x{v.width}",
      "psnr": whole["psnr"], "ssim": whole["ssim"],
      "psnr_chunked_tiled": bounded["psnr"], "ssim_chunked_tiled": bounded["ssim"],
      "tiles": f"{tile}x{tile} latent cells, overlap 1, chunks of 1 latent frame",
      "throughput": speed, "encode_fps": speed[0]["encode_fps"], "decode_fps": speed[0]["decode_fps"],
      "train_steps": stats["step"], "train_seconds": round(train_s, 1), "last_logged_loss": rows[-1]["loss"],
      "image_stage": {"config": args.images, "seconds": round(image_s, 1), "steps": _last_step(image_run)}
                     if args.images else None,
      "last_eval_psnr": next((r["eval/psnr"] for r in reversed(rows) if "eval/psnr" in r), None),
      "params": int(params),
      # Quality and throughput are measured here, on one device; training ran on the run's own
      # (its config.json: configs/vae.py:S has distributed.cpu_devices=0, a CPU device per core).
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "config": args.config, "overrides": args.overrides,
  }
  with open(os.path.join(args.workdir, "vae_quality.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
