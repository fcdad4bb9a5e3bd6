"""Configs: the full default tree, loading `configs/*.py`, command-line overrides, checks.

Every config file in `configs/` starts from `base_config()` and changes what it needs, so
all configs share one set of keys. A config is locked: an unknown key is an error.

  cfg = load("configs/dit.py:B", ["--config.train.steps=50"])
  validate(cfg, num_devices=jax.device_count())
"""

import ast
import hashlib
import importlib.util
import json
import math
import os
import re

import ml_collections

from jaxvid.errors import UserError

ConfigDict = ml_collections.ConfigDict

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
POS_EMBEDS = ("sincos", "none")
TEXT_ENCODERS = ("bytes", "words")
DATA_SOURCES = ("synthetic", "files", "latents")
CROPS = ("random", "center")
AUTOENCODERS = ("identity", "vae")
MODELS = ("dit", "vae")              # model.name: the diffusion transformer, or the video autoencoder
VAE_NORMS = ("rms", "group")
LATENT_DTYPES = ("float16", "bfloat16", "float32")
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
CONTEXT_PARALLEL = ("ulysses", "ring")
# model.attention: "auto" picks per platform (models/attention.py: cudnn on GPU, splash on TPU, blocked on CPU).
ATTENTION = ("auto", "xla", "blocked", "cudnn", "splash")
CONDITIONS = ("none", "mask")
SAMPLERS = ("euler", "heun", "dpm++2m")


