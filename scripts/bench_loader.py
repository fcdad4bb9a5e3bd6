"""Input pipeline throughput: clips per second from mp4 files and from a latent store, per
grain worker count, next to the rate at which the tiny model's train step consumes clips.

  python scripts/bench_loader.py                     # 24 clips of 48 frames, 320x240 H.264, 24 fps
  python scripts/bench_loader.py --workers 0,1,2,4 --batches 12 --clips 48
  python scripts/bench_loader.py --data DIR          # keep the files in DIR (clipNNNN.mp4, bench_loader.jsonl,
                                                     # bench_loader_latents/) and reuse them next time

What is measured:
  files     `pipeline.make_dataset(pipeline.make_source(cfg, 0, 1).batches, cfg)` with
            data.source=files over real H.264 mp4 files: ffmpeg seeks, scales the 320x240
            source to cover 256x256 and crops (data.crop=random), 16 frames a clip, batch 8.
  encode    `latents.encode(cfg, manifest, store)` on the same manifest (decode + identity
            autoencoder + TensorStore write), end to end including the probe and jit.
  latents   the same dataset with data.source=latents reading that store.
  tiny step the real configs/tiny.py train step (8x32x32 clips, batch 8) on one random batch,
            train.steps_per_call steps a call as `jaxvid train` runs it; clips/s consumed =
            batch / median time per step.

For each source and worker count, `--repeats` passes (interleaved over worker counts; the
table shows the median) each take one warm-up batch (plus `--skip` more, which drains what
the workers prefetched while the first one was awaited), then time `--batches` batches:
clips/s = batches * batch / seconds. MB/s counts the uint8 pixels a batch stands
for (T*H*W*3 bytes a clip); latents also give the bytes actually delivered (float16).
"CPU s/clip" is the CPU time this process, its grain workers and their ffmpeg processes spent
per clip delivered, and "own cores" that CPU time over the wall time (from /proc, Linux);
"busy cores" is how many of the machine's CPUs were busy during the timed batches, by anyone
(other jobs too). Own cores near os.cpu_count() means the loader is CPU-bound: more workers
cannot help, and CPU s/clip (less sensitive to other jobs than clips/s) is what to lower.

Prints a Markdown table and one JSON object last.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings

import numpy as np

# imageio-ffmpeg and grain fork; JAX warns about any fork (ffmpeg is fork+exec, which is safe).
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)

import imageio_ffmpeg  # noqa: E402
import jax  # noqa: E402

from jaxvid import config as config_lib  # noqa: E402
from jaxvid.data import latents as latents_lib  # noqa: E402
from jaxvid.data import pipeline  # noqa: E402
from jaxvid.data import synthetic  # noqa: E402
from jaxvid.parallel import mesh as mesh_lib  # noqa: E402
from jaxvid.parallel import sharding  # noqa: E402
from jaxvid.perf import bench  # noqa: E402

TINY = "configs/tiny.py"


def make_videos(folder: str, clips: int, frames: int, height: int, width: int, fps: int) -> tuple[str, int]:
  """Writes `clips` H.264 mp4 files of moving shapes and a manifest; returns (manifest path, bytes
  of the mp4 files). Files already there (same name) are kept, so --data DIR is written once."""
  os.makedirs(folder, exist_ok=True)
  rows, nbytes = [], 0
  for i in range(clips):
    scene = synthetic.make_scene(0, i)
    path = os.path.join(folder, f"clip{i:04d}.mp4")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
      video = synthetic.render(scene, frames, height, width)
      writer = imageio_ffmpeg.write_frames(path + ".tmp.mp4", (width, height), fps=fps, codec="libx264",
                                           pix_fmt_out="yuv420p", macro_block_size=1,
                                           output_params=["-preset", "medium", "-crf", "23"])
      writer.send(None)
      for frame in video:
        writer.send(np.ascontiguousarray(frame))
      writer.close()
      os.replace(path + ".tmp.mp4", path)
    nbytes += os.path.getsize(path)
    rows.append({"path": os.path.basename(path), "caption": scene.caption})
  manifest = os.path.join(folder, "bench_loader.jsonl")
  with open(manifest, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return manifest, nbytes


def loader_config(args, source: str, workers: int, manifest: str = "", store: str = ""):
  t, h, w = args.clip
  cfg = config_lib.load(TINY, [
      f"--config.data.source={source}", f"--config.data.manifest={manifest}", f"--config.data.store={store}",
      f"--config.video.frames={t}", f"--config.video.height={h}", f"--config.video.width={w}",
      f"--config.model.patch={tuple(args.patch)}", f"--config.train.batch_size={args.batch}",
      f"--config.data.buckets={((t, h, w),)}", "--config.data.crop=random",
      f"--config.data.workers={workers}", f"--config.data.prefetch={args.prefetch}",
      f"--config.encode.batch_size={args.batch}"])
  config_lib.validate(cfg, jax.device_count(), train=True)
  return cfg


def cpu_times() -> tuple[float, float] | None:
  """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux), else None."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)   # idle + iowait
  return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores(before, after) -> float | None:
  """How many cores were busy (whoever used them) between two cpu_times() readings."""
  if before is None or after is None or after[1] <= before[1]:
    return None
  return round((after[0] - before[0]) / (after[1] - before[1]) * os.cpu_count(), 2)


