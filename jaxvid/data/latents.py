"""The latent cache: clips encoded once by the autoencoder, stored in TensorStore, read by training.

  jaxvid encode --config configs/tiny.py --manifest data.jsonl --output latents/
  jaxvid train  --config configs/tiny.py --workdir runs/t --config.data.source=latents --config.data.store=latents/

Layout of a store (zarr arrays, one chunk per sample):

  STORE/meta.json                 format, autoencoder, latent dtype, text tokenizer, the manifest's
                                  hash, and per bucket its clip shape, latent shape and row count
  STORE/BUCKET/latents            [rows, T', H', W', C'] in encode.dtype   (BUCKET is e.g. 16x256x256)
  STORE/BUCKET/tokens             [rows, L] int32, the caption's tokens
  STORE/index/part-PPPPP.jsonl    one line per written sample: {"key", "path", "caption", "bucket", "row"}

The text encoder in jaxvid is trained with the model, so what can be cached for it is its input,
the tokens; a frozen pretrained encoder would add its embeddings as one more array per bucket.

Each sample has a fixed row (its rank among the manifest's usable clips of its bucket), each
process encodes its own share of the clips on its own devices and writes its own index part,
and an index line is written only after the sample's arrays are on disk. So `encode` can be
stopped at any point and rerun: what is in the index is skipped, the rest is written.
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import tensorstore as ts
import tqdm

from jaxvid import config as config_lib
from jaxvid.data import buckets as bucket_lib
from jaxvid.data import video_files
from jaxvid.errors import UserError
from jaxvid.models import autoencoder as autoencoder_lib
from jaxvid.models import text
from jaxvid.parallel import distributed

log = logging.getLogger("jaxvid")
FORMAT = "jaxvid-latents/1"


def _array_spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _text_spec(cfg: ml_collections.ConfigDict) -> dict:
  return {"encoder": cfg.text.encoder, "vocab": cfg.text.vocab, "max_len": cfg.text.max_len}


def read_meta(store: str) -> dict:
  path = os.path.join(store, "meta.json")
  if not os.path.isfile(path):
    raise UserError(f"{store} is not a latent store (no meta.json); write one with jaxvid encode")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise UserError(f"{store}/meta.json has format {meta.get('format')!r}, expected {FORMAT!r}; re-encode")
  return meta


def read_index(store: str) -> list[dict]:
  """Every written sample, sorted by (bucket, row) so the order is the same for any writer count."""
  rows = {}
  for part in sorted(glob.glob(os.path.join(store, "index", "part-*.jsonl"))):
    with open(part, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a killed process: that sample is redone
          continue
        rows[(row["bucket"], row["row"])] = row
  return [rows[k] for k in sorted(rows)]


def _create_or_check(store: str, meta: dict) -> None:
  """Writes meta.json and creates the arrays, or checks that an existing store has the same meta."""
  path = os.path.join(store, "meta.json")
  if os.path.exists(path):
    old = read_meta(store)
    for key in ("manifest_hash", "autoencoder", "autoencoder_id", "dtype", "text", "buckets"):
      if old.get(key) != meta.get(key):
        raise UserError(f"{store} was encoded with another {key} ({old.get(key)} vs {meta.get(key)}); "
                        "use a new --output or the same manifest and config")
    return
  if os.path.exists(store) and os.listdir(store):
    raise UserError(f"--output {store} exists and is not a latent store; give a new or empty folder")
  os.makedirs(os.path.join(store, "index"), exist_ok=True)
  for b in meta["buckets"]:
    rows = max(b["rows"], 1)
    ts.open({**_array_spec(os.path.join(store, b["name"], "latents")),
             "metadata": {"shape": [rows, *b["latent_shape"]], "chunks": [1, *b["latent_shape"]],
                          "dtype": np.dtype(meta["dtype"]).str if meta["dtype"] != "bfloat16" else "bfloat16"}},
            create=True).result()
    ts.open({**_array_spec(os.path.join(store, b["name"], "tokens")),
             "metadata": {"shape": [rows, meta["text"]["max_len"]], "chunks": [1, meta["text"]["max_len"]],
                          "dtype": "<i4"}}, create=True).result()
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(path + ".tmp", path)


def _ends_cut_short(path: str) -> bool:
  """Whether the file does not end with a newline (it was cut short by a killed process)."""
  if not os.path.getsize(path):
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def encode(cfg: ml_collections.ConfigDict, manifest_path: str, store: str) -> dict:
  """Encodes every usable clip of the manifest into `store`; returns counts
  {"written", "present", "skipped"} for this process."""
  store = os.path.abspath(store)
  if os.path.exists(store) and not os.path.isdir(store):
    raise UserError(f"--output {store} exists and is not a folder")
  ae = autoencoder_lib.make(cfg)
  buckets = [bucket_lib.Bucket(*b) for b in config_lib.buckets(cfg)]
  clips, skipped = video_files.load_clips(manifest_path, buckets, cfg.data.fps, cfg.data.stride,
                                          cfg.data.probe_threads, progress=jax.process_index() == 0)
  rows, per_bucket = [], [0] * len(buckets)
  for c in clips:
    rows.append(per_bucket[c.bucket])
    per_bucket[c.bucket] += 1
  meta = {"format": FORMAT, "autoencoder": ae.name, "dtype": cfg.encode.dtype, "text": _text_spec(cfg),
          "manifest": os.path.abspath(manifest_path),
          "manifest_hash": video_files.clips_digest(clips)[:16],
          "buckets": [{"name": b.name, "frames": b.frames, "height": b.height, "width": b.width,
                       "latent_shape": list(ae.latent_shape(b.frames, b.height, b.width, 3)), "rows": n}
                      for b, n in zip(buckets, per_bucket)]}
  if ae.name != "identity":   # which trained autoencoder (parameters and latent statistics)
    meta["autoencoder_id"] = ae.identity()
  # The autoencoder loads (or fails: no checkpoint, no latent statistics) before the store is made.
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("batch",))
  ae_params = ae.load(mesh)
  error = None
  try:   # process 0 creates the store (or checks it); then every process checks it
    if jax.process_index() == 0:
      _create_or_check(store, meta)
  except UserError as e:
    error = e
  distributed.fail_together(error)
  if jax.process_index() != 0:
    _create_or_check(store, meta)

  done = {(r["bucket"], r["row"]) for r in read_index(store)}
  mine = [(c, row) for i, (c, row) in enumerate(zip(clips, rows))
          if i % jax.process_count() == jax.process_index() and (buckets[c.bucket].name, row) not in done]
  present = sum(1 for i in range(len(clips)) if i % jax.process_count() == jax.process_index()) - len(mine)

  shard = NamedSharding(mesh, P("batch"))
  dtype = jax.numpy.dtype(cfg.encode.dtype)
  encode_fn = jax.jit(lambda p, v: ae.encode(p, v).astype(dtype), in_shardings=(None, shard), out_shardings=shard)
  tokenizer = text.make_tokenizer(cfg)
  chunk = cfg.encode.batch_size * len(devices)
  arrays = {}
  written = 0
  index_path = os.path.join(store, "index", f"part-{jax.process_index():05d}.jsonl")
  bar = tqdm.tqdm(total=len(mine), desc="encode", unit="clip", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  with open(index_path, "a", encoding="utf-8") as index:
    if _ends_cut_short(index_path):   # a killed run's half line: start ours on a line of their own
      index.write("\n")
    for b, bucket in enumerate(buckets):
      todo = [(c, row) for c, row in mine if c.bucket == b]
      if not todo:
        continue
      arrays[b] = tuple(ts.open(_array_spec(os.path.join(store, bucket.name, name))).result()
                        for name in ("latents", "tokens"))
      for start in range(0, len(todo), chunk):
        good, videos = [], []
        for c, row in todo[start:start + chunk]:
          try:
            videos.append(video_files.decode(c.entry, c.meta, bucket.frames, bucket.height, bucket.width, c.rate))
            good.append((c, row))
          except video_files.BadFile as e:
            video_files.report_skip(c.entry.key, str(e))
            skipped += 1
        bar.update(len(todo[start:start + chunk]) - len(good))
        if not good:
          continue
        batch = np.stack(videos)
        pad = -len(batch) % len(devices)
        batch = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch
        latents = np.asarray(jax.device_get(encode_fn(ae_params, jax.device_put(batch, shard))))[:len(good)]
        tokens = tokenizer([c.entry.caption for c, _ in good])
        idx = np.array([row for _, row in good])
        futures = [arrays[b][0][idx].write(latents), arrays[b][1][idx].write(tokens)]
        for f in futures:
          f.result()
        for c, row in good:   # only once the arrays are on disk
          index.write(json.dumps({"key": c.entry.key, "path": c.entry.path, "caption": c.entry.caption,
                                  "bucket": bucket.name, "row": row}) + "\n")
        index.flush()
        written += len(good)
        bar.update(len(good))
  bar.close()
  _barrier("jaxvid-latents-written")
  return {"written": written, "present": present, "skipped": skipped}


@dataclasses.dataclass
class LatentBatches:
  """Random access to this process's part of each global batch, read from a latent store.

  batches[j] -> {"latents": [b, T', H', W', C'] (store dtype), "tokens": int32 [b, L],
                 "skipped": int32 [b] (zeros)}.
  """
  store: str
  samples: list[dict]          # index rows, sorted
  buckets: list                # bucket_lib.Bucket, in the store's order
  plan: bucket_lib.BatchPlan
  process_index: int = 0
  process_count: int = 1
  _arrays: dict = dataclasses.field(default_factory=dict)

  def __getstate__(self):
    return {**self.__dict__, "_arrays": {}}   # each worker opens its own handles

  def __len__(self) -> int:
    return len(self.plan)

  def _open(self, name: str):
    if name not in self._arrays:
      self._arrays[name] = tuple(ts.open(_array_spec(os.path.join(self.store, name, a))).result()
                                 for a in ("latents", "tokens"))
    return self._arrays[name]

  def __getitem__(self, j: int) -> dict:
    b, items = self.plan[j]
    bucket = self.buckets[b]
    block = bucket_lib.process_block(bucket.batch, self.process_index, self.process_count)
    rows = np.array([self.samples[i]["row"] for i in items[block]])
    latents, tokens = self._open(bucket.name)
    # Rows are read in sorted order (one chunk each) and put back in batch order.
    order = np.argsort(rows, kind="stable")
    out_l = np.empty((len(rows), *latents.shape[1:]), latents.dtype.numpy_dtype)
    out_t = np.empty((len(rows), tokens.shape[1]), np.int32)
    read_l, read_t = latents[rows[order]].read(), tokens[rows[order]].read()
    out_l[order], out_t[order] = read_l.result(), read_t.result()
    return {"latents": out_l, "tokens": out_t, "skipped": np.zeros(len(rows), np.int32)}


def open_batches(cfg: ml_collections.ConfigDict, batch_shards: int, process_index: int,
                 process_count: int) -> tuple[LatentBatches, list]:
  """The store of `data.store` as batches for training; checks it fits the config.

  Returns (batches, per-bucket global batch specs). Bucket batch sizes come from the config's
  buckets of the same clip shape. If the store does not fit on any process, every process stops.
  """
  error, result = None, None
  try:
    result = _open_batches(cfg, batch_shards, process_index, process_count)
  except UserError as e:
    error = e
  distributed.fail_together(error)
  return result


def _open_batches(cfg, batch_shards, process_index, process_count):
  store = os.path.abspath(cfg.data.store)
  meta = read_meta(store)
  if meta["autoencoder"] != cfg.autoencoder.name:
    raise UserError(f"{store} holds latents of autoencoder {meta['autoencoder']!r}, the config uses "
                    f"{cfg.autoencoder.name!r}; re-encode or set --config.autoencoder.name")
  if cfg.autoencoder.name != "identity" and meta.get("autoencoder_id") != autoencoder_lib.make(cfg).identity():
    raise UserError(f"{store} holds latents of another {cfg.autoencoder.name} than autoencoder.checkpoint="
                    f"{cfg.autoencoder.checkpoint} (its parameters or latent statistics differ); re-encode with it")
  if meta["text"] != _text_spec(cfg):
    raise UserError(f"{store} was tokenized with text {meta['text']}, the config has {_text_spec(cfg)}; "
                    "re-encode with this config or use the store's text settings")
  configured = {b[:3]: b[3] for b in config_lib.buckets(cfg, batch_shards)}
  buckets, specs = [], []
  for b in meta["buckets"]:
    shape = (b["frames"], b["height"], b["width"])
    if shape not in configured:
      raise UserError(f"{store} has bucket {b['name']}, which data.buckets does not list; "
                      "train with the config the store was encoded with")
    buckets.append(bucket_lib.Bucket(*shape, configured[shape]))
  channels = config_lib.latent_shape(cfg)[3]
  if any(b["latent_shape"][-1] != channels for b in meta["buckets"]):
    raise UserError(f"{store} has {meta['buckets'][0]['latent_shape'][-1]} latent channels, the model {channels} "
                    "(video.channels, or autoencoder.latent_channels with a VAE); re-encode or set it to match")
  samples = read_index(store)
  if not samples:
    raise UserError(f"{store} has no encoded samples; run jaxvid encode first")
  log.info("%s holds %d of the %d clips its manifest gave (clips that fail to decode stay out; if jaxvid encode "
           "was stopped, rerunning it writes the rest)", store, len(samples), sum(b["rows"] for b in meta["buckets"]))
  digest = hashlib.sha256(json.dumps([(s["bucket"], s["row"]) for s in samples]).encode()).hexdigest()
  distributed.check_same(digest, f"see other samples in {store} than process 0 (is an encode still writing "
                         "it?); train once the store is complete")
  names = [b.name for b in buckets]
  plan = bucket_lib.BatchPlan([names.index(s["bucket"]) for s in samples], [b.batch for b in buckets], cfg.seed)
  dtype = np.dtype(meta["dtype"]) if meta["dtype"] != "bfloat16" else jax.numpy.bfloat16
  for b, m in zip(buckets, meta["buckets"]):
    specs.append({"latents": jax.ShapeDtypeStruct((b.batch, *m["latent_shape"]), dtype),
                  "tokens": jax.ShapeDtypeStruct((b.batch, cfg.text.max_len), np.int32),
                  "skipped": jax.ShapeDtypeStruct((b.batch,), np.int32)})
  used = [s for s, b in zip(specs, buckets) if len(plan.members[names.index(b.name)])]
  return LatentBatches(store, samples, buckets, plan, process_index, process_count), used
