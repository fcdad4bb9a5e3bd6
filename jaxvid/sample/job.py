"""The sampling job: prompts in, videos out.

  jaxvid sample --workdir runs/tiny --prompts prompts.jsonl --output out/

config (the run's config.json + overrides) -> mesh -> restored EMA parameters -> Euler sampler
with classifier-free guidance -> writer (ID.mp4, ID.json, manifest.jsonl, index.html).
Items already in OUTPUT/manifest.jsonl are skipped, so rerunning a killed job resumes it.
Each item's noise comes from its own seed, never from its place in a batch.
"""

import dataclasses
import json
import logging
import os
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import tqdm

from jaxvid import config as config_lib
from jaxvid.diffusion import flow as flow_lib
from jaxvid.diffusion import samplers
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.sample import writer
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import export as export_lib
from jaxvid.train import state as state_lib

log = logging.getLogger("jaxvid")


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  prompt: str
  seed: int
  negative_prompt: str


def item_seed(base: int, item_id: str) -> int:
  """The seed of an item without one: the base seed folded with its id."""
  return (base * 1_000_003 + zlib.crc32(item_id.encode())) % (2**31 - 1)


def read_prompts(path: str, cfg: ml_collections.ConfigDict) -> list[Item]:
  """`.jsonl` ({"prompt", "id"?, "seed"?, "negative_prompt"?} per line) or `.txt` (a prompt a line)."""
  if not os.path.isfile(path):
    raise UserError(f"prompt file {path} not found")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  rows = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if path.endswith(".jsonl"):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from e
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f'{path}:{n}: each line needs a "prompt" string')
    else:
      row = {"prompt": line.strip()}
    row.setdefault("id", f"{len(rows):05d}")
    rows.append(row)
  if not rows:
    raise UserError(f"prompt file {path} has no prompts")
  items, seen = [], set()
  for row in rows:
    try:
      item_id = writer.sanitize_id(str(row["id"]))
    except ValueError as e:
      raise UserError(f"{path}: {e}") from e
    if item_id in seen:
      raise UserError(f"{path}: id {item_id!r} appears twice; ids must be unique")
    seen.add(item_id)
    seed = row.get("seed", item_seed(cfg.sample.seed, item_id))
    if not isinstance(seed, int):
      raise UserError(f"{path}: item {item_id!r} has a non-integer seed {seed!r}")
    items.append(Item(item_id, row["prompt"], seed, row.get("negative_prompt", cfg.sample.negative_prompt)))
  return items


def single_prompt(prompt: str, cfg: ml_collections.ConfigDict) -> list[Item]:
  if not prompt.strip():
    raise UserError("--prompt is empty; give the text of the video to generate")
  slug = writer.sanitize_id(prompt.strip().replace(" ", "_")[:60] or "prompt")
  item_id = f"{slug}-{cfg.sample.seed}"
  return [Item(item_id, prompt, item_seed(cfg.sample.seed, item_id), cfg.sample.negative_prompt)]


def load_run_config(workdir: str, overrides: list[str]) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found; --workdir must be a run directory (jaxvid train) or an export (jaxvid export)")
  with open(path) as f:
    cfg = config_lib.from_json(f.read())
  config_lib.apply_overrides(cfg, overrides)
  return cfg


def make_generate(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh, rules):
  """Returns generate(params, tokens [B, L], negative [B, L], seeds [B]) -> uint8 [B, T, H, W, C]."""
  v = cfg.video
  shape = (v.frames, v.height, v.width, v.channels)
  flow = flow_lib.Flow.from_config(cfg)
  sampler = samplers.make(cfg.sample.sampler, cfg.sample.steps)
  guidance = cfg.sample.guidance
  ae = autoencoder.make(cfg)

  def generate(params, tokens, negative, seeds):
    with sharding.activation_rules(mesh, rules):
      model = nnx.merge(graphdef, params)
      noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds)
      cond = model.encode_text(tokens)
      if guidance == 1.0:
        fn = lambda x, t: model(x, t, *cond)
      else:
        fn = samplers.guided(model, cond, model.encode_text(negative), guidance)
      ts = jnp.broadcast_to(flow.schedule(sampler.steps), (noise.shape[0], sampler.steps + 1))
      return autoencoder.denormalize(ae.decode({}, sampler.sample(fn, noise, ts)))

  return generate


def sample(cfg: ml_collections.ConfigDict, workdir: str, items: list[Item], output: str,
           step: int | None = None) -> None:
  config_lib.validate(cfg, jax.device_count())
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)

  graphdef, abstract_params = state_lib.abstract_model(cfg)
  shardings = state_lib.param_shardings(abstract_params, mesh, rules)
  params, step = export_lib.load_params(workdir, cfg, ckpt_lib.with_shardings(abstract_params, shardings),
                                        step, "ema" if cfg.sample.use_ema else "params")

  folder = writer.OutputFolder(output)
  done = folder.done_ids()
  todo = [it for it in items if it.id not in done]
  log.info("%d items, %d already done in %s; sampling %d at checkpoint step %d",
           len(items), len(items) - len(todo), output, len(todo), step)
  if not todo:
    folder.write_gallery()
    return

  tokenizer = text.make_tokenizer(cfg)
  for it in todo:
    if tokenizer.truncates(it.prompt):
      log.warning("item %s: prompt longer than text.max_len=%d tokens is truncated", it.id, cfg.text.max_len)
  batch = cfg.sample.batch_size
  batch += -batch % (mesh.shape["data"] * mesh.shape["fsdp"])   # whole shards per device
  in_sharding = lambda ndim: mesh_lib.batch_sharding(mesh, rules, ndim)
  generate = jax.jit(make_generate(cfg, graphdef, mesh, rules),
                     in_shardings=(shardings, in_sharding(2), in_sharding(2), in_sharding(1)),
                     out_shardings=in_sharding(5))
  record = {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
            "checkpoint_step": step, "config_hash": config_lib.config_hash(cfg), "mode": "text-to-video",
            "frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width,
            "fps": cfg.video.fps, "ema": cfg.sample.use_ema}

  bar = tqdm.tqdm(total=len(todo), desc="sample", unit="video", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  for start in range(0, len(todo), batch):
    chunk = todo[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    arrays = [tokenizer([it.prompt for it in padded]), tokenizer([it.negative_prompt for it in padded]),
              np.array([it.seed for it in padded], np.int32)]
    videos = generate(params, *[_global(a, in_sharding(a.ndim)) for a in arrays])
    for shard in videos.addressable_shards:     # each process writes the items it holds
      if shard.replica_id != 0:
        continue
      offset = shard.index[0].start or 0
      for i, frames in enumerate(np.asarray(shard.data), offset):
        if i < len(chunk):
          it = chunk[i]
          folder.write_item(it.id, frames, cfg.video.fps, {
              "prompt": it.prompt, "negative_prompt": it.negative_prompt, "seed": it.seed, **record})
    folder.write_gallery()
    bar.update(len(chunk))
  bar.close()
  log.info("wrote %d videos to %s (gallery: %s)", len(todo), output, os.path.join(output, "index.html"))


def _global(array: np.ndarray, sharding_: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding_, lambda idx: array[idx])
