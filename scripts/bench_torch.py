"""The same DiT in PyTorch (diffusers' `WanTransformer3DModel`) and in jaxvid, timed in one run.

  pip install -e '.[bench]'                      # torch (CPU build) and diffusers, once
  python scripts/bench_torch.py                  # configs/bench_cpu.py, 5 timed steps each side
  python scripts/bench_torch.py --steps 10 --config.model.attention=blocked --config.model.remat=full
  python scripts/bench_torch.py --torch_only     # or --jax_only
  python scripts/bench_torch.py --config configs/bench_gpu.py   # on a GPU: Wan-1.3B's shape, bf16

The PyTorch model is built from the jaxvid config (default configs/bench_cpu.py: width 384 = 6
heads of 64, MLP 1536, 8 layers, patch 1x2x2 over 4 latent channels, 32 text tokens of width 64,
batch 2 of 8x32x32 latents = 2,048 tokens a clip), with float32 random weights (nothing is
downloaded), on the first CUDA GPU if torch sees one, else on `os.cpu_count()` threads. It is
timed on random inputs: the train step is forward + MSE loss against a random target + backward
+ AdamW step, the forward runs under `torch.no_grad()`; both are the median of `--steps` after 2
warm-up steps. The jaxvid side is `jaxvid.perf.bench.run` (what `jaxvid bench` prints) on the
same config, in the same process, on the devices `jaxvid bench` uses (on a CPU one per core:
distributed.cpu_devices; the batch is split over them as over any mesh), timed per step as
jaxvid runs its steps: the config's train.steps_per_call train steps in one program (4 in
configs/bench_cpu.py; each step the full forward, backward and AdamW update), the forward as 4
sampling steps of jaxvid's sampler loop; `--config.KEY=VALUE` overrides go to that config, and
shape keys (model.*, text.width, text.max_len, video.*, train.batch_size) shape the PyTorch
model too. The PyTorch side is eager (no torch.compile), without gradient checkpointing,
whatever model.remat and model.attention say; it computes in float32, or under
torch.autocast(bfloat16) on a GPU when model.dtype=bfloat16 (its attention is then torch's
scaled_dot_product_attention, which picks a flash kernel). PyTorch runs first and JAX after it
in the same process, so the script sets XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX would otherwise
reserve 75% of the GPU when it starts). Each side also times its own library's square matmul in
the compute dtype (PyTorch's torch.matmul; jaxvid's `jaxvid.perf.bench.peak_matmul_flops`), the
ceiling its steps run under: CPUs differ in which library is faster (one 2-core Xeon with
AVX-512 and AMX: PyTorch's float32 GEMM 1.16x XLA's, on one core 182 against 157 GFLOP/s), and
the "peak matmul" row and the JSON's machine.cpu_flags show that beside the step times.

What differs between the two (all small next to the 8 blocks):
- jaxvid's model includes its trainable text encoder (configs/bench_cpu.py: 1 layer of width
  64 over hashed words, 0.31 M parameters, 6.8 MFLOP of the 240 GFLOP forward, from
  `jaxvid.perf.flops.count(cfg, batch).text`); the Wan model takes precomputed text embeddings
  [B, L, text.width]. The "params (DiT)" row leaves the text encoder out: the two models then
  have the same parameter count (20,270,992 at the default config).
- jaxvid's train step also drops captions, samples flow times and noise, clips the gradient
  norm and updates an EMA of the weights; it adds fixed 3D sin-cos positions (model.pos_embed)
  and masks text padding in cross-attention. The PyTorch step is plain AdamW (torch defaults).
- Times are median wall seconds; the machine's load average is recorded before and after each
  side, and the PyTorch per-step times are in the JSON. Compare runs on a quiet machine: other
  work on the cores slows PyTorch's OpenMP threads far more than XLA's thread pool (measured on
  2 cores at the default config: PyTorch train step 5.8 s at load 3, 26 s at load 5; jaxvid
  14.9 s and 13.6 s).

Prints a table (ratio = PyTorch time / jaxvid time: > 1 means jaxvid is faster), then one
JSON object as the last line.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # before jax: the GPU is shared with torch
import jax  # noqa: E402
import ml_collections

from jaxvid import config as config_lib
from jaxvid.errors import UserError
from jaxvid.parallel import distributed
from jaxvid.perf import bench
from jaxvid.perf import flops as flops_lib

DEFAULT_CONFIG = "configs/bench_cpu.py"
INSTALL_HINT = "pip install -e '.[bench]'  (torch==2.13.0 CPU build and diffusers)"


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _fail(message: str) -> None:
  """Bad input (a missing extra, a bad config key): one line on stderr, exit status 2."""
  print(f"bench_torch: {message}", file=sys.stderr)
  sys.exit(2)


def _import_torch():
  """(torch, diffusers), or exit 2 with the install command."""
  try:
    import torch
    import diffusers
  except ImportError as e:
    _fail(f"{e.name} is not installed; run: {INSTALL_HINT}")
  return torch, diffusers


def wan_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """`WanTransformer3DModel(**kwargs)` of the same shape as the jaxvid DiT of `cfg`."""
  m = cfg.model
  if m.width % m.heads:
    raise UserError(f"model.width={m.width} is not a multiple of model.heads={m.heads}")
  return dict(patch_size=tuple(m.patch), num_attention_heads=m.heads, attention_head_dim=m.width // m.heads,
              in_channels=cfg.video.channels, out_channels=cfg.video.channels, text_dim=cfg.text.width,
              freq_dim=m.freq_dim, ffn_dim=m.mlp_dim, num_layers=m.depth, cross_attn_norm=m.cross_attn_norm,
              qk_norm="rms_norm_across_heads" if m.qk_norm else None, eps=m.eps)


def run_torch(cfg: ml_collections.ConfigDict, steps: int, warmup: int = 2) -> dict:
  """Builds the Wan transformer of `cfg`'s shape and times its train step and forward, on the
  first CUDA GPU when torch sees one (else on the CPU's cores). Parameters and AdamW state are
  float32; with model.dtype=bfloat16 on a GPU the steps run under torch.autocast(bfloat16), the
  PyTorch form of jaxvid's float32 parameters with bfloat16 compute."""
  torch, diffusers = _import_torch()
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(cfg.seed)
  kwargs = wan_kwargs(cfg)
  model = diffusers.WanTransformer3DModel(**kwargs).to(device)     # float32: torch's default dtype
  assert all(p.dtype == torch.float32 for p in model.parameters())
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                          weight_decay=cfg.optim.weight_decay)
  bf16 = cuda and cfg.model.dtype == "bfloat16"
  autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

  b, v = cfg.train.batch_size, cfg.video
  x = torch.randn(b, v.channels, v.frames, v.height, v.width, device=device)    # [B, C, T, H, W]
  t = torch.rand(b, device=device) * 1000.0                                     # Wan's timesteps are in [0, 1000)
  context = torch.randn(b, cfg.text.max_len, cfg.text.width, device=device)     # precomputed text embeddings
  target = torch.randn_like(x)

  def train_step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      out = model(x, t, context, return_dict=False)[0]
      loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    opt.step()
    return loss.item()        # waits for the GPU

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  train_times = bench.step_times(train_step, steps, warmup)
  peak_memory = torch.cuda.max_memory_allocated() if cuda else None

  model.eval()

  def forward():
    with torch.no_grad(), autocast():
      model(x, t, context, return_dict=False)[0].float().sum().item()

  forward_times = bench.step_times(forward, steps, warmup)
  train_s = statistics.median(train_times)
  peak = peak_matmul_flops(torch, device, torch.bfloat16 if bf16 else torch.float32)
  return {"train_step_s": train_s, "forward_s": statistics.median(forward_times),
          "train_step_times": train_times, "forward_times": forward_times,   # the spread shows the noise
          "tokens_per_s": b * config_lib.num_tokens(cfg) / train_s,
          "params": sum(p.numel() for p in model.parameters()),
          "device": torch.cuda.get_device_name(0) if cuda else "cpu",
          "compute_dtype": "bfloat16 (autocast)" if bf16 else "float32", "peak_flops": peak,
          "peak_memory_bytes": peak_memory,
          "threads": torch.get_num_threads(), "wan_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in kwargs.items()},
          "optimizer": f"torch.optim.AdamW (defaults: {'foreach' if cuda else 'foreach/fused off'} on {device.type})",
          "torch": torch.__version__, "diffusers": diffusers.__version__}


