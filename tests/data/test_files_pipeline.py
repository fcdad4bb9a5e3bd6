"""data.source=files through jaxvid.data.pipeline: per-bucket batch shapes, a deterministic
order, per-process blocks, the iterator's checkpointable state, and skipping bad files."""

import json
import os

import numpy as np
import pytest

from jaxvid.data import pipeline, video_files
from jaxvid.errors import UserError
from jaxvid.models import text
from media import DECODE_BAD, IMAGES, LONG, RAMP, SQUARE, STARTUP_BAD, WIDE, files_config, media  # noqa: F401

SHARDS = 8        # mesh.data * mesh.fsdp of the 8 simulated devices


def _name(clip):
  return os.path.basename(clip.entry.path)


def _assert_same_batch(a, b, context=""):
  assert sorted(a) == sorted(b), context
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (context, k)
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{context} {k}")


def _shape_of(spec):
  return {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()}


def test_specs_follow_the_buckets_and_the_batch_shards(media):
  cfg = files_config(media.manifest)
  # The token budget (8 clips of 4x16x16 = 512 tokens at patch 1x4x4) per bucket; with 8 shards
  # each batch is a multiple of 8.
  for shards, wide in ((1, 5), (2, 4), (SHARDS, 8)):
    source = pipeline.make_source(cfg, 0, 1, shards)
    assert [_shape_of(s) for s in source.specs] == [
        {"video": ((b, t, h, w, 3), np.uint8), "tokens": ((b, 48), np.int32), "skipped": ((b,), np.int32)}
        for b, t, h, w in ((8, 4, 16, 16), (wide, 4, 16, 24), (32, 1, 16, 16))]
  # Buckets no clip falls in have no spec (nothing to compile for them).
  cfg = files_config(media.good, "--config.data.buckets=((4,16,16),(4,32,16),(4,16,24),(1,16,16),(1,16,24))")
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  assert [s["video"].shape[1:4] for s in source.specs] == [(4, 16, 16), (4, 16, 24), (1, 16, 16), (1, 16, 24)]
  assert sorted(_name(c) for c in source.batches.clips if c.bucket == 4) == ["im1.png"]


def test_clips_go_to_their_buckets(media):
  source = pipeline.make_source(files_config(media.manifest), 0, 1, SHARDS)
  by_bucket = [sorted(_name(c) for c in source.batches.clips if c.bucket == b) for b in range(3)]
  assert by_bucket == [sorted(SQUARE + DECODE_BAD), sorted(WIDE + [LONG]), sorted(IMAGES)]
  long = next(c for c in source.batches.clips if _name(c) == LONG)
  assert (long.entry.start, long.entry.end, long.rate) == (0.5, 2.5, 8.0)     # from the manifest row
  assert {c.rate for c in source.batches.clips if _name(c) in SQUARE[:4] + WIDE} == {8.0}
  # data.fps applies to the clips whose row has no fps of its own.
  source = pipeline.make_source(files_config(media.good, "--config.data.fps=4.0"), 0, 1, SHARDS)
  assert {_name(c): c.rate for c in source.batches.clips if c.bucket < 2}[LONG] == 8.0
  assert {c.rate for c in source.batches.clips if c.bucket < 2 and _name(c) != LONG} == {4.0}


def test_each_batch_is_one_bucket_of_the_planned_clips(media):
  cfg = files_config(media.good, "--config.data.crop=center")
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  assert source.skipped_at_start == 0
  specs = {s["video"].shape: _shape_of(s) for s in source.specs}
  tokenizer = text.make_tokenizer(cfg)
  batches = source.batches
  assert batches.plan.batches_per_epoch == 3
  seen = set()
  for j in range(3):
    batch = batches[j]
    assert _shape_of(batch) == specs[batch["video"].shape]        # exactly one bucket's static shape
    seen.add(batch["video"].shape)
    b, items = batches.plan[j]
    clips = [batches.clips[i] for i in items]
    assert {c.bucket for c in clips} == {b}
    np.testing.assert_array_equal(batch["tokens"], tokenizer([c.entry.caption for c in clips]))
    np.testing.assert_array_equal(batch["skipped"], 0)
    bucket = batches.buckets[b]
    for k, c in enumerate(clips):   # center crop, centered in time: decode gives the same pixels
      want = video_files.decode(c.entry, c.meta, bucket.frames, bucket.height, bucket.width, c.rate)
      np.testing.assert_array_equal(batch["video"][k], want, err_msg=f"batch {j} slot {k} {_name(c)}")
  assert seen == set(specs)


def test_the_long_clip_is_its_window_at_its_fps(media):
  # LONG's row: 0.5 s .. 2.5 s at 8 fps; source frame i (16 fps) is a flat gray of media.RAMP[i].
  source = pipeline.make_source(files_config(media.good, "--config.data.crop=center"), 0, 1, SHARDS)
  batches = source.batches
  j = next(j for j in range(3) if any(_name(batches.clips[i]) == LONG for i in batches.plan[j][1]))
  batch = batches[j]
  k = [_name(batches.clips[i]) for i in batches.plan[j][1]].index(LONG)
  # 16 frames at 8 fps, 4 taken from the middle of the slack: frames 10..13 at 8 fps from 0.5 s
  # = source frames 8 + 2 * (6..9) = 20, 22, 24, 26.
  np.testing.assert_allclose(batch["video"][k].reshape(4, -1).mean(1), RAMP[20:28:2], atol=3)


