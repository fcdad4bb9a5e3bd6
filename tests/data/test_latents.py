"""The latent store: `jaxvid encode` writes it, data.source=latents reads it back; reruns
write nothing new, complete an interrupted store, and refuse a store of another manifest."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from conftest import SMALL, TINY
from jaxvid import cli, config
from jaxvid.data import latents, pipeline, video_files
from jaxvid.data.manifest import Entry
from jaxvid.errors import UserError
from jaxvid.models import autoencoder, text
from media import BUCKETS, DECODE_BAD, IMAGES, LONG, SQUARE, STARTUP_BAD, WIDE, media  # noqa: F401

SHARDS = 8
MODEL = ["--config.model.patch=(1,4,4)", f"--config.data.buckets={BUCKETS}"]
GOOD = sorted(SQUARE + WIDE + [LONG] + IMAGES)


def encode_cli(manifest, store, *overrides):
  return cli.main(["encode", "--config", TINY, *SMALL, *MODEL, *overrides, "--manifest", manifest,
                   "--output", str(store)])


def encode_cfg(*overrides):
  return config.load(TINY, SMALL + MODEL + list(overrides))


def latents_cfg(store, *overrides):
  return config.load(TINY, SMALL + MODEL + ["--config.data.source=latents", f"--config.data.store={store}",
                                            *overrides])


def _files(store):
  """{relative path: (mtime_ns, size, bytes)} of every file of a store."""
  out = {}
  for folder, _, names in os.walk(store):
    for name in names:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      with open(path, "rb") as f:
        out[os.path.relpath(path, store)] = (stat.st_mtime_ns, stat.st_size, f.read())
  return out


_built = {}


@pytest.fixture(scope="module")
def store(media, tmp_path_factory):
  """The dataset's manifest (damaged files included) encoded once by `jaxvid encode`; do not modify."""
  if "store" not in _built:
    path = tmp_path_factory.mktemp("latents") / "store"
    assert encode_cli(media.manifest, path) == 0
    _built["store"] = str(path)
  return _built["store"]


def _copy(store, tmp_path):
  shutil.copytree(store, tmp_path / "store")
  return str(tmp_path / "store")


def test_store_layout_and_index(store, media):
  meta = latents.read_meta(store)
  assert meta["format"] == latents.FORMAT and meta["autoencoder"] == "identity" and meta["dtype"] == "float16"
  assert meta["text"] == {"encoder": "words", "vocab": 4096, "max_len": 48}
  assert meta["manifest"] == media.manifest
  assert [(b["name"], b["latent_shape"], b["rows"]) for b in meta["buckets"]] == [
      ("4x16x16", [4, 16, 16, 3], len(SQUARE + DECODE_BAD)), ("4x16x24", [4, 16, 24, 3], len(WIDE) + 1),
      ("1x16x16", [1, 16, 16, 3], len(IMAGES))]
  assert os.listdir(os.path.join(store, "index")) == ["part-00000.jsonl"]
  index = latents.read_index(store)
  # Every usable clip once; the damaged ones (probe- or decode-time) not at all.
  assert sorted(os.path.basename(r["path"]) for r in index) == GOOD
  assert [(r["bucket"], r["row"]) for r in index] == sorted((r["bucket"], r["row"]) for r in index)
  for r in index:
    assert r["caption"] == media.caption(os.path.basename(r["path"]))
  long = next(r for r in index if r["path"].endswith(LONG))
  assert long["key"] == media.path(LONG) + "[0.5:2.5]"
  # Rows are ranks in the manifest's usable clips of the bucket: cut.mp4 (last) kept its row 5 empty.
  assert [r["row"] for r in index if r["bucket"] == "4x16x16"] == [0, 1, 2, 3, 4]