def base_config() -> ConfigDict:
  """Every key jaxvid knows, with defaults. Config files override a few of them."""
  c = ConfigDict()
  c.seed = 0

  # The clip the model sees: frames, height, width, channels (3 in pixel space).
  c.video = ConfigDict(dict(frames=16, height=64, width=64, channels=3, fps=8))

  c.model = ConfigDict()
  c.model.name = "dit"
  c.model.patch = (1, 2, 2)        # (t, h, w) patch size
  c.model.width = 384              # D
  c.model.depth = 12
  c.model.heads = 6
  c.model.mlp_dim = 1536
  c.model.freq_dim = 256           # sinusoidal timestep features
  c.model.rope_theta = 10000.0
  c.model.pos_embed = "sincos"     # "sincos": also add fixed absolute 3D positions; "none": RoPE only (Wan)
  c.model.qk_norm = True           # RMS norm on queries and keys (across heads, as in Wan)
  c.model.cross_attn_norm = True   # affine LayerNorm before cross-attention (as in Wan)
  c.model.eps = 1e-6
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"       # compute dtype
  c.model.remat = "none"           # one of REMAT_POLICIES
  # Blocks per iteration of the scan over layers: 1 compiles one block whatever the depth; depth
  # unrolls all (XLA schedules across layers: configs/bench_cpu.py's train step ~9% faster on a
  # 2-core CPU, its forward ~4% slower, its compile 1.8x longer).
  c.model.scan_unroll = 1
  c.model.attention = "auto"       # one of ATTENTION; "auto": the best kernel for the platform
  c.model.context_parallel = "ulysses"   # with mesh.sequence > 1: "ulysses" (all-to-all) or "ring"
  # "mask": the model also takes a mask of known (clean) elements of its input, which makes one
  # model do image-to-video, extension, long videos and in-painting (diffusion/conditioning.py).
  c.model.condition = "none"

  # With model.condition = "mask": how often training examples get each kind of known part
  # (weights, normalized): nothing, the first frame, the first k frames, the last k frames,
  # everything but a box over a range of frames.
  c.cond = ConfigDict(dict(none=0.4, first_frame=0.15, prefix=0.2, suffix=0.05, boxes=0.2))

  # Text encoder: a small transformer over bytes or hashed words, trained jointly (jaxvid/models/text.py).
  c.text = ConfigDict()
  c.text.encoder = "bytes"          # "bytes" (UTF-8) or "words" (hashed, one token a word)
  c.text.vocab = 4096              # hash buckets of "words" (bytes have 258 ids)
  c.text.max_len = 64              # tokens, including the leading BOS
  c.text.width = 128
  c.text.depth = 2
  c.text.heads = 4
  c.text.mlp_dim = 512
  c.text.drop_rate = 0.1           # caption dropout for classifier-free guidance

  # Rectified flow: x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0.
  c.flow = ConfigDict()
  c.flow.timestep = "logit_normal"  # or "uniform"
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.shift = 0.0               # > 0: fixed shift; 0: grows with the token count
  c.flow.shift_base = 0.5          # log-shift at shift_base_tokens ...
  c.flow.shift_max = 1.15          # ... and at shift_max_tokens, interpolated linearly
  c.flow.shift_base_tokens = 256
  c.flow.shift_max_tokens = 4096

  c.optim = ConfigDict()
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1       # cosine decays to lr * min_lr_ratio
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.999
  # Parameters left as they are: a regular expression searched in paths like "encoder/conv_in/kernel"
  # ("" trains all). They get no gradient (no backward runs through them) and no update, and their EMA
  # stays equal to them; with --init_from they take the source run's EMA values.
  c.optim.frozen = ""

  c.train = ConfigDict(dict(steps=1000, batch_size=8, log_every=50))
  # Train steps run back to back in one compiled program (a scan over that many batches) between
  # logging, checkpoint and evaluation points: fewer calls, and the step's scratch memory is
  # allocated once per call (on CPU, fresh pages every call: train step ~12% faster at 4 in
  # configs/bench_cpu.py). A stop request is honoured at the end of the call. Only batches of one
  # bucket share a call: with several buckets (data.buckets) most calls run step by step.
  c.train.steps_per_call = 1
  # Keep the last `keep` checkpoints plus every `keep_every`-th step (0: none); save in the background.
  c.checkpoint = ConfigDict(dict(every=500, keep=3, keep_every=0, async_save=True))

  c.data = ConfigDict()
  c.data.source = "synthetic"
  c.data.manifest = ""
  c.data.store = ""
  c.data.split = "train"           # synthetic: "train" holds out some captions, "all" does not
  c.data.workers = 0               # grain worker processes (0: in the main process)
  c.data.threads = 1               # grain read threads per process (decoding waits on ffmpeg: threads overlap it)
  c.data.prefetch = 2              # batches buffered ahead
  # files / latents: buckets of (frames, height, width) or (frames, height, width, global batch);
  # () is one bucket at video.{frames,height,width}. Without a batch, a bucket gets the token
  # budget of train.batch_size clips of the video.* shape. Each bucket compiles once.
  c.data.buckets = ()
  c.data.fps = 0.0                 # files: frame rate clips are sampled at (0: native / stride)
  c.data.stride = 1                # files, with fps = 0: take every stride-th frame
  c.data.crop = "random"           # files: "random" (crop and start) or "center"
  c.data.probe_threads = 16        # files: threads reading file headers at startup

  # The autoencoder between pixels and the model's latent space ("identity": pixels, scaled to [-1, 1]).
  c.autoencoder = ConfigDict(dict(name="identity"))
  # autoencoder.name="vae": a causal video VAE trained by jaxvid (configs/vae.py). `checkpoint` is its run
  # directory or export; the latent geometry below is what this model sees and must match it (checked on
  # load). Encode and decode run in temporal chunks of `chunk` latent frames (0: whole clips), and in
  # spatial tiles of `tile` latent cells overlapping by `tile_overlap` (0: whole frames).
  c.autoencoder.update(checkpoint="", latent_channels=16, temporal_compression=4, spatial_compression=8,
                       chunk=4, tile=0, tile_overlap=2)
  # `jaxvid encode`: clips per device batch, and the dtype latents are stored in.
  c.encode = ConfigDict(dict(batch_size=8, dtype="float16"))

  # A causal 3D convolutional VAE (models/vae.py), trained with model.name="vae" (configs/vae.py).
  # Architecture: p x p pixel patches folded into channels (p = `patch`), then stages of widths
  # channels * channel_mult (len = 1 + max(log2(temporal_compression), log2(spatial_compression / patch))),
  # `blocks` residual blocks per stage, `norm` "rms" (per position) or "group" (per frame, `groups` groups);
  # `shortcuts`: parameter-free shortcuts around every 2x down/upsampling and the latent (DC-AE style; they need
  # latent_channels to divide the last stage's width).
  # Loss: l1 |x - x'| + mse (x - x')^2 + kl KL (means over elements) + ssim (1 - SSIM) + adversarial
  # (hinge GAN with a 3D patch discriminator, from step adversarial_start); clipped_range: going past -1 or 1
  # where the target pixel is -1 or 1 costs nothing (sharper reconstructions; see configs/vae.py; recon/*
  # metrics then measure that error). Held-out PSNR/SSIM on eval_clips clips (synthetic: unseen combinations;
  # files: of eval_manifest; 0: none) every eval_every steps (0: at the end only); per-channel latent statistics
  # over stats_clips training clips.
  c.vae = ConfigDict(dict(
      channels=64, channel_mult=(1, 2, 2), blocks=1, latent_channels=16, temporal_compression=4,
      spatial_compression=8, patch=4, norm="rms", groups=8, shortcuts=False, dtype="float32",
      param_dtype="float32", l1=0.0, mse=1.0, kl=1e-6, ssim=0.0, adversarial=0.0, adversarial_start=0,
      clipped_range=False, eval_every=0, eval_clips=32, eval_manifest="", stats_clips=64))

  # Multi-host (see parallel/distributed.py); the environment can supply all of it.
  # cpu_devices: JAX CPU devices this process makes (when it computes on its CPU). -1: JAX's own count
  # (JAX_NUM_CPU_DEVICES, XLA_FLAGS' --xla_force_host_platform_device_count, else 1). 0: one per core this
  # process may use, at most as many as the command's batch and the mesh split over (a count in the
  # environment wins, and multi-process jobs keep JAX's count). N: N. XLA:CPU runs one program's ops mostly
  # one after another, so on larger models a device per core keeps every core busy (configs/bench_cpu.py
  # and configs/vae.py:S set 0). Pin N for a run you will resume on a machine with other cores.
  c.distributed = ConfigDict(dict(initialize="auto", coordinator="", num_processes=0, process_id=-1,
                                  timeout_s=300, cpu_devices=-1))

  # Mesh axis sizes; -1 takes the remaining devices. The product must equal the device count.
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1,
                           # Multi-slice / multi-node: how many slices (TPU) or hosts (GPU) each axis
                           # spans over the slower data-center network; each size above must divide.
                           dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_sequence=1))
  # Logical axis -> mesh axes ("" replicates; "a,b" shards over both). See parallel/sharding.py.
  c.sharding = ConfigDict(dict(
      batch="data,fsdp", length="sequence", act_embed="", act_heads="tensor",
      embed="fsdp", heads="tensor", mlp="tensor", kv="", layers="", vocab=""))

  c.sample = ConfigDict()
  c.sample.steps = 30
  c.sample.guidance = 4.0
  c.sample.seed = 0
  c.sample.sampler = "euler"         # one of SAMPLERS: euler, heun (2 evaluations a step), dpm++2m
  c.sample.guidance_interval = (0.0, 1.0)   # guidance applies where lo <= t <= hi; the conditional model elsewhere
  c.sample.negative_prompt = ""
  c.sample.context_frames = 0       # extension and long videos: frames of the clip so far given to each new
                                    # chunk (0: half of video.frames)
  c.sample.batch_size = 8
  c.sample.use_ema = True
  return c