def tree_cpu_s() -> float | None:
  """CPU seconds used so far by this process and all its descendants (grain workers, ffmpeg),
  live ones and reaped ones (Linux /proc), else None."""
  try:
    stats = {}
    for pid in os.listdir("/proc"):
      if pid.isdigit():
        try:
          with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
          continue              # ended meanwhile
        stats[int(pid)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))   # ppid, utime+stime+cutime+cstime
  except OSError:
    return None
  children = {}
  for pid, (ppid, _) in stats.items():
    children.setdefault(ppid, []).append(pid)
  total, todo = 0, [os.getpid()]
  while todo:
    pid = todo.pop()
    total += stats.get(pid, (0, 0))[1]
    todo += children.get(pid, [])
  return total / os.sysconf("SC_CLK_TCK")


def measure_source(cfg, batches: int, skip: int) -> dict:
  """One pass: clips/s over `batches` timed batches, after a first batch and `skip` more."""
  source = pipeline.make_source(cfg, 0, 1)
  t0 = time.perf_counter()
  it = iter(pipeline.make_dataset(source.batches, cfg))
  first = next(it)
  first_s = time.perf_counter() - t0
  for _ in range(skip):
    next(it)
  arrivals, nbytes, clips = [], 0, 0
  cpu_before, own_before = cpu_times(), tree_cpu_s()
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    arrivals.append(time.perf_counter() - start)
    x = batch.get("video", batch.get("latents"))
    nbytes += x.nbytes
    clips += x.shape[0]
  seconds = arrivals[-1]
  cpu, own_after = busy_cores(cpu_before, cpu_times()), tree_cpu_s()
  own = None if own_before is None or own_after is None else own_after - own_before
  if hasattr(it, "close"):
    it.close()              # stops the worker processes
  del it
  x = first.get("video", first.get("latents"))
  return {"clips_per_s": clips / seconds, "delivered_bytes_per_clip": nbytes / clips,
          "pixel_bytes_per_clip": int(np.prod(x.shape[1:4])) * 3,   # the uint8 RGB pixels a clip stands for
          "first_batch_s": first_s, "busy_cores": cpu, "own_cores": None if own is None else own / seconds,
          "cpu_s_per_clip": None if own is None else own / clips, "batch_shape": list(x.shape), "dtype": str(x.dtype),
          "batch_s": [round(b - a, 3) for a, b in zip([0.0] + arrivals[:-1], arrivals)]}


def _median(values: list, digits: int) -> float | None:
  """Median of the values that are known (None where none is, e.g. without /proc)."""
  known = [v for v in values if v is not None]
  return round(float(np.median(known)), digits) if known else None


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def summarize(source: str, workers: int, skip: int, passes: list[dict]) -> dict:
  """A table row from the passes of one setting: medians over the passes."""
  rates = [r["clips_per_s"] for r in passes]
  median = float(np.median(rates))
  p = passes[0]
  return {"source": source, "workers": workers, "skip": skip, "batch_shape": p["batch_shape"], "dtype": p["dtype"],
          "clips_per_s": round(median, 2), "clips_per_s_passes": [round(r, 2) for r in rates],
          "pixel_mb_per_s": round(median * p["pixel_bytes_per_clip"] / 1e6, 1),
          "delivered_mb_per_s": round(median * p["delivered_bytes_per_clip"] / 1e6, 1),
          "first_batch_s": _median([r["first_batch_s"] for r in passes], 2),
          "cpu_s_per_clip": _median([r["cpu_s_per_clip"] for r in passes], 5),
          "own_cores": _median([r["own_cores"] for r in passes], 2),
          "busy_cores": _median([r["busy_cores"] for r in passes], 2),
          "batch_s_passes": [r["batch_s"] for r in passes]}


