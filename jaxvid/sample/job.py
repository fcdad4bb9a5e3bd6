"""The sampling job: prompts in, videos out, on every device of every process.

  jaxvid sample --workdir runs/tiny --prompts prompts.jsonl --output out/

config (the run's config.json + overrides) -> mesh -> restored EMA parameters -> the sampler
with classifier-free guidance, on batches sharded over (data, fsdp) -> writer (ID.mp4, ID.json,
manifest.jsonl, index.html).

Items are sampled in chunks (sample/chunks.py: one for most, several for long videos). Each
row of the global batch is a lane that runs its items' chunks one after another, so an item's
next chunk is built from its last one on the process that holds its row; the plan of lanes is
the same pure function of the item list on every process. Each output file is written once,
by the process that holds its row; process 0 then adds the finished items to manifest.jsonl
and the gallery. Items in the manifest are skipped, so rerunning a killed job resumes it.
Each item's noise comes from its own seed (and chunk number), never from its place in a batch.
"""

import hashlib
import heapq
import logging
import os
import time

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxvid import config as config_lib
from jaxvid.data import video_files
from jaxvid.diffusion import conditioning
from jaxvid.diffusion import flow as flow_lib
from jaxvid.diffusion import samplers
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.models import text
from jaxvid.parallel import distributed
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.sample import chunks as chunks_lib
from jaxvid.sample import writer
from jaxvid.sample.items import Item
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import export as export_lib
from jaxvid.train import preemption
from jaxvid.train import state as state_lib

log = logging.getLogger("jaxvid")

GALLERY_EVERY_S = 30.0     # index.html is rewritten at most this often while the job runs, and at the end
_WRITTEN, _FAILED, _CRASHED = 1, 2, 3   # per-row status of a round