def peak_matmul_flops(torch, device, dtype, steps: int = 5) -> float:
  """FLOP/s of PyTorch's own GEMM (MKL/oneDNN on a CPU, cuBLAS on a GPU): square matmuls in
  `dtype` on `device`, 2048^3 one at a time on all the CPU's threads, or 8192^3 ten in a row
  on the GPU before one synchronize (so launches do not count); median of `steps` after 2
  warm-up ones. jaxvid's figure (`jaxvid.perf.bench.peak_matmul_flops`) is one matmul on
  each of its devices at once, summed: on a CPU 2048^3 for up to 3 devices (smaller for more),
  on GPUs 8192^3 each, ten in one program. float32 on a GPU: PyTorch's matmul is full float32
  by default where XLA's may use TF32."""
  cuda = device.type == "cuda"
  size, reps = (8192, 10) if cuda else (2048, 1)
  a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))

  def matmuls():
    for _ in range(reps):
      torch.matmul(a, b)
    if cuda:
      torch.cuda.synchronize()

  return 2.0 * size ** 3 * reps / statistics.median(bench.step_times(matmuls, steps, warmup=2))


def run_jax(cfg: ml_collections.ConfigDict, steps: int) -> dict:
  """`jaxvid bench` on `cfg`, plus the parameter count without the text encoder."""
  from jaxvid.train import state as state_lib
  result = bench.run(cfg, steps=steps)
  _, params = state_lib.abstract_model(cfg)
  text_params = sum(x.size for x in jax.tree.leaves(params["text_encoder"]))
  result["params_text_encoder"] = int(text_params)
  result["params_dit"] = result["params"] - int(text_params)
  return result