def measure_tiny_step(steps: int, overrides: tuple = ()) -> dict:
  """The real configs/tiny.py train step (with `overrides`, "--config.KEY=VALUE"), as `jaxvid
  train` runs it (train.steps_per_call steps a call): median time per step over enough calls
  to cover `steps`, clips/s consumed."""
  cfg = config_lib.load(TINY, list(overrides))
  config_lib.validate(cfg, jax.device_count(), train=True)
  mesh = mesh_lib.make_mesh(cfg)
  train = bench.TrainCall(cfg, mesh, sharding.rules_from_config(cfg))
  train()                                          # warm-up, outside the CPU accounting
  cpu_before, own_before = cpu_times(), tree_cpu_s()
  t_start = time.perf_counter()
  times = bench.per_step_times(train, train.per_call, steps, warmup=0)
  wall = time.perf_counter() - t_start
  cpu, own_after = busy_cores(cpu_before, cpu_times()), tree_cpu_s()
  own = None if own_before is None or own_after is None else own_after - own_before
  step_s, steps_run = float(np.median(times)), len(times) * train.per_call
  v = cfg.video
  return {"clip": [v.frames, v.height, v.width], "batch": cfg.train.batch_size, "steps": steps_run,
          "steps_per_call": train.per_call, "compile_s": round(train.compile_s, 1), "median_step_s": round(step_s, 4),
          "min_step_s": round(min(times), 4), "clips_per_s": round(cfg.train.batch_size / step_s, 1),
          "pixel_mb_per_s": round(cfg.train.batch_size * v.frames * v.height * v.width * 3 / step_s / 1e6, 2),
          "busy_cores": cpu, "own_cores": None if own is None else round(own / wall, 2),
          "cpu_s_per_clip": None if own is None else round(own / steps_run / cfg.train.batch_size, 5)}