def make_generate(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh, rules):
  """Returns generate(params, ae_params, batch) -> uint8 videos [B, T, H, W, C].

  batch: tokens, negative int32 [B, L]; seed, chunk int32 [B]; strength float32 [B];
  known uint8 [B, T, H, W, C] and mask uint8 [B, T, H, W, 1] (1: known). The noise of a row
  is drawn from fold_in(key(seed), chunk) in the latent shape; the row starts at t = strength
  from (1 - strength) encode(known) + strength noise, and known elements are kept as given.
  """
  v = cfg.video
  ae = autoencoder.make(cfg)
  latent_shape = ae.latent_shape(v.frames, v.height, v.width, v.channels)
  flow = flow_lib.Flow.from_config(cfg)
  sampler = samplers.make(cfg.sample.sampler, cfg.sample.steps)
  guidance, interval = cfg.sample.guidance, tuple(cfg.sample.guidance_interval)
  with_mask = cfg.model.condition == "mask"

  def generate(params, ae_params, batch):
    with sharding.activation_rules(mesh, rules):
      model = nnx.merge(graphdef, params)
      keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(batch["seed"], batch["chunk"])
      noise = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)
      x_known = ae.encode(ae_params, batch["known"])
      known_mask = ae.latent_mask(batch["mask"].astype(jnp.float32)) if with_mask else None
      strength = batch["strength"]
      x = flow_lib.interpolate(x_known, noise, strength)
      ts = flow.schedule(sampler.steps, strength)

      def velocity(x, t, text_emb, text_mask):
        if known_mask is None:
          return model(x, t, text_emb, text_mask)
        twice = lambda a: jnp.concatenate([a] * (x.shape[0] // a.shape[0]), 0)   # [cond; uncond]
        mask = twice(known_mask)
        return model(conditioning.apply(x, twice(x_known), mask), t, text_emb, text_mask, mask)

      cond = model.encode_text(batch["tokens"])
      if guidance == 1.0:
        fn = lambda x, t: velocity(x, t, *cond)
      else:
        fn = samplers.guided(velocity, cond, model.encode_text(batch["negative"]), guidance, interval)
      x = sampler.sample(fn, x, ts)
      if known_mask is not None:
        x = conditioning.apply(x, x_known, known_mask)
      return autoencoder.denormalize(ae.decode(ae_params, x))

  return generate


def plan_lanes(counts: list[int], lanes: int) -> list[list[tuple[int, int] | None]]:
  """Rounds of (item, chunk) per lane: items in order go to the lane that frees up first (the
  lowest on ties) and run their chunks there one round after another. None: an idle lane."""
  queues = [[] for _ in range(lanes)]
  free = [(0, j) for j in range(lanes)]          # (chunks queued, lane), a heap
  for i, n in enumerate(counts):
    load, lane = heapq.heappop(free)
    queues[lane].extend((i, c) for c in range(n))
    heapq.heappush(free, (load + n, lane))
  rounds = max(len(q) for q in queues)
  return [[q[r] if r < len(q) else None for q in queues] for r in range(rounds)]


def make_record(cfg: ml_collections.ConfigDict, step: int):
  """Returns record(item, chunks) -> the item's ID.json and manifest line, less "id" and "video"."""
  v = cfg.video
  shared = {**settings(cfg, step), "config_hash": config_lib.config_hash(cfg), "height": v.height,
            "width": v.width, "fps": v.fps}
  return lambda item, chunks: {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
                               "mode": item.mode, "inputs": dict(item.inputs), "frames": item.frames,
                               "chunks": chunks, **shared}


def settings(cfg: ml_collections.ConfigDict, step: int) -> dict:
  """What a video depends on besides its item (prompt, seed, mode, inputs): the checkpoint and
  the sampler's settings, as the records give them."""
  s = cfg.sample
  return {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
          "guidance_interval": list(s.guidance_interval), "checkpoint_step": step,
          "context_frames": chunks_lib.context_frames(cfg), "ema": s.use_ema}


def check_items(cfg: ml_collections.ConfigDict, items: list[Item]) -> None:
  """Stops on items the model cannot make (editing modes need model.condition=mask)."""
  if cfg.model.condition == "mask":
    return
  for it in items:
    if it.mode in ("image-to-video", "extend", "inpaint") or chunks_lib.chunks_of(it, cfg) > 1:
      raise UserError(f"item {it.id!r} ({it.mode}, {it.frames} frames) needs a model trained with "
                      "model.condition=mask; this one has none (text-to-video up to video.frames and restyle only)")


def sample(cfg: ml_collections.ConfigDict, workdir: str, items: list[Item], output: str,
           step: int | None = None) -> None:
  if cfg.model.name != "dit":
    raise UserError(f"{workdir} holds a {cfg.model.name!r} model, not a text-to-video DiT; sample from the run "
                    "trained in its latents (jaxvid train --config configs/tiny.py:latent "
                    "--config.autoencoder.checkpoint=...)")
  config_lib.validate(cfg, jax.device_count())
  check_items(cfg, items)
  writer.check_output(output)
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)

  graphdef, abstract_params = state_lib.abstract_model(cfg)
  shardings = state_lib.param_shardings(abstract_params, mesh, rules)
  params, step = export_lib.load_params(workdir, cfg, ckpt_lib.with_shardings(abstract_params, shardings),
                                        step, "ema" if cfg.sample.use_ema else "params")
  ae = autoencoder.make(cfg)
  autoencoder.check_record(ae, workdir)
  ae_params = ae.load(mesh)

  folder = writer.OutputFolder(output)
  done = folder.done_entries()
  todo = [it for it in items if it.id not in done]
  _warn_changed([it for it in items if it.id in done], done, settings(cfg, step))
  distributed.check_same(hashlib.sha256("\n".join(it.id for it in todo).encode()).hexdigest(),
                         f"processes see different items to sample in {output}; give every process the same "
                         "--prompts file and an --output folder they all see")
  log.info("%d items, %d already done in %s; sampling %d at checkpoint step %d",
           len(items), len(items) - len(todo), output, len(todo), step)
  if not todo:
    if jax.process_index() == 0:
      folder.write_gallery()
    return

  tokenizer = text.make_tokenizer(cfg)
  for it in todo:
    if tokenizer.truncates(it.prompt):
      log.warning("item %s: prompt longer than text.max_len=%d tokens is truncated", it.id, cfg.text.max_len)
  lanes = cfg.sample.batch_size
  lanes += -lanes % (mesh.shape["data"] * mesh.shape["fsdp"])   # whole shards per device
  counts = [chunks_lib.chunks_of(it, cfg) for it in todo]
  rounds = plan_lanes(counts, lanes)
  row_sharding = lambda ndim: mesh_lib.batch_sharding(mesh, rules, ndim)
  v = cfg.video
  shapes = {"tokens": (cfg.text.max_len,), "negative": (cfg.text.max_len,), "seed": (), "chunk": (),
            "strength": (), "known": (v.frames, v.height, v.width, 3), "mask": (v.frames, v.height, v.width, 1)}
  batch_shardings = {k: row_sharding(1 + len(s)) for k, s in shapes.items()}
  generate = jax.jit(make_generate(cfg, graphdef, mesh, rules),
                     in_shardings=(shardings, None, batch_shardings), out_shardings=row_sharding(5))

  record = make_record(cfg, step)
  works: dict[int, chunks_lib.Work] = {}     # this process's items in progress
  failed: set[int] = set()
  finished = failures = 0
  start_time = gallery_time = time.time()
  bar = tqdm.tqdm(total=len(todo), desc="sample", unit="video", dynamic_ncols=True,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} videos "
                             "[{elapsed}<{remaining}{postfix}]", disable=jax.process_index() != 0)
  with preemption.StopRequest("finishing this round of videos, then exiting") as stop:
    for count, lanes_of_round in enumerate(rounds):
      rows = {}   # row -> (known, mask, strength) of the rows this process holds, built once each

      def row_inputs(j):
        if j not in rows:
          rows[j] = _row_inputs(lanes_of_round[j], todo, works, failed, cfg)
        return rows[j]

      batch = _batch(lanes_of_round, todo, tokenizer, row_inputs, shapes, batch_shardings)
      videos = generate(params, ae_params, batch)
      error = None
      try:
        status = _take(videos, lanes_of_round, todo, counts, works, failed,
                       lambda i, frames: folder.write_files(todo[i].id, frames, v.fps, record(todo[i], counts[i])))
      except Exception as e:   # noqa: BLE001 -- stop every process together, not this one alone
        error, status = e, np.full(lanes, _CRASHED, np.int32)
      status = distributed.max_over_processes(status)   # what every process wrote; a barrier
      if error is not None:
        raise error
      if np.any(status == _CRASHED):
        raise RuntimeError("another process of the job stopped with an error (its log says which)")
      written = [e[0] for j, e in enumerate(lanes_of_round) if status[j] == _WRITTEN]
      if jax.process_index() == 0 and written:
        folder.add_to_manifest([(todo[i].id, record(todo[i], counts[i])) for i in written])
        if time.time() - gallery_time > GALLERY_EVERY_S:
          folder.write_gallery()
          gallery_time = time.time()
      failures += int(np.sum(status == _FAILED))
      finished += int(np.sum(status > 0))
      minutes = (time.time() - start_time) / 60
      bar.set_postfix_str(f"{finished / max(minutes, 1e-9):.1f} videos/min", refresh=False)
      bar.update(int(np.sum(status > 0)))
      if count + 1 < len(rounds) and stop.should_stop(count):    # after the last round, it is done
        log.warning("stopped after %d of %d videos: rerun the same command to sample the rest", finished, len(todo))
        break
  bar.close()
  if jax.process_index() == 0:
    folder.write_gallery()
  minutes = (time.time() - start_time) / 60
  log.info("sampled %d videos in %.1f min (%.1f videos/min)%s; %d were already done; gallery: %s",
           finished - failures, minutes, (finished - failures) / max(minutes, 1e-9),
           f", {failures} failed (see above)" if failures else "", len(items) - len(todo),
           os.path.join(output, writer.GALLERY))


