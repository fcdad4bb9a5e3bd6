"""Video files and the latent cache in a real two-process JAX job (launch/local.sh, gloo over
127.0.0.1): each process encodes its own share of the store, and loads its own block of each
batch of files, and training equals one process."""

import json
import os
import shutil

import imageio.v3 as iio
import pytest

from conftest import SMALL, TINY, run_local, train_small
from jaxvid.data import latents, synthetic

pytestmark = pytest.mark.multiprocess

DATA = ["--config.data.buckets=((4,16,16,8),(4,16,24,8))", "--config.data.fps=8.0", "--config.data.crop=center"]
RUN = SMALL + DATA + ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.log_every=1"]


def _manifest(folder):
  rows = []
  for i in range(10):
    scene = synthetic.make_scene(3, i)
    width = 24 if i % 2 else 16
    iio.imwrite(folder / f"{i}.mp4", synthetic.render(scene, 8, 16, width), fps=8, codec="libx264",
                macro_block_size=1)
    rows.append({"path": f"{i}.mp4", "caption": scene.caption})
  rows.append({"path": "gone.mp4", "caption": "a missing file"})
  (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  return str(folder / "m.jsonl")


def _local(tmp_path, name, *args):
  rc, out, other = run_local(2, 2, list(args), tmp_path / f"logs-{name}")
  assert rc == 0, out + other
  return out, other


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_encode_a_latent_store(tmp_path):
  # (Reading the latent store per process is checked in-process: tests/data/test_latents.py.)
  manifest = _manifest(tmp_path)
  # Encode with two processes: each writes its own share and index part; together, every clip.
  store = tmp_path / "store"
  out0, out1 = _local(tmp_path, "encode", "encode", "--config", TINY, *SMALL, *DATA, "--manifest", manifest,
                      "--output", str(store))
  assert "encode: 5 clips written" in out0 and "encode: 5 clips written" in out1
  assert sorted(os.listdir(store / "index")) == ["part-00000.jsonl", "part-00001.jsonl"]
  index = latents.read_index(str(store))
  assert sorted(r["path"] for r in index) == sorted(str(tmp_path / f"{i}.mp4") for i in range(10))


def test_two_processes_train_on_files_like_one(tmp_path):
  manifest = _manifest(tmp_path)
  # A hybrid mesh: the data axis spans the two processes (as it would span two hosts over DCN).
  hybrid = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"]
  files = ["--config.data.source=files", f"--config.data.manifest={manifest}"]
  workdir = tmp_path / "mp_files"
  out0, out1 = _local(tmp_path, "files", "train", "--config", TINY, "--workdir", str(workdir), *RUN, *files, *hybrid)
  assert "process 0 of 2 (2 local devices, 4 in all)" in out0 and "process 1 of 2" in out1
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1, 'sequence': 1}" in out0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  # One process (8 devices, data-parallel): same global batches, same losses (up to sums in another order).
  assert train_small(tmp_path / "one_files", *RUN[len(SMALL):], *files) == 0
  two, one = _metrics(workdir), _metrics(tmp_path / "one_files")
  assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
  assert [r["data/skipped"] for r in two] == [r["data/skipped"] for r in one] == [1, 1, 1, 1]   # gone.mp4
  # The two processes' checkpoint of step 2, resumed by one process: the same data position
  # (restarting the data would give steps 3 and 4 other batches, and other losses).
  resumed = tmp_path / "resumed_by_one"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  assert sorted(os.listdir(resumed / "checkpoints" / "2" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert train_small(resumed, *RUN[len(SMALL):], *files) == 0
  assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3, 4]
  assert [r["loss"] for r in _metrics(resumed)] == pytest.approx([r["loss"] for r in one], rel=1e-5)