def load(spec: str, overrides: list[str] = ()) -> ConfigDict:
  """Loads `PATH[:ARG]`, applies `--config.KEY=VALUE` overrides and locks the result."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found; pass --config configs/tiny.py or another file")
  module_spec = importlib.util.spec_from_file_location("jaxvid_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A user's config file: show what broke, in one line.
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except (KeyError, ValueError, TypeError) as e:
    raise UserError(f"config {spec!r}: {e}") from e
  cfg = ConfigDict(cfg)
  cfg.lock()
  apply_overrides(cfg, overrides)
  # Absolute, so that the config.json of a run points at the same VAE from any directory
  # (`jaxvid sample` reads it from there).
  if cfg.autoencoder.checkpoint:
    cfg.autoencoder.checkpoint = os.path.abspath(os.path.expanduser(cfg.autoencoder.checkpoint))
  return cfg


def apply_overrides(cfg: ConfigDict, overrides: list[str]) -> None:
  """Applies `--config.a.b=value` (or `config.a.b=value`) strings in place."""
  for item in overrides:
    key, eq, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not eq:
      raise UserError(f"override {item!r} has no value; write --config.{key}=VALUE")
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else ():
      if not isinstance(node, ConfigDict) or part not in node:
        raise UserError(f"unknown config key {key!r} in {item!r}; see config.json of a run for all keys")
      node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node or isinstance(node[leaf], ConfigDict):
      raise UserError(f"unknown config key {key!r} in {item!r}; see config.json of a run for all keys")
    node[leaf] = _parse(key, raw, node[leaf])


def _parse(key: str, raw: str, current):
  """Parses `raw` into the type of the field's current value."""
  want = type(current)
  if want is str:
    return raw
  if want is bool:
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}={raw}: expected true or false")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    if current and isinstance(current[0], float):
      value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if current and not all(isinstance(v, type(current[0])) for v in value):
      raise UserError(f"--config.{key}={raw}: expected a tuple of {type(current[0]).__name__}")
    return type(current)(value)
  if type(value) is not want or (want is int and isinstance(value, bool)):
    raise UserError(f"--config.{key}={raw}: expected {want.__name__}, got {type(value).__name__}")
  return value