def test_training_reads_what_encode_wrote(store, media):
  cfg = latents_cfg(store)
  source = pipeline.make_source(cfg, 0, 1, SHARDS)
  assert source.skipped_at_start == 0
  assert [{k: (v.shape, np.dtype(v.dtype)) for k, v in s.items()} for s in source.specs] == [
      {"latents": ((b, *shape, 3), np.float16), "tokens": ((b, 48), np.int32), "skipped": ((b,), np.int32)}
      for b, shape in ((8, (4, 16, 16)), (8, (4, 16, 24)), (32, (1, 16, 16)))]
  tokenizer = text.make_tokenizer(cfg)
  ae = autoencoder.make(cfg)
  batches = source.batches
  assert batches.plan.batches_per_epoch == 3
  expected = {}     # path -> what the clip should be in latent space
  seen = set()
  for j in range(3):
    batch = batches[j]
    b, items = batches.plan[j]
    bucket = batches.buckets[b]
    assert batch["latents"].shape == (bucket.batch, bucket.frames, bucket.height, bucket.width, 3)
    assert batch["latents"].dtype == np.float16
    np.testing.assert_array_equal(batch["skipped"], 0)
    for k, i in enumerate(items):
      sample = batches.samples[i]
      assert sample["bucket"] == bucket.name
      seen.add(os.path.basename(sample["path"]))
      if sample["path"] not in expected:
        row = next(r for r in media.rows if media.path(r["path"]) == sample["path"])
        entry = Entry(sample["path"], row["caption"], start=row.get("start", 0.0), end=row.get("end", 0.0),
                      fps=row.get("fps", 0.0))
        meta = video_files.probe(entry)
        video = video_files.decode(entry, meta, bucket.frames, bucket.height, bucket.width,
                                   video_files.sample_fps(entry, meta, 0.0, 1))        # center crop
        expected[sample["path"]] = np.asarray(ae.encode({}, video[None]))[0]
      np.testing.assert_allclose(batch["latents"][k].astype(np.float32), expected[sample["path"]],
                                 rtol=0, atol=1e-3, err_msg=f"batch {j} slot {k} {sample['path']}")
      np.testing.assert_array_equal(batch["tokens"][k], tokenizer([sample["caption"]])[0])
  assert seen == set(GOOD)
  # The latents are the normalized pixels: a flat gray frame of LONG is one value.
  long = expected[media.path(LONG)]
  assert np.ptp(long[0]) == 0 and -1 <= long.min() and long.max() <= 1


def test_latent_batches_are_deterministic_and_split_over_processes(store):
  cfg = latents_cfg(store)
  whole = pipeline.make_source(cfg, 0, 1, SHARDS).batches
  again = pipeline.make_source(cfg, 0, 1, SHARDS).batches
  for process_count in (2, 4):
    parts = [pipeline.make_source(cfg, p, process_count, SHARDS).batches for p in range(process_count)]
    for j in range(6):
      want = whole[j]
      for k in want:
        np.testing.assert_array_equal(again[j][k], want[k])
      blocks = [part[j] for part in parts]
      assert [len(b["tokens"]) for b in blocks] == [len(want["tokens"]) // process_count] * process_count
      for k in want:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in blocks]), want[k], err_msg=f"{j} {k}")
  other = pipeline.make_source(latents_cfg(store, "--config.seed=5"), 0, 1, SHARDS).batches
  assert any(other.plan[j][0] != whole.plan[j][0] or not np.array_equal(other.plan[j][1], whole.plan[j][1])
             for j in range(6))


def test_a_second_encode_writes_nothing(store, media, tmp_path):
  path = _copy(store, tmp_path)
  before = _files(path)
  counts = latents.encode(encode_cfg(), media.manifest, path)
  # The 13 usable clips are present; the 5 probe-time and the 1 decode-time failures are skipped again.
  assert counts == {"written": 0, "present": len(GOOD), "skipped": len(STARTUP_BAD) + len(DECODE_BAD)}
  assert _files(path) == before               # not a byte or a modification time changed
  assert encode_cli(media.manifest, path) == 0
  assert _files(path) == before


def test_an_interrupted_store_is_completed_by_a_rerun(store, media, tmp_path, caplog):
  path = _copy(store, tmp_path)
  part = os.path.join(path, "index", "part-00000.jsonl")
  with open(part) as f:
    lines = f.readlines()
  assert len(lines) == len(GOOD)
  dropped = [1, 6, 11]                        # one sample of each bucket (images come last)
  with open(part, "w") as f:
    f.writelines(line for i, line in enumerate(lines) if i not in dropped)
  # ... and their arrays were not written either (a kill before the chunks reached the disk).
  for i in dropped:
    row = json.loads(lines[i])
    for name in ("latents", "tokens"):
      folder = os.path.join(path, row["bucket"], name)
      [chunk] = [c for c in os.listdir(folder) if c.split(".")[0] == str(row["row"])]
      os.remove(os.path.join(folder, chunk))
  assert len(latents.read_index(path)) == len(GOOD) - 3
  with pytest.raises(AssertionError):
    _assert_same_store(path, store)
  # Training from it says how much of the manifest it has (rows: the clips that passed probing).
  with caplog.at_level(logging.INFO, logger="jaxvid"):
    pipeline.make_source(latents_cfg(path), 0, 1, SHARDS)
  rows = len(GOOD) + len(DECODE_BAD)
  assert f"holds {len(GOOD) - 3} of the {rows} clips its manifest gave" in caplog.text
  counts = latents.encode(encode_cfg(), media.manifest, path)
  assert counts == {"written": 3, "present": len(GOOD) - 3, "skipped": len(STARTUP_BAD) + len(DECODE_BAD)}
  _assert_same_store(path, store)