def _ratio(a, b) -> str:
  return f"{a / b:.2f}" if a and b else "-"


def table(torch_r: dict | None, jax_r: dict | None) -> str:
  tr, jr = torch_r or {}, jax_r or {}
  sec = lambda r, k: f"{r[k]:.3f}" if k in r else "-"
  rate = lambda r, k: f"{r[k]:,.0f}" if k in r else "-"
  count = lambda r, k: f"{r[k]:,}" if k in r else "-"
  gflops = lambda r: f"{r['peak_flops'] / 1e9:,.0f}" if r.get("peak_flops") else "-"
  gib = lambda r: f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
  rows = [("train step s", sec(tr, "train_step_s"), sec(jr, "train_step_s"),
           _ratio(tr.get("train_step_s"), jr.get("train_step_s"))),
          ("forward s", sec(tr, "forward_s"), sec(jr, "forward_s"), _ratio(tr.get("forward_s"), jr.get("forward_s"))),
          # For a rate the same orientation is jaxvid / PyTorch: > 1 still means jaxvid is faster.
          ("tokens/s (train)", rate(tr, "tokens_per_s"), rate(jr, "tokens_per_s"),
           _ratio(jr.get("tokens_per_s"), tr.get("tokens_per_s"))),
          # The libraries' matmul speed on this machine, which bounds both steps.
          ("peak matmul GFLOP/s", gflops(tr), gflops(jr),
           _ratio(jr.get("peak_flops"), tr.get("peak_flops")) if _same_dtype(tr, jr) else "-"),
          ("peak memory GiB (device 0)", gib(tr), gib(jr), "-"),
          ("params", count(tr, "params"), count(jr, "params"), "-"),
          ("params (DiT, no text encoder)", count(tr, "params"), count(jr, "params_dit"), "-")]
  head = ("", "PyTorch", "jaxvid", "ratio")
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
  fmt = lambda r: f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:]))
  return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows])


def _same_dtype(torch_r: dict, jax_r: dict) -> bool:
  """Whether the two sides compute in the same dtype (on a CPU PyTorch stays in float32)."""
  return torch_r.get("compute_dtype", "").split()[0:1] == [jax_r.get("config", {}).get("dtype")]


