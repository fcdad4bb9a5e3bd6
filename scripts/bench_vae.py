"""Quality and speed of the VAE: train it on the synthetic clips within a time budget, then
report held-out PSNR/SSIM and encode/decode throughput in frames per second.

  python scripts/bench_vae.py --workdir runs/vae_bench --minutes 30 [--config configs/vae.py:S] [--config.KEY=VALUE ...]
  python scripts/bench_vae.py --workdir runs/vae_bench --minutes 29 --config configs/vae.py:S_images \
      --config configs/vae.py:S_from_images --config configs/vae.py:S_decoder

Step 1 runs the real CLI (`jaxvid train`; rerunning resumes), stage by stage: each `--config`
trains until its train.steps (`--steps` sets the last one's), and all of them within
`--minutes` (at the deadline the script sends SIGTERM; the trainer saves a checkpoint and the
latent statistics, and exits 0). The last stage trains in WORKDIR, each earlier one in
WORKDIR_NAME (NAME: what follows the ':' of its --config), and each stage after the first
starts `--init_from` the one before (a VAE trained on images is inflated to clips). A rerun
resumes the latest stage that has begun and leaves the earlier ones alone. `--config.KEY=VALUE`
overrides apply to every stage. Step 2 loads the last stage through the
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
import sys
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
  p.add_argument("--config", action="append", default=None,
                 help="a training stage (default configs/vae.py:S); give it again for more stages, in order")
  p.add_argument("--steps", type=int, default=None,
                 help="train.steps of the last stage (default: its config's; the learning rate decays over them)")
  p.add_argument("--minutes", type=float, default=30.0, help="training time limit of this invocation, all stages")
  p.add_argument("--clips", type=int, default=64, help="held-out clips for PSNR/SSIM")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--large", default="33x128x128", help="a second clip shape for throughput (FxHxW)")
  args, overrides = p.parse_known_args()
  args.overrides = [o for o in overrides if o.startswith("--config.")]
  if len(args.overrides) != len(overrides):
    p.error(f"unrecognized arguments: {[o for o in overrides if not o.startswith('--config.')]}")
  configs = args.config or ["configs/vae.py:S"]
  runs = [f"{args.workdir.rstrip('/')}_{c.partition(':')[2] or i}" for i, c in enumerate(configs[:-1])]
  runs.append(args.workdir)
  if len(set(runs)) != len(runs):
    p.error(f"two stages would train in the same directory: {runs}; give configs with different names after ':'")
  os.makedirs(args.workdir, exist_ok=True)

  begun = lambda run: os.path.exists(os.path.join(run, "config.json"))
  first = max([i for i, run in enumerate(runs) if begun(run)], default=0)   # earlier stages are done
  stages, train_s = [], 0.0
  for i, (config, run) in enumerate(zip(configs, runs)):
    if i < first:
      print(f"bench_vae: {runs[first]} has begun; {run} is not trained further", flush=True)
      continue
    left = args.minutes - train_s / 60
    if left < 1:
      sys.exit(f"bench_vae: {args.minutes:g} minutes ran out before stage {config}; raise --minutes or lower steps")
    steps = [f"--config.train.steps={args.steps}"] if args.steps and i == len(configs) - 1 else []
    init = ["--init_from", runs[i - 1]] if i > 0 and not begun(run) else []
    seconds = budget.train_for("bench_vae", left, ["--config", config, "--workdir", run, *args.overrides, *steps, *init])
    train_s += seconds
    stages.append({"config": config, "workdir": run, "seconds": round(seconds, 1), "steps": _last_step(run)})

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
      "stages": stages,   # those trained by this invocation
      "last_eval_psnr": next((r["eval/psnr"] for r in reversed(rows) if "eval/psnr" in r), None),
      "params": int(params),
      # Quality and throughput are measured here, on one device; training ran on the run's own
      # (its config.json: configs/vae.py:S has distributed.cpu_devices=0, a CPU device per core).
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "config": configs, "overrides": args.overrides,
  }
  with open(os.path.join(args.workdir, "vae_quality.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