def test_a_rerun_after_a_line_cut_short_completes_the_store(store, media, tmp_path):
  # A process killed while writing the index leaves half a line at its end: that sample is redone,
  # and the lines the rerun appends must not be glued to the broken one.
  path = _copy(store, tmp_path)
  part = os.path.join(path, "index", "part-00000.jsonl")
  with open(part) as f:
    lines = f.readlines()
  with open(part, "w") as f:
    f.writelines(lines[:-2] + [lines[-2][:40]])
  assert len(latents.read_index(path)) == len(GOOD) - 2
  assert latents.encode(encode_cfg(), media.manifest, path)["written"] == 2
  assert len(latents.read_index(path)) == len(GOOD)
  _assert_same_store(path, store)
  assert latents.encode(encode_cfg(), media.manifest, path)["written"] == 0


def _assert_same_store(a, b):
  """Same index rows and the same latents and tokens for each of them."""
  index_a, index_b = latents.read_index(a), latents.read_index(b)
  assert index_a == index_b
  source_a = pipeline.make_source(latents_cfg(a), 0, 1, SHARDS).batches
  source_b = pipeline.make_source(latents_cfg(b), 0, 1, SHARDS).batches
  for j in range(3):
    for k in ("latents", "tokens"):
      np.testing.assert_array_equal(source_a[j][k], source_b[j][k])


def test_a_store_of_another_manifest_is_refused_and_untouched(store, media, tmp_path, capsys):
  path = _copy(store, tmp_path)
  before = _files(path)
  capsys.readouterr()
  assert encode_cli(media.good, path) == 2
  err = capsys.readouterr().err
  assert "was encoded with another manifest_hash" in err and len(err.strip().splitlines()) == 1, err
  assert _files(path) == before
  # Other buckets, another dtype or other text settings are refused the same way.
  for overrides, key in ((["--config.data.buckets=((4,16,16),(1,16,16))"], "manifest_hash"),
                         (["--config.encode.dtype=float32"], "dtype"),
                         (["--config.text.max_len=32"], "text")):
    assert encode_cli(media.manifest, path, *overrides) == 2
    assert f"was encoded with another {key}" in capsys.readouterr().err
  assert _files(path) == before


def test_encode_user_errors(media, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  startup_bad = tmp_path / "bad.jsonl"
  startup_bad.write_text("".join(json.dumps({"path": media.path(n), "caption": n}) + "\n" for n in STARTUP_BAD))
  for manifest, output, words in ((media.manifest, tmp_path / "file", "exists and is not a folder"),
                                  (media.manifest, tmp_path / "busy", "exists and is not a latent store"),
                                  (str(startup_bad), tmp_path / "new", "has no usable clip"),
                                  (str(tmp_path / "nope.jsonl"), tmp_path / "new", "not found")):
    capsys.readouterr()
    assert encode_cli(manifest, output) == 2
    assert words in capsys.readouterr().err
  assert not (tmp_path / "new").exists()
  assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_training_config_must_fit_the_store(store):
  with pytest.raises(UserError, match="tokenized with text"):
    pipeline.make_source(latents_cfg(store, "--config.text.max_len=32"), 0, 1, SHARDS)
  with pytest.raises(UserError, match="has bucket 1x16x16, which data.buckets does not list"):
    pipeline.make_source(latents_cfg(store, "--config.data.buckets=((4,16,16),(4,16,24))"), 0, 1, SHARDS)
  with pytest.raises(UserError, match="latent channels"):
    pipeline.make_source(latents_cfg(store, "--config.video.channels=4"), 0, 1, SHARDS)
  with pytest.raises(UserError, match="is not a latent store"):
    pipeline.make_source(latents_cfg(os.path.dirname(store)), 0, 1, SHARDS)
  # Explicit batch sizes of the training config apply to the store's buckets.
  source = pipeline.make_source(latents_cfg(store, "--config.data.buckets=((4,16,16,16),(4,16,24,8),(1,16,16,8))"),
                                0, 1, SHARDS)
  assert [s["latents"].shape[0] for s in source.specs] == [16, 8, 8]