def _cpuinfo(field: str) -> str:
  """The first `field` line's value in /proc/cpuinfo ("" where there is none)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(field):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


# The CPU features the matmul libraries pick their kernels by (x86, then ARM).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16", "i8mm")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              epilog="Any --config.KEY=VALUE is passed to the jaxvid config.")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="jaxvid config (PATH[:ARG]) both models are shaped by")
  p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
  side = p.add_mutually_exclusive_group()
  side.add_argument("--torch_only", action="store_true", help="time only the PyTorch model")
  side.add_argument("--jax_only", action="store_true", help="time only the jaxvid model")
  args, overrides = p.parse_known_args()
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.steps < 1:
    p.error("--steps must be at least 1")
  spec = args.config
  if spec == DEFAULT_CONFIG and not os.path.isfile(spec):     # run from outside the repository
    spec = str(Path(__file__).resolve().parent.parent / DEFAULT_CONFIG)
  try:
    cfg = config_lib.load(spec, overrides)
    distributed.initialize(cfg, batch=cfg.train.batch_size)   # the CPU devices, as `jaxvid bench` makes them
  except UserError as e:
    _fail(str(e))
  if not args.jax_only:
    _import_torch()            # fail fast, before minutes of jax work, if the extra is missing

  b = cfg.train.batch_size
  flops = flops_lib.count(cfg, b)
  load = {"start": _load()}
  torch_r = jax_r = None
  if not args.jax_only:
    print(f"PyTorch: timing {args.steps} train steps and forwards ...", file=sys.stderr, flush=True)
    torch_r = run_torch(cfg, args.steps)
    torch, _ = _import_torch()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()   # the model is gone: hand its cached blocks back before jaxvid allocates
    load["after_torch"] = _load()
  if not args.torch_only:
    print(f"jaxvid: compiling, then timing {args.steps} train steps and forwards ...", file=sys.stderr, flush=True)
    jax_r = run_jax(cfg, args.steps)
    load["after_jax"] = _load()

  print(f"\n{spec} {' '.join(overrides)}: batch {b} x {config_lib.num_tokens(cfg):,} tokens, "
        f"{flops.forward / 1e9:.1f} GFLOP forward (text encoder {flops.text / 1e6:.1f} MFLOP)")
  print(table(torch_r, jax_r))
  print("ratio = PyTorch time / jaxvid time (rates: jaxvid / PyTorch; > 1: jaxvid faster); "
        "load average (1, 5, 15 min): "
        + ", ".join(f"{k} {v}" for k, v in load.items()))
  ratios = {}
  if torch_r and jax_r:
    ratios = {"train_step": torch_r["train_step_s"] / jax_r["train_step_s"],
              "forward": torch_r["forward_s"] / jax_r["forward_s"],
              # A rate: jaxvid's over PyTorch's (> 1: jaxvid's matmuls faster); None across dtypes.
              "peak_matmul_jax_over_torch": (jax_r["peak_flops"] / torch_r["peak_flops"]
                                             if _same_dtype(torch_r, jax_r) else None)}
  import numpy as np
  cpu_flags = (_cpuinfo("flags") or _cpuinfo("Features")).split()    # x86 / ARM
  print(json.dumps({
      "config": spec, "overrides": overrides, "steps": args.steps, "warmup": 2,
      "batch": b, "tokens_per_clip": config_lib.num_tokens(cfg),
      "flops": {"forward": flops.forward, "train": flops.train, "text_encoder_forward": flops.text,
                "text_encoder_share": flops.text / flops.forward},
      "torch": torch_r, "jax": jax_r, "ratio_torch_over_jax": ratios,
      "versions": {"torch": torch_r and torch_r["torch"], "diffusers": torch_r and torch_r["diffusers"],
                   "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()},
      "machine": {"processor": platform.processor(), "cpu_model": _cpuinfo("model name"),
                  "cpu_flags": [f for f in CPU_FLAGS if f in cpu_flags], "cpu_count": os.cpu_count(),
                  "node": platform.node()},
      "load_average": load, "time": time.time(),
  }, sort_keys=True, default=str))


if __name__ == "__main__":
  main()