def test_same_config_same_batches_other_seed_other_order(media):
  cfg = files_config(media.manifest)        # random crops and offsets, and the damaged files
  a = pipeline.make_source(cfg, 0, 1, SHARDS).batches
  b = pipeline.make_source(cfg, 0, 1, SHARDS).batches
  for j in (0, 1, 2):
    _assert_same_batch(a[j], b[j], f"batch {j}")
  other = pipeline.make_source(files_config(media.manifest, "--config.seed=1"), 0, 1, SHARDS).batches
  plan = lambda s, j: (s.plan[j][0], s.plan[j][1].tolist())
  assert [plan(a, j) for j in range(6)] != [plan(other, j) for j in range(6)]
  j = next(j for j in range(6) if plan(other, j)[0] == plan(a, 0)[0])
  assert not np.array_equal(other[j]["video"], a[0]["video"])
  # Random crops differ from the center crops of the same plan; the captions do not.
  center = pipeline.make_source(files_config(media.manifest, "--config.data.crop=center"), 0, 1, SHARDS).batches
  j = next(j for j in range(3) if a.plan[j][0] == 0)
  assert not np.array_equal(center[j]["video"], a[j]["video"])
  kept = (center[j]["skipped"] == 0) & (a[j]["skipped"] == 0)      # refills may pick other clips
  assert kept.sum() >= 6
  np.testing.assert_array_equal(center[j]["tokens"][kept], a[j]["tokens"][kept])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_blocks_make_up_the_global_batch(media, process_count):
  cfg = files_config(media.manifest)
  whole = pipeline.make_source(cfg, 0, 1, SHARDS)
  parts = [pipeline.make_source(cfg, p, process_count, SHARDS) for p in range(process_count)]
  for part in parts:
    assert [_shape_of(s) for s in part.specs] == [_shape_of(s) for s in whole.specs]    # global shapes
    assert part.skipped_at_start == whole.skipped_at_start
  skipped = 0
  for j in range(3):      # one epoch: every bucket, and the damaged clip refilled
    want = whole.batches[j]
    skipped += int(want["skipped"].sum())
    blocks = [part.batches[j] for part in parts]
    size = len(want["video"])
    assert [len(b["video"]) for b in blocks] == [size // process_count] * process_count
    for p, block in enumerate(blocks):
      for q in range(p):
        assert not np.array_equal(block["video"], blocks[q]["video"]), (j, p, q)
    joined = {k: np.concatenate([b[k] for b in blocks]) for k in want}
    _assert_same_batch(joined, want, f"batch {j}, {process_count} processes")
  assert skipped >= 1     # the refill was exercised


@pytest.mark.parametrize("threads", [1, 3])
def test_iterator_state_restores_the_next_batch(media, threads):
  # Read threads decode batches in parallel; the order and the checkpointed state stay the same.
  cfg = files_config(media.manifest, f"--config.data.threads={threads}")
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  it = iter(pipeline.make_dataset(source.batches, cfg))
  for j in range(2):
    _assert_same_batch(next(it), source.batches[j], f"batch {j}")
  state = it.get_state()
  json.dumps(state)                 # a checkpoint stores it as JSON
  want = next(it)
  _assert_same_batch(want, source.batches[2], "batch 2")
  fresh = iter(pipeline.make_dataset(pipeline.make_source(cfg, 0, 1, SHARDS).batches, cfg))
  fresh.set_state(state)
  _assert_same_batch(next(fresh), want, "restored batch 2")
  _assert_same_batch(next(fresh), source.batches[3], "restored batch 3")


def test_iterator_state_with_a_worker_process(media):
  # grain's workers read absl flags, which `jaxvid` marks parsed (cli._setup_logging); so here.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  cfg = files_config(media.manifest, "--config.data.workers=1")
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  it = iter(pipeline.make_dataset(source.batches, cfg))
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  want = next(it)
  for j, batch in enumerate(first + [want]):
    _assert_same_batch(batch, source.batches[j], f"batch {j}")
  fresh = iter(pipeline.make_dataset(pipeline.make_source(cfg, 0, 1, SHARDS).batches, cfg))
  fresh.set_state(state)
  _assert_same_batch(next(fresh), want, "restored batch 2")


def test_bad_files_are_skipped_and_counted(media):
  cfg = files_config(media.manifest, "--config.data.crop=center")
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  batches = source.batches
  # Probed at startup: every entry that is not a usable clip is dropped and counted.
  assert source.skipped_at_start == len(STARTUP_BAD) == 5
  assert sorted(_name(c) for c in batches.clips) == sorted(SQUARE + WIDE + [LONG] + IMAGES + DECODE_BAD)
  # At decode time: the slot planned for cut.mp4 is refilled from its bucket and counted there.
  tokenizer = text.make_tokenizer(cfg)
  refilled = skipped = 0
  for j in range(2 * batches.plan.batches_per_epoch):
    batch = batches[j]
    skipped += int(batch["skipped"].sum())
    b, items = batches.plan[j]
    assert batch["video"].shape[0] == batches.buckets[b].batch          # still full
    planned = [_name(batches.clips[i]) for i in items]
    for k, name in enumerate(planned):
      if name not in DECODE_BAD:
        assert batch["skipped"][k] == 0
        continue
      refilled += 1
      assert batch["skipped"][k] >= 1
      # The slot holds another clip of the square bucket, whole, with its own caption.
      matches = [n for n in SQUARE if np.array_equal(
          batch["video"][k], video_files.decode(*_clip_args(batches, n)))]
      assert len(matches) == 1, (j, k)
      np.testing.assert_array_equal(batch["tokens"][k], tokenizer([media.caption(matches[0])])[0])
  assert refilled >= 2                                                    # once an epoch at least
  assert skipped >= refilled          # more than once where a refill picked cut.mp4 again


def _clip_args(batches, name):
  clip = next(c for c in batches.clips if _name(c) == name)
  bucket = batches.buckets[clip.bucket]
  return clip.entry, clip.meta, bucket.frames, bucket.height, bucket.width, clip.rate


def test_manifest_without_a_usable_entry_is_a_user_error(media):
  startup_bad = _write(media, "startup_bad.jsonl", [r for r in media.rows if r["path"] in STARTUP_BAD] +
                       [{"path": "missing.png", "caption": "a missing image"}])
  with pytest.raises(UserError, match=r"has no usable clip: all 6 entries were skipped"):
    pipeline.make_source(files_config(startup_bad), 0, 1, SHARDS)
  # Images alone without a one-frame bucket: no usable entry either.
  images = _write(media, "images.jsonl", [r for r in media.rows if r["path"] in IMAGES])
  with pytest.raises(UserError, match="all 3 entries were skipped"):
    pipeline.make_source(files_config(images, "--config.data.buckets=((4,16,16),(4,16,24))"), 0, 1, SHARDS)


def _write(media, name, rows):
  path = os.path.join(media.root, name)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def test_a_bucket_of_only_undecodable_clips_stops_with_a_clear_error(media):
  # cut.mp4 probes fine, so the source starts; but no clip of its bucket ever decodes.
  only_cut = _write(media, "only_cut.jsonl", [r for r in media.rows if r["path"] in DECODE_BAD])
  source = pipeline.make_source(files_config(only_cut), 0, 1, SHARDS)
  assert source.skipped_at_start == 0 and len(source.specs) == 1
  with pytest.raises(UserError, match="bucket 4x16x16: 64 unreadable clips in a row"):
    source.batches[0]


def test_files_source_needs_rgb_and_a_manifest(media):
  with pytest.raises(UserError, match="video.channels=3"):
    pipeline.make_source(files_config(media.good, "--config.video.channels=4"), 0, 1, SHARDS)
  with pytest.raises(UserError, match="needs a manifest"):
    pipeline.make_source(files_config(""), 0, 1, SHARDS)
  with pytest.raises(UserError, match="not found"):
    pipeline.make_source(files_config(os.path.join(media.root, "nope.csv")), 0, 1, SHARDS)


def test_manifest_sizes_skip_the_probe_but_not_the_frame_rate(media):
  # width/height/duration in the rows: with a sampling rate known (data.fps), nothing is probed,
  # so a missing file is only found when decoded; without one the native rate must be read.
  rows = [{"path": n, "caption": media.caption(n), "width": 32, "height": 32, "duration": 2.0}
          for n in SQUARE[:3]]
  rows.append({"path": "ghost.mp4", "caption": "listed with its sizes, never written",
               "width": 32, "height": 32, "duration": 2.0})
  path = _write(media, "sized.jsonl", rows)
  source = pipeline.make_source(files_config(path, "--config.data.fps=8.0"), 0, 1, SHARDS)
  assert source.skipped_at_start == 0
  assert [(_name(c), c.meta.fps, c.rate) for c in source.batches.clips] == [
      (n, 0.0, 8.0) for n in SQUARE[:3] + ["ghost.mp4"]]
  batch = source.batches[0]
  assert batch["video"].shape == (8, 4, 16, 16, 3)
  ghosts = [_name(source.batches.clips[i]) == "ghost.mp4" for i in source.batches.plan[0][1]]
  assert (batch["skipped"] > 0).tolist() == ghosts and any(ghosts)
  # data.fps=0 (native rate): the videos are probed for it; the missing one is dropped at startup.
  source = pipeline.make_source(files_config(path), 0, 1, SHARDS)
  assert source.skipped_at_start == 1
  assert [(_name(c), c.meta.fps, c.rate) for c in source.batches.clips] == [(n, 8.0, 8.0) for n in SQUARE[:3]]