def main() -> None:
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--data", default="",
                 help="folder for the mp4 files, manifest and latent store (default: a temp folder)")
  p.add_argument("--clips", type=int, default=24)
  p.add_argument("--source_frames", type=int, default=48, help="frames per mp4 file")
  p.add_argument("--source_size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
  p.add_argument("--source_fps", type=int, default=24)
  p.add_argument("--clip", type=int, nargs=3, default=(16, 256, 256), metavar=("T", "H", "W"),
                 help="the bucket the loader produces")
  p.add_argument("--patch", type=int, nargs=3, default=(2, 16, 16), help="model.patch (only for validation)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prefetch", type=int, default=2, help="data.prefetch")
  p.add_argument("--workers", default="0,1,2", help="data.workers values, comma separated")
  p.add_argument("--batches", type=int, default=6, help="timed batches per pass")
  p.add_argument("--repeats", type=int, default=3,
                 help="passes per setting, interleaved over worker counts; the table shows the median")
  p.add_argument("--skip", type=int, default=-1,
                 help="batches taken untimed after the first (default: workers * (prefetch + 2), what "
                      "the workers can have buffered)")
  p.add_argument("--sources", default="files,latents", help="loader rows to measure (the store is always encoded)")
  p.add_argument("--tiny_steps", type=int, default=20, help="timed train steps (0: skip the tiny step)")
  args = p.parse_args()

  # grain's worker processes read absl flags, which only an absl app would have parsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  import absl.logging
  absl.logging.set_verbosity(absl.logging.WARNING)

  workers = [int(w) for w in args.workers.split(",")]
  load_before = os.getloadavg()
  tmp = None if args.data else tempfile.mkdtemp(prefix="bench_loader_")
  folder = args.data or tmp
  rows = []

  def measure_rows(source: str, **kw) -> None:
    """Interleaved passes (0, 1, 2, 0, 1, 2, ...) so a load change hits every worker count alike."""
    passes = {w: [] for w in workers}
    skips = {w: args.skip if args.skip >= 0 else w * (args.prefetch + 2) for w in workers}
    for r in range(args.repeats):
      for w in workers:
        result = measure_source(loader_config(args, source, w, **kw), args.batches, skips[w])
        passes[w].append(result)
        print(f"  {source:8s} workers={w} pass {r + 1}: {result['clips_per_s']:7.2f} clips/s  "
              f"{_fmt(result['cpu_s_per_clip'], '.3g')} CPU s/clip  own cores {_fmt(result['own_cores'], '.2f')}  "
              f"busy cores {result['busy_cores']}  first batch {result['first_batch_s']:.2f} s  "
              f"batches {result['batch_s']}", flush=True)
    rows.extend(summarize(source, w, skips[w], passes[w]) for w in workers)

  try:
    t0 = time.perf_counter()
    manifest, mp4_bytes = make_videos(folder, args.clips, args.source_frames, *args.source_size, args.source_fps)
    write_s = time.perf_counter() - t0
    print(f"{args.clips} mp4 files ({mp4_bytes / 1e6:.2f} MB) in {folder} ({write_s:.1f} s)", flush=True)

    sources = args.sources.split(",")
    if "files" in sources:
      measure_rows("files", manifest=manifest)

    store = os.path.join(folder, "bench_loader_latents")
    if os.path.exists(store):
      shutil.rmtree(store)       # encode from scratch each run, so its time is comparable
    cfg = loader_config(args, "files", 0, manifest=manifest)
    cpu_before = cpu_times()
    t0 = time.perf_counter()
    counts = latents_lib.encode(cfg, manifest, store)
    encode_s = time.perf_counter() - t0
    store_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
    encode = {"clips": counts["written"], "seconds": round(encode_s, 2),
              "clips_per_s": round(counts["written"] / encode_s, 2), "store_mb": round(store_bytes / 1e6, 1),
              "dtype": cfg.encode.dtype, "busy_cores": busy_cores(cpu_before, cpu_times())}
    print(f"  encode: {encode['clips']} clips in {encode['seconds']} s = {encode['clips_per_s']} clips/s "
          f"(store {encode['store_mb']} MB)", flush=True)

    if "latents" in sources:
      measure_rows("latents", store=store)

    tiny = measure_tiny_step(args.tiny_steps) if args.tiny_steps > 0 else None
    if tiny:
      print(f"  tiny train step: {tiny['median_step_s'] * 1e3:.1f} ms median -> {tiny['clips_per_s']} clips/s",
            flush=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  load_after = os.getloadavg()

  t, h, w = args.clip
  print(f"\nclips of {t}x{h}x{w} (uint8 {t * h * w * 3 / 1e6:.2f} MB each) from {args.clips} H.264 files of "
        f"{args.source_frames} frames at {args.source_size[1]}x{args.source_size[0]}, {args.source_fps} fps; "
        f"batch {args.batch}, data.prefetch={args.prefetch}; median of {args.repeats} passes of "
        f"{args.batches} timed batches\n")
  print("| source | workers | clips/s | MB/s (uint8 pixels) | MB/s delivered | CPU s/clip | own cores | "
        "busy cores | first batch s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['source']} | {r['workers']} | {r['clips_per_s']:.2f} | {r['pixel_mb_per_s']:.1f} | "
          f"{r['delivered_mb_per_s']:.1f} ({r['dtype']}) | {_fmt(r['cpu_s_per_clip'], '.3g')} | "
          f"{_fmt(r['own_cores'], '.2f')} | {r['busy_cores']} | {r['first_batch_s']} |")
  print(f"| encode (files -> latents) | 0 | {encode['clips_per_s']:.2f} | "
        f"{encode['clips_per_s'] * t * h * w * 3 / 1e6:.1f} | - | - | - | {encode['busy_cores']} | - |")
  if tiny:
    c = tiny["clip"]
    print(f"| tiny train step consumes ({c[0]}x{c[1]}x{c[2]}, batch {tiny['batch']}) | - | {tiny['clips_per_s']:.1f} | "
          f"{tiny['pixel_mb_per_s']:.2f} | - | {_fmt(tiny['cpu_s_per_clip'], '.3g')} | "
          f"{_fmt(tiny['own_cores'], '.2f')} | {tiny['busy_cores']} | - |")
  print(f"\nCPU s/clip: CPU time of this process, its grain workers and ffmpeg per clip delivered (train step: "
        f"per clip consumed); own cores: that CPU time / wall time; busy cores: of all {os.cpu_count()} CPUs, by "
        f"anyone (other jobs too), during the timed batches. Load average (1, 5, 15 min): before "
        f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
  print(json.dumps({
      "clip": list(args.clip), "batch": args.batch, "prefetch": args.prefetch, "timed_batches": args.batches,
      "repeats": args.repeats,
      "source": {"files": args.clips, "frames": args.source_frames, "height": args.source_size[0],
                 "width": args.source_size[1], "fps": args.source_fps, "codec": "h264",
                 "mb": round(mp4_bytes / 1e6, 2)},
      "rows": rows, "encode": encode, "tiny_step": tiny,
      "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                  "processor": platform.processor() or platform.machine(), "jax_device": jax.devices()[0].device_kind,
                  "loadavg_before": [round(x, 2) for x in load_before],
                  "loadavg_after": [round(x, 2) for x in load_after]},
  }))


if __name__ == "__main__":
  main()