def _batch(lanes_of_round: list, todo: list[Item], tokenizer, row_inputs, shapes: dict, shardings: dict) -> dict:
  """The global batch of one round: text and seeds from the item list (every process has it),
  known frames, masks and strengths from `row_inputs(j)` for the rows this process holds."""
  lanes = len(lanes_of_round)
  items = [todo[e[0]] if e else None for e in lanes_of_round]
  host = {"tokens": tokenizer([it.prompt if it else "" for it in items]),
          "negative": tokenizer([it.negative_prompt if it else "" for it in items]),
          "seed": np.array([it.seed if it else 0 for it in items], np.int32),
          "chunk": np.array([e[1] if e else 0 for e in lanes_of_round], np.int32)}
  batch = {k: _global(a, shardings[k]) for k, a in host.items()}
  for k, name in enumerate(("known", "mask", "strength")):
    dtype = np.float32 if name == "strength" else np.uint8
    batch[name] = jax.make_array_from_callback(
        (lanes,) + shapes[name], shardings[name],
        lambda idx, k=k, dtype=dtype: np.stack([np.asarray(row_inputs(j)[k], dtype) for j in range(lanes)[idx[0]]]))
  return batch


def _take(videos: jax.Array, lanes_of_round: list, todo: list[Item], counts: list[int], works: dict, failed: set,
          write) -> np.ndarray:
  """Adds each chunk this process holds to its item's Work; `write(i, frames)` each item whose
  last chunk this is, where this process holds the row's first replica. Returns int32 [lanes]:
  _WRITTEN where an item was written here, _FAILED where it failed here."""
  status = np.zeros(len(lanes_of_round), np.int32)
  seen = set()
  for shard in videos.addressable_shards:
    start = shard.index[0].start or 0
    rows = [j for j in range(start, start + shard.data.shape[0]) if lanes_of_round[j] is not None]
    if all(j in seen for j in rows) and shard.replica_id != 0:
      continue                  # another replica of rows already taken: no copy to the host
    data = np.asarray(shard.data)
    for j in rows:
      i, c = lanes_of_round[j]
      if j not in seen:         # a row held by several devices (replicas) is taken once
        seen.add(j)
        if i not in failed:
          works[i].add(c, data[j - start])
      if c + 1 == counts[i] and shard.replica_id == 0:   # the item's last chunk: written once
        if i not in failed:
          try:
            write(i, works[i].video)
          except (OSError, ValueError) as e:
            log.error("item %s: writing its video failed (%s: %s)", todo[i].id, type(e).__name__, e)
            failed.add(i)
        status[j] = _FAILED if i in failed else _WRITTEN
  for j in seen:
    i, c = lanes_of_round[j]
    if c + 1 == counts[i]:
      works.pop(i, None)
  return status