def mesh_shape(cfg: ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves `-1` in `cfg.mesh` and checks the product against the device count."""
  sizes = {a: int(cfg.mesh[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise UserError(f"mesh {sizes}: sizes must be positive, with at most one -1")
  fixed = 1
  for a, s in sizes.items():
    fixed *= 1 if s == -1 else s
  if free:
    if num_devices % fixed:
      raise UserError(f"mesh {sizes} cannot fill {num_devices} devices: {fixed} does not divide it; "
                      f"{_mesh_fix(sizes, num_devices)}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh {sizes} has {fixed} devices but {num_devices} are present; "
                    f"{_mesh_fix(sizes, num_devices)}")
  return sizes


def _mesh_fix(sizes: dict[str, int], num_devices: int) -> str:
  """The overrides that make a mesh of `num_devices`: data=-1, and the other axes 1 where
  they do not divide the devices."""
  others = {a: s for a, s in sizes.items() if a != "data" and s > 1}
  split = num_devices % math.prod(others.values())
  flags = ["--config.mesh.data=-1"] + ([f"--config.mesh.{a}=1" for a in others] if split else [])
  return f"set {' '.join(flags)} to fill them"


def validate(cfg: ConfigDict, num_devices: int, train: bool = False) -> None:
  """Checks constraints between fields; the error says which key to change.

  `train` adds the checks that only training needs (the batch must split over the mesh).
  """
  v, m = cfg.video, cfg.model
  try:
    re.compile(cfg.optim.frozen)
  except re.error as e:
    raise UserError(f"optim.frozen={cfg.optim.frozen!r} is not a regular expression ({e})") from e
  if len(m.patch) != 3 or min(m.patch) < 1:
    raise UserError(f"model.patch={m.patch} must be three positive sizes (t, h, w)")
  validate_autoencoder(cfg)
  grid = latent_shape(cfg)[:3]   # the video.* clip in the model's latent space
  for name, size, cells, p in zip(("frames", "height", "width"), (v.frames, v.height, v.width), grid, m.patch):
    if size < 1 or cells % p:
      latent = f" ({cells} latent {name})" if cells != size else ""
      raise UserError(f"video.{name}={size}{latent} is not divisible by its patch size {p} (model.patch={m.patch})")
  if m.width % m.heads:
    raise UserError(f"model.heads={m.heads} does not divide model.width={m.width}")
  if (m.width // m.heads) % 2 or m.width // m.heads < 6:
    raise UserError(f"head dim model.width/model.heads={m.width // m.heads} must be even and >= 6 "
                    "for 3D rotary embeddings")
  if cfg.text.width % cfg.text.heads:
    raise UserError(f"text.heads={cfg.text.heads} does not divide text.width={cfg.text.width}")
  if cfg.text.encoder not in TEXT_ENCODERS:
    raise UserError(f"text.encoder={cfg.text.encoder!r} must be one of {TEXT_ENCODERS}")
  if cfg.text.vocab < 3:
    raise UserError(f"text.vocab={cfg.text.vocab} must be at least 3")
  if cfg.text.max_len < 2:
    raise UserError(f"text.max_len={cfg.text.max_len} must be at least 2")
  for key in ("param_dtype", "dtype"):
    if m[key] not in DTYPES:
      raise UserError(f"model.{key}={m[key]!r} must be one of {DTYPES}")
  if m.pos_embed not in POS_EMBEDS:
    raise UserError(f"model.pos_embed={m.pos_embed!r} must be one of {POS_EMBEDS}")
  if m.remat not in REMAT_POLICIES:
    raise UserError(f"model.remat={m.remat!r} must be one of {REMAT_POLICIES}")
  if not isinstance(m.scan_unroll, int) or not 1 <= m.scan_unroll <= m.depth:
    raise UserError(f"model.scan_unroll={m.scan_unroll!r} must be an integer from 1 (scan) to model.depth={m.depth} "
                    "(all layers unrolled)")
  if m.attention not in ATTENTION:
    raise UserError(f"model.attention={m.attention!r} must be one of {ATTENTION}")
  if m.attention == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    raise UserError(f"model.attention='cudnn' needs --config.model.dtype=bfloat16 or float16 (got {m.dtype!r}); "
                    "or use --config.model.attention=auto")
  if cfg.flow.timestep not in ("logit_normal", "uniform"):
    raise UserError(f"flow.timestep={cfg.flow.timestep!r} must be 'logit_normal' or 'uniform'")
  if not 0.0 <= cfg.text.drop_rate < 1.0:
    raise UserError(f"text.drop_rate={cfg.text.drop_rate} must be in [0, 1)")
  if cfg.data.source not in DATA_SOURCES:
    raise UserError(f"data.source={cfg.data.source!r} must be one of {DATA_SOURCES}")
  if cfg.data.source == "files" and not cfg.data.manifest:
    raise UserError("data.source='files' needs --config.data.manifest=FILE.jsonl, FILE.csv or a folder")
  if cfg.data.source == "latents" and not cfg.data.store:
    raise UserError("data.source='latents' needs --config.data.store=STORE (written by `jaxvid encode`)")
  if cfg.data.crop not in CROPS:
    raise UserError(f"data.crop={cfg.data.crop!r} must be one of {CROPS}")
  if cfg.data.fps < 0 or cfg.data.stride < 1 or cfg.data.probe_threads < 1 or cfg.data.threads < 1:
    raise UserError("data.fps must be >= 0, data.stride, data.threads and data.probe_threads >= 1")
  if cfg.data.workers < 0 or cfg.data.prefetch < 0:
    raise UserError(f"data.workers={cfg.data.workers} and data.prefetch={cfg.data.prefetch} must be >= 0 "
                    "(workers 0: read in the main process)")
  if cfg.autoencoder.name not in AUTOENCODERS:
    raise UserError(f"autoencoder.name={cfg.autoencoder.name!r} must be one of {AUTOENCODERS}")
  if cfg.encode.dtype not in LATENT_DTYPES or cfg.encode.batch_size < 1:
    raise UserError(f"encode.dtype must be one of {LATENT_DTYPES} and encode.batch_size >= 1")
  if cfg.data.split not in ("train", "heldout", "all"):
    raise UserError(f"data.split={cfg.data.split!r} must be 'train', 'heldout' or 'all'")
  for key in ("steps", "batch_size", "log_every", "steps_per_call"):
    if cfg.train[key] < 1:
      raise UserError(f"train.{key}={cfg.train[key]} must be at least 1")
  if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1 or cfg.checkpoint.keep_every < 0:
    raise UserError("checkpoint.every and checkpoint.keep must be at least 1, checkpoint.keep_every at least 0")
  if cfg.sample.steps < 1 or cfg.sample.batch_size < 1:
    raise UserError("sample.steps and sample.batch_size must be at least 1")
  if cfg.sample.sampler not in SAMPLERS:
    raise UserError(f"sample.sampler={cfg.sample.sampler!r} must be one of {SAMPLERS}")
  interval = tuple(cfg.sample.guidance_interval)
  if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
    raise UserError(f"sample.guidance_interval={cfg.sample.guidance_interval} must be (lo, hi) with "
                    "0 <= lo <= hi <= 1")
  if not 0 <= cfg.sample.context_frames < v.frames:
    raise UserError(f"sample.context_frames={cfg.sample.context_frames} must be in [0, video.frames={v.frames}) "
                    "(0: half of video.frames)")
  compression = clip_compression(cfg)
  if compression and cfg.sample.context_frames and (cfg.sample.context_frames - 1) % compression[0]:
    raise UserError(f"sample.context_frames={cfg.sample.context_frames} must be 1 + {compression[0]} k (whole "
                    "latent frames of the VAE), or 0 for the default")
  if m.condition not in CONDITIONS:
    raise UserError(f"model.condition={m.condition!r} must be one of {CONDITIONS}")
  weights = [cfg.cond[k] for k in cfg.cond]
  if min(weights) < 0 or sum(weights) <= 0:
    raise UserError(f"cond.* weights {dict(cfg.cond)} must be >= 0 with a positive sum")
  sizes = mesh_shape(cfg, num_devices)
  batch_shards = sizes["data"] * sizes["fsdp"]
  if train and cfg.train.batch_size % batch_shards:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"mesh.data*mesh.fsdp={batch_shards}")
  if m.heads % sizes["tensor"]:
    raise UserError(f"model.heads={m.heads} is not divisible by mesh.tensor={sizes['tensor']}")
  if num_tokens(cfg) % sizes["sequence"]:
    raise UserError(f"{num_tokens(cfg)} tokens per clip are not divisible by mesh.sequence={sizes['sequence']}")
  for frames, height, width, _ in buckets(cfg, batch_shards if train else 1):   # batches split only in training
    if num_tokens(cfg, (frames, height, width)) % sizes["sequence"]:
      raise UserError(f"data.buckets entry {frames}x{height}x{width}: {num_tokens(cfg, (frames, height, width))} "
                      f"tokens per clip are not divisible by mesh.sequence={sizes['sequence']}")
  for a in MESH_AXES:
    dcn = cfg.mesh[f"dcn_{a}"]
    if dcn < 1 or sizes[a] % dcn:
      raise UserError(f"mesh.dcn_{a}={dcn} must be positive and divide mesh.{a}={sizes[a]}")
  if m.context_parallel not in CONTEXT_PARALLEL:
    raise UserError(f"model.context_parallel={m.context_parallel!r} must be one of {CONTEXT_PARALLEL}")
  local_heads = m.heads // sizes["tensor"]
  if sizes["sequence"] > 1 and m.context_parallel == "ulysses" and local_heads % sizes["sequence"]:
    raise UserError(f"model.context_parallel='ulysses' needs model.heads/mesh.tensor={local_heads} divisible by "
                    f"mesh.sequence={sizes['sequence']}; use --config.model.context_parallel=ring")


def num_tokens(cfg: ConfigDict, shape: tuple[int, int, int] | None = None) -> int:
  """Spacetime patches per clip of `shape` (frames, height, width of pixels; default video.*):
  (T'/pt) (H'/ph) (W'/pw) over its latent grid (the pixels themselves for `identity`)."""
  pt, ph, pw = cfg.model.patch
  frames, height, width, _ = latent_shape(cfg, shape)
  return (frames // pt) * (height // ph) * (width // pw)


def latent_shape(cfg: ConfigDict, shape: tuple[int, int, int] | None = None) -> tuple[int, int, int, int]:
  """(T', H', W', C') the model sees for clips of `shape` (frames, height, width; default video.*):
  the clip itself for `identity`, (1 + (T - 1) / tc, H / sc, W / sc, Z) for a causal `vae`."""
  frames, height, width = shape or (cfg.video.frames, cfg.video.height, cfg.video.width)
  a = cfg.autoencoder
  if a.name != "vae":
    return (frames, height, width, cfg.video.channels)
  tc, sc = a.temporal_compression, a.spatial_compression
  return (1 + (frames - 1) // tc, height // sc, width // sc, a.latent_channels)


def patch_dims(cfg: ConfigDict) -> tuple[int, int]:
  """(in, out) features of one patch token: out = pt * ph * pw * C' (latent channels); in adds a
  mask channel per element with model.condition = "mask"."""
  pt, ph, pw = cfg.model.patch
  channels = latent_shape(cfg)[3]
  out_dim = pt * ph * pw * channels
  return (out_dim // channels * (channels + 1) if cfg.model.condition == "mask" else out_dim), out_dim


def clip_compression(cfg: ConfigDict) -> tuple[int, int] | None:
  """(tc, sc) of the causal VAE that clips go through (trained, or used as the autoencoder),
  whose clips must have 1 + tc k frames and sides divisible by sc; None for pixel space."""
  if cfg.model.name == "vae":
    return cfg.vae.temporal_compression, cfg.vae.spatial_compression
  if cfg.autoencoder.name == "vae":
    return cfg.autoencoder.temporal_compression, cfg.autoencoder.spatial_compression
  return None


def check_clip(cfg: ConfigDict, what: str, frames: int, height: int, width: int) -> None:
  """A clip shape a causal VAE can take: 1 + tc k frames, sides divisible by sc (see clip_compression)."""
  compression = clip_compression(cfg)
  if compression is None:
    return
  tc, sc = compression
  if frames < 1 or (frames - 1) % tc or height % sc or width % sc:
    raise UserError(f"{what}: a causal VAE with temporal compression {tc} and spatial compression {sc} takes "
                    f"1 + {tc}k frames and sides divisible by {sc}, not {frames}x{height}x{width}; "
                    f"e.g. --config.video.frames={1 + tc * max(1, (frames - 1) // tc)}")


def _power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def validate_autoencoder(cfg: ConfigDict) -> None:
  """The autoencoder a model sees clips through (autoencoder.*), and the VAE being trained (vae.*)."""
  a, v = cfg.autoencoder, cfg.vae
  if cfg.model.name not in MODELS:
    raise UserError(f"model.name={cfg.model.name!r} must be one of {MODELS}")
  if a.name == "vae":
    if not a.checkpoint:
      raise UserError("autoencoder.name='vae' needs --config.autoencoder.checkpoint=DIR, a run directory or export "
                      "of a VAE trained with configs/vae.py")
    if not (_power_of_two(a.temporal_compression) and _power_of_two(a.spatial_compression)) or a.latent_channels < 1:
      raise UserError("autoencoder.temporal_compression and spatial_compression must be powers of two and "
                      "autoencoder.latent_channels >= 1 (the VAE's, as in its config.json)")
    if a.chunk < 0 or a.tile < 0 or a.tile_overlap < 0 or (a.tile and a.tile_overlap >= a.tile):
      raise UserError(f"autoencoder.chunk and autoencoder.tile must be >= 0 and autoencoder.tile_overlap in "
                      f"[0, tile) (got chunk={a.chunk}, tile={a.tile}, tile_overlap={a.tile_overlap})")
  if cfg.model.name == "vae":
    if a.name != "identity":
      raise UserError("a VAE trains on pixels: set --config.autoencoder.name=identity")
    if cfg.data.source == "latents":
      raise UserError("a VAE trains on pixels: use --config.data.source=synthetic or files, not latents")
    if not (_power_of_two(v.temporal_compression) and _power_of_two(v.spatial_compression)
            and v.temporal_compression <= v.spatial_compression):
      raise UserError(f"vae.temporal_compression={v.temporal_compression} and vae.spatial_compression="
                      f"{v.spatial_compression} must be powers of two, temporal <= spatial")
    if not _power_of_two(v.patch) or v.patch > v.spatial_compression:
      raise UserError(f"vae.patch={v.patch} must be a power of two, at most vae.spatial_compression="
                      f"{v.spatial_compression}")
    stages = max(v.temporal_compression, v.spatial_compression // v.patch).bit_length()   # 1 + log2
    if len(v.channel_mult) != stages or min(v.channel_mult) < 1:
      raise UserError(f"vae.channel_mult={v.channel_mult} needs {stages} positive entries (one per resolution: "
                      f"1 + max(log2 temporal_compression, log2(spatial_compression / patch)))")
    if v.channels < 1 or v.blocks < 1 or v.latent_channels < 1:
      raise UserError("vae.channels, vae.blocks and vae.latent_channels must be at least 1")
    if v.norm not in VAE_NORMS:
      raise UserError(f"vae.norm={v.norm!r} must be one of {VAE_NORMS}")
    if v.shortcuts and v.channels * v.channel_mult[-1] % v.latent_channels:
      raise UserError(f"vae.shortcuts needs vae.latent_channels={v.latent_channels} to divide the last stage's "
                      f"width vae.channels * vae.channel_mult[-1] = {v.channels * v.channel_mult[-1]}: set "
                      "--config.vae.latent_channels to a divisor of it, or --config.vae.shortcuts=False")
    if v.norm == "group" and any(v.channels * mult % v.groups for mult in v.channel_mult):
      raise UserError(f"vae.groups={v.groups} must divide every stage width vae.channels * vae.channel_mult")
    for key in ("dtype", "param_dtype"):
      if v[key] not in DTYPES:
        raise UserError(f"vae.{key}={v[key]!r} must be one of {DTYPES}")
    if min(v.l1, v.mse, v.kl, v.ssim, v.adversarial) < 0 or v.l1 + v.mse <= 0:
      raise UserError("vae.l1, vae.mse, vae.kl, vae.ssim and vae.adversarial must be >= 0, with vae.l1 + vae.mse > 0")
    if v.eval_every < 0 or v.eval_clips < 0 or v.stats_clips < 1:
      raise UserError("vae.eval_every and vae.eval_clips must be >= 0, vae.stats_clips >= 1")
    if cfg.video.channels != 3:
      raise UserError(f"a VAE trains on RGB video: set --config.video.channels=3 (it is {cfg.video.channels})")
  elif a.name == "vae" and cfg.video.channels != 3:
    raise UserError(f"autoencoder.name='vae' encodes RGB video: set --config.video.channels=3 "
                    f"(it is {cfg.video.channels}); the model sees autoencoder.latent_channels")
  check_clip(cfg, "video.*", cfg.video.frames, cfg.video.height, cfg.video.width)


def buckets(cfg: ConfigDict, batch_shards: int = 1) -> list[tuple[int, int, int, int]]:
  """The clip shapes of `data.buckets` as (frames, height, width, global batch).

  A bucket without a batch gets the token budget of train.batch_size clips of the video.*
  shape, rounded down to a multiple of `batch_shards` (mesh.data * mesh.fsdp), at least one
  per shard. No buckets: one, the video.* shape with train.batch_size.
  """
  v, patch = cfg.video, cfg.model.patch
  specs = cfg.data.buckets or ((v.frames, v.height, v.width, cfg.train.batch_size),)
  budget = cfg.train.batch_size * num_tokens(cfg)
  out = []
  for spec in specs:
    spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
    if len(spec) not in (3, 4) or not all(isinstance(x, int) and x > 0 for x in spec):
      raise UserError(f"data.buckets entry {spec} must be (frames, height, width) or (frames, height, width, "
                      "batch) of positive ints")
    frames, height, width = spec[:3]
    check_clip(cfg, f"data.buckets entry {spec}", frames, height, width)
    grid = latent_shape(cfg, spec[:3])[:3]
    for name, size, p in zip(("frames", "height", "width"), grid, patch):
      if size % p:
        raise UserError(f"data.buckets entry {spec}: {name}={size} is not divisible by its patch size {p} "
                        f"(model.patch={patch})")
    batch = spec[3] if len(spec) == 4 else max(batch_shards, budget // num_tokens(cfg, spec[:3]) // batch_shards
                                               * batch_shards)
    if batch % batch_shards:
      raise UserError(f"data.buckets entry {spec}: batch {batch} is not divisible by "
                      f"mesh.data*mesh.fsdp={batch_shards}")
    out.append((frames, height, width, batch))
  if len({b[:3] for b in out}) != len(out):
    raise UserError(f"data.buckets {cfg.data.buckets} lists a shape twice; give each shape once")
  return out


def to_json(cfg: ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
  """Rebuilds a locked config from `to_json` output, on top of today's defaults."""
  cfg = base_config()
  _update(cfg, json.loads(text))
  cfg.lock()
  return cfg


def _update(node: ConfigDict, values: dict) -> None:
  for k, v in values.items():
    if k not in node:
      raise UserError(f"saved config has key {k!r} that this jaxvid does not know")
    if isinstance(node[k], ConfigDict):
      _update(node[k], v)
    else:
      node[k] = _tuples(v) if isinstance(node[k], tuple) else v


def _tuples(value):
  """JSON lists back to (nested) tuples."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# model.* keys that only change how a DiT runs (its parameters and outputs are the same).
MODEL_RUNTIME = ("dtype", "remat", "attention", "context_parallel", "scan_unroll")
# vae.* keys that fix a VAE's parameters or what they compute (the rest is how it runs and trains).
VAE_ARCHITECTURE = ("channels", "channel_mult", "blocks", "latent_channels", "temporal_compression",
                    "spatial_compression", "patch", "norm", "groups", "shortcuts", "param_dtype")
# Model keys added after models were saved, with the value that computes what the code did before
# them: at that value a key is left out of the hash, so earlier checkpoints and exports keep theirs.
HASH_NEUTRAL = {"vae.shortcuts": False}


def model_hash(cfg: ConfigDict) -> str:
  """Hash of what fixes the parameters and what they compute: a checkpoint only fits a model
  with the same hash."""
  keys = {k: v for k, v in _model_keys(cfg).items() if k not in HASH_NEUTRAL or v != HASH_NEUTRAL[k]}
  return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def _model_keys(cfg: ConfigDict) -> dict:
  """The flat {key: value} that fixes the parameters (not how the model runs)."""
  if cfg.model.name == "vae":   # the VAE's architecture (a discriminator exists only with an adversarial loss)
    keys = {f"vae.{k}": cfg.vae[k] for k in VAE_ARCHITECTURE}
    keys.update({"model.name": "vae", "vae.discriminator": cfg.vae.adversarial > 0})
    return keys
  keys = {f"model.{k}": v for k, v in cfg.model.items() if k not in MODEL_RUNTIME}
  keys.update({f"text.{k}": v for k, v in cfg.text.items() if k != "drop_rate"})
  keys["video.channels"] = cfg.video.channels
  if cfg.autoencoder.name != "identity":   # the model's input is the autoencoder's latents
    keys.update({"autoencoder.name": cfg.autoencoder.name,
                 "autoencoder.latent_channels": cfg.autoencoder.latent_channels})
  return keys


def model_diffs(saved: ConfigDict, cfg: ConfigDict) -> str:
  """Which parameter-fixing keys differ, for error messages."""
  a, b = _model_keys(saved), _model_keys(cfg)
  keys = list(a) + [k for k in b if k not in a]   # a VAE's keys are not a DiT's
  diffs = [f"{k}: saved {a.get(k)}, now {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
  return "; ".join(diffs[:4]) or "different parameters"


def config_hash(cfg: ConfigDict) -> str:
  return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:12]
