"""`jaxvid train` end to end on video files (damaged ones included) and on a latent store."""

import json
import os

import numpy as np
import pytest

from conftest import SMALL, TINY, train_small
from jaxvid import cli, config
from jaxvid.data import pipeline
from media import FILES, STARTUP_BAD, media  # noqa: F401

RUN = ["--config.train.steps=3", "--config.train.log_every=1"]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_on_files(media, tmp_path, capsys):
  # Two buckets (two compiles): the square and wide clips as 4x16x16 (11 clips, 2 batches of 8)
  # and the images (1 batch of 32). 3 steps are one epoch, so the damaged cut.mp4 is met and
  # replaced at least once; data/skipped adds those to the entries dropped at startup.
  data = [*FILES[:2], "--config.data.buckets=((4,16,16),(1,16,16))", "--config.data.manifest=" + media.manifest]
  assert train_small(tmp_path / "run", *data, *RUN) == 0
  source = pipeline.make_source(config.load(TINY, SMALL + data + RUN), 0, 1, 8)
  assert [s["video"].shape[:2] for s in source.specs] == [(8, 4), (32, 1)]
  replaced = [int(source.batches[j]["skipped"].sum()) for j in range(3)]
  assert source.skipped_at_start == len(STARTUP_BAD) and sum(replaced) >= 1
  rows = _metrics(tmp_path / "run")
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["data/skipped"] for r in rows] == list(len(STARTUP_BAD) + np.cumsum(replaced))
  assert all(np.isfinite(r["loss"]) for r in rows)
  # One compiled step per bucket.
  err = capsys.readouterr().err
  for shape in ("8 x 4x16x16", "32 x 1x16x16"):
    assert f"compiled the train step for batches of {shape}" in err, err
  saved = config.from_json(open(tmp_path / "run" / "config.json").read())
  assert saved.data.source == "files" and saved.data.buckets == ((4, 16, 16), (1, 16, 16))
  # Three steps a call: the epoch's batches come from both buckets, so they run one by one
  # (the same steps as above); a call's batches are never stacked across buckets.
  assert train_small(tmp_path / "per_call", *data, *RUN, "--config.train.steps_per_call=3",
                     "--config.train.log_every=3") == 0
  (last,) = _metrics(tmp_path / "per_call")
  assert last["step"] == 3 and last["data/skipped"] == rows[-1]["data/skipped"]
  np.testing.assert_allclose(last["loss"], rows[-1]["loss"], rtol=1e-5)


@pytest.mark.slow
def test_train_on_latents(media, tmp_path):
  # One bucket (one compile): the square and wide clips as 4x16x16, images dropped.
  one = ["--config.model.patch=(1,4,4)", "--config.data.buckets=((4,16,16),)"]
  store = tmp_path / "store"
  assert cli.main(["encode", "--config", TINY, *SMALL, *one, "--manifest", media.manifest,
                   "--output", str(store)]) == 0
  assert train_small(tmp_path / "run", *one, "--config.data.source=latents", f"--config.data.store={store}",
                     *RUN) == 0
  rows = _metrics(tmp_path / "run")
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["data/skipped"] for r in rows] == [0, 0, 0]       # a store holds only good samples
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
  saved = config.from_json(open(tmp_path / "run" / "config.json").read())
  assert saved.data.source == "latents" and saved.data.store == str(store)