def _warn_changed(done_items: list[Item], entries: dict, now: dict) -> None:
  """Warns about items kept from an earlier job whose prompt, seed, mode or inputs differ now, and
  about those made at another checkpoint or with other sampler settings (`now`, from `settings`)."""
  changed = [it.id for it in done_items
             if (entries[it.id].get("prompt"), entries[it.id].get("seed"), entries[it.id].get("mode", it.mode),
                 entries[it.id].get("inputs", dict(it.inputs))) != (it.prompt, it.seed, it.mode, dict(it.inputs))]
  kept = "they are kept: delete their manifest lines, or use a new --output, to make them again"
  if changed:
    log.warning("%d items in the manifest were made from another prompt, seed or inputs than the file gives now "
                "(%s); %s", len(changed), _some(changed), kept)
  other = {}   # id -> the first setting that differs, as "key: then -> now"
  for it in done_items:
    entry = entries[it.id]
    for key, value in now.items():
      if key in entry and entry[key] != value:
        other[it.id] = f"{key} {entry[key]} -> {value}"
        break
  if other:
    log.warning("%d items in the manifest were made with other settings (%s: %s); %s", len(other),
                _some(list(other)), next(iter(other.values())), kept)


def _some(ids: list[str]) -> str:
  return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")


def _row_inputs(entry, todo: list[Item], works: dict, failed: set, cfg: ml_collections.ConfigDict):
  """(known, mask, strength) of one row of a round; zeros for an idle lane or a failed item."""
  v = cfg.video
  idle = (np.zeros((v.frames, v.height, v.width, 3), np.uint8), np.zeros((v.frames, v.height, v.width, 1), np.uint8),
          1.0)
  if entry is None:
    return idle
  i, c = entry
  if i in failed:
    return idle
  work = works.setdefault(i, chunks_lib.Work(todo[i], cfg))
  try:
    return work.inputs(c)
  except video_files.BadFile as e:
    log.error("item %s: %s; not sampled", todo[i].id, e)
  except Exception as e:  # noqa: BLE001 -- one item's media, not the job
    log.error("item %s: its inputs failed (%s: %s); not sampled", todo[i].id, type(e).__name__, e)
  failed.add(i)
  return idle


def _global(array: np.ndarray, sharding_) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding_, lambda idx: array[idx])
