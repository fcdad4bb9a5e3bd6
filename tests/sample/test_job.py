"""The sampling job: determinism per seed, the editing modes on the tiny model, the output
folder, resume after a kill, and bad prompt files."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, one_device_env
from jaxvid import cli
from jaxvid.errors import UserError
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.sample import items as items_lib
from jaxvid.sample import job, writer
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import export as export_lib
from jaxvid.train import state as state_lib

T, H, W = 4, 16, 16     # the SMALL config's clips


def _sample(run, out, *args):
  return cli.main(["sample", "--workdir", str(run), "--output", str(out), *args])


@pytest.fixture(scope="module")
def generate(trained_run):
  """generate(rows) -> uint8 [B, T, H, W, 3]; a row: prompt, seed, and optionally chunk,
  strength, known [T, H, W, 3] and mask [T, H, W, 1]."""
  cfg = export_lib.load_run_config(str(trained_run), ["--config.sample.steps=2"])
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)
  graphdef, abstract = state_lib.abstract_model(cfg)
  ckpt = ckpt_lib.Checkpointer(str(trained_run))
  params = ckpt.restore_params(4, ckpt_lib.with_shardings(abstract, state_lib.param_shardings(abstract, mesh, rules)))
  ckpt.close()
  fn = jax.jit(job.make_generate(cfg, graphdef, mesh, rules))
  tok = text.make_tokenizer(cfg)

  def run(rows):
    rows = rows + [rows[-1]] * (-len(rows) % 8)          # whole shards over the 8 devices
    batch = {"tokens": tok([r["prompt"] for r in rows]), "negative": tok([""] * len(rows)),
             "seed": np.array([r["seed"] for r in rows], np.int32),
             "chunk": np.array([r.get("chunk", 0) for r in rows], np.int32),
             "strength": np.array([r.get("strength", 1.0) for r in rows], np.float32),
             "known": np.stack([r.get("known", np.zeros((T, H, W, 3), np.uint8)) for r in rows]),
             "mask": np.stack([r.get("mask", np.zeros((T, H, W, 1), np.uint8)) for r in rows])}
    return np.asarray(fn(params, {}, batch))

  return run


def _clip(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


def test_sampling_is_deterministic_per_seed_and_independent_of_batch_position(generate):
  rows = [{"prompt": p, "seed": s} for p, s in (("a red circle", 1), ("a blue square", 2), ("x", 3), ("y", 4))]
  a, b, c = generate(rows), generate(rows), generate(rows[::-1])
  assert a.shape == (8, T, H, W, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[0], c[3])        # same (prompt, seed) at another batch position
  assert np.any(a[0] != generate([{"prompt": "a red circle", "seed": 5}])[0])          # another seed
  assert np.any(a[0] != generate([{"prompt": "a red circle", "seed": 1, "chunk": 1}])[0])   # another chunk


def test_known_frames_and_pixels_come_out_exactly_as_given(generate):
  clip = _clip()
  first = np.zeros((T, H, W, 1), np.uint8)
  first[0] = 1                                       # image-to-video: frame 0 given
  prefix = np.zeros((T, H, W, 1), np.uint8)
  prefix[:2] = 1                                     # extension: the first 2 frames given
  outside = np.ones((T, H, W, 1), np.uint8)
  outside[:, 4:12, 4:12] = 0                         # in-painting: a box regenerated
  out = generate([{"prompt": "p", "seed": 1, "known": clip, "mask": m} for m in (first, prefix, outside)]
                 + [{"prompt": "p", "seed": 1}])
  np.testing.assert_array_equal(out[0][:1], clip[:1])
  np.testing.assert_array_equal(out[1][:2], clip[:2])
  keep = outside[..., 0] > 0
  np.testing.assert_array_equal(out[2][keep], clip[keep])
  assert np.abs(out[2][~keep].astype(int) - clip[~keep]).mean() > 20       # the box was regenerated
  for k, n in ((0, 1), (1, 2)):
    assert np.abs(out[k][n:].astype(int) - clip[n:]).mean() > 20            # the rest was generated


def test_restyle_strength_limits(generate):
  clip = _clip(1)
  rows = [{"prompt": "p", "seed": 3, "known": clip, "strength": s} for s in (0.0, 1.0, 0.5)]
  out = generate(rows + [{"prompt": "p", "seed": 3}])
  np.testing.assert_array_equal(out[0], clip)       # strength 0 returns the input
  np.testing.assert_array_equal(out[1], out[3])     # strength 1 ignores it: text-to-video, same seed
  near = lambda a, b: np.abs(a.astype(int) - b).mean()
  assert near(out[2], clip) < near(out[1], clip)    # in between: closer to the input than from scratch


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  clip = np.zeros((6, 32, 32, 3), np.uint8)
  clip[..., 1] = 40 + 30 * np.arange(6)[:, None, None]
  writer.write_mp4(root / "clip.mp4", clip, fps=8)
  Image.fromarray(np.full((24, 24, 3), (250, 10, 10), np.uint8)).save(root / "still.png")
  return root


def test_sample_cli_modes_write_the_folder_and_resume(trained_run, inputs, tmp_path, capsys):
  rows = [{"prompt": "a red circle moving left on a gray background", "id": "red", "seed": 3},
          {"prompt": "a <b>blue</b> square moving up", "id": "../../escape"},
          {"prompt": "a green diamond moving down", "negative_prompt": "red"},
          {"prompt": "a long one", "id": "long", "frames": 9},
          {"prompt": "from a still", "id": "i2v", "image": "still.png", "frames": 5},
          {"prompt": "go on", "id": "ext", "video": "clip.mp4", "extend": 3},
          {"prompt": "repaint", "id": "inp", "video": "clip.mp4", "mask": [[4, 4, 12, 12]]},
          {"prompt": "restyle", "id": "rs", "video": "clip.mp4", "strength": 0.5}]
  prompts = inputs / "p.jsonl"
  prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "out"
  assert _sample(trained_run, out, "--prompts", str(prompts), "--config.sample.batch_size=3") == 0
  ids = sorted(f[:-4] for f in os.listdir(out) if f.endswith(".mp4"))
  assert ids == ["00002", "escape", "ext", "i2v", "inp", "long", "red", "rs"]   # nothing written outside `out`
  assert not (tmp_path.parent / "escape.mp4").exists()
  lengths = {"long": 9, "i2v": 5, "ext": 6 + 3}
  for item_id in ids:
    video = writer.read_mp4(out / f"{item_id}.mp4")
    assert video.shape == (lengths.get(item_id, T), H, W, 3), item_id
    record = json.load(open(out / f"{item_id}.json"))
    assert {"prompt", "seed", "sampler", "steps", "guidance", "checkpoint_step", "config_hash", "mode",
            "inputs", "chunks"} <= set(record)
    assert record["checkpoint_step"] == 4
  rec = lambda i: json.load(open(out / f"{i}.json"))
  assert rec("red")["seed"] == 3 and rec("00002")["negative_prompt"] == "red"
  assert (rec("long")["mode"], rec("long")["chunks"]) == ("text-to-video", 4)      # 4 + 3 * (4 - 2) >= 9
  assert (rec("i2v")["mode"], rec("i2v")["inputs"]) == ("image-to-video", {"image": "still.png", "frames": 5})
  assert (rec("ext")["mode"], rec("ext")["inputs"]) == ("extend", {"video": "clip.mp4", "extend": 3})
  assert rec("inp")["mode"] == "inpaint" and rec("rs")["inputs"] == {"video": "clip.mp4", "strength": 0.5}
  # The given frames lead the output (through H.264 twice, hence the tolerance).
  clip = writer.read_mp4(inputs / "clip.mp4")
  small = np.asarray([np.asarray(Image.fromarray(f).resize((W, H), Image.Resampling.BICUBIC)) for f in clip])
  assert np.abs(writer.read_mp4(out / "ext.mp4")[:6].astype(int) - small).mean() < 4
  assert np.abs(writer.read_mp4(out / "i2v.mp4")[0].astype(int) - [250, 10, 10]).mean() < 6
  assert len(open(out / "manifest.jsonl").read().splitlines()) == 8
  page = open(out / "index.html").read()
  assert "&lt;b&gt;blue&lt;/b&gt;" in page and "<b>blue" not in page and page.count("<figure") == 8

  mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".mp4")}
  capsys.readouterr()
  rows[0]["prompt"] = "a changed prompt"
  prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert _sample(trained_run, out, "--prompts", str(prompts)) == 0     # resume: nothing to do
  assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes
  assert len(open(out / "manifest.jsonl").read().splitlines()) == 8
  err = capsys.readouterr().err
  assert "1 items in the manifest were made from another prompt, seed or inputs than the file gives now (red)" in err
  assert "other settings" not in err                    # the batch size does not change a video
  # Another checkpoint (or sampler setting) into the same folder: kept, and said so.
  assert _sample(trained_run, out, "--prompts", str(prompts), "--step", "2") == 0
  assert "8 items in the manifest were made with other settings (" in (err := capsys.readouterr().err), err
  assert ": checkpoint_step 4 -> 2); they are kept" in err, err
  assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes


def test_single_prompt_and_txt_file(trained_run, tmp_path):
  assert _sample(trained_run, tmp_path / "one", "--prompt", "a red circle", "--config.sample.seed=7") == 0
  assert [f for f in os.listdir(tmp_path / "one") if f.endswith(".mp4")] == ["a_red_circle-7.mp4"]
  (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")
  assert _sample(trained_run, tmp_path / "txt", "--prompts", str(tmp_path / "p.txt"), "--step", "2",
                 "--config.sample.sampler=dpm++2m") == 0
  assert sorted(f for f in os.listdir(tmp_path / "txt") if f.endswith(".mp4")) == ["00000.mp4", "00001.mp4"]
  record = json.load(open(tmp_path / "txt" / "00000.json"))
  assert record["checkpoint_step"] == 2 and record["sampler"] == "dpm++2m"


def test_bad_lines_are_skipped_unless_strict(trained_run, tmp_path, capsys):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "ok", "id": "ok"}\n{"prompt": \n{"prompt": "a", "video": "nope.mp4", "extend": 2}\n')
  assert _sample(trained_run, tmp_path / "strict", "--prompts", str(path), "--strict") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"jaxvid: error: {path}:2: not valid JSON (Expecting value) (and 1 more problems); fix the file, "
                 "or drop --strict to skip such lines"]
  assert not (tmp_path / "strict").exists()
  assert _sample(trained_run, tmp_path / "lenient", "--prompts", str(path)) == 0
  err = capsys.readouterr().err
  assert f"{path}:2: not valid JSON" in err and f"{path}:3: item '00002': " in err and "file not found" in err
  assert [f for f in os.listdir(tmp_path / "lenient") if f.endswith(".mp4")] == ["ok.mp4"]


@pytest.mark.parametrize("content, name, words", [
    ("", "p.jsonl", "has no usable prompts"),
    ('{"text": "no prompt key"}\n', "p.jsonl", "has no usable prompts"),
    (None, "missing.jsonl", "prompt file .* not found"),
])
def test_bad_prompt_files(trained_run, tmp_path, capsys, content, name, words):
  path = tmp_path / name
  if content is not None:
    path.write_text(content)
  assert _sample(trained_run, tmp_path / "out", "--prompts", str(path)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert __import__("re").search(words, err[-1]), err
  assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_bad_step_and_empty_prompt(trained_run, tmp_path, capsys):
  assert _sample(trained_run, tmp_path / "o", "--prompt", "x", "--step", "3") == 2
  assert "no checkpoint for --step 3; available: [2, 4]" in capsys.readouterr().err
  assert _sample(trained_run, tmp_path / "o", "--prompt", "  ") == 2
  assert "--prompt is empty" in capsys.readouterr().err


def test_a_runs_recorded_placement_is_not_how_sampling_joins(tmp_path, small_config):
  # Process 0 of a 2-process training job recorded where it sat; sampling the run joins its own
  # job (its environment and its --config.distributed.* overrides).
  from jaxvid import config
  with small_config.unlocked():
    small_config.distributed.update(initialize="on", coordinator="10.0.0.1:1234", num_processes=2, process_id=0)
  (tmp_path / "config.json").write_text(config.to_json(small_config))
  cfg = export_lib.load_run_config(str(tmp_path), ["--config.distributed.num_processes=4", "--config.sample.steps=2"])
  assert (cfg.distributed.initialize, cfg.distributed.coordinator, cfg.distributed.process_id) == ("auto", "", -1)
  assert cfg.distributed.num_processes == 4 and cfg.sample.steps == 2


def test_editing_modes_need_a_model_that_takes_the_mask(small_config):
  cfg = small_config
  with cfg.unlocked():
    cfg.model.condition = "none"
  job.check_items(cfg, [items_lib.Item("a", "p", 0, "", frames=T),
                        items_lib.Item("b", "p", 0, "", "restyle", frames=T, given=T)])     # fine
  for item in (items_lib.Item("c", "p", 0, "", frames=T + 1), items_lib.Item("d", "p", 0, "", "image-to-video", frames=T)):
    with pytest.raises(UserError, match=f"item '{item.id}' .* needs a model trained with model.condition=mask"):
      job.check_items(cfg, [item])


def test_a_killed_job_resumes_and_writes_each_item_once(trained_run, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("".join(f"prompt number {i}\n" for i in range(40)))
  out = tmp_path / "out"
  env = one_device_env()
  cmd = [sys.executable, "-m", "jaxvid", "sample", "--workdir", str(trained_run), "--prompts", str(prompts),
         "--output", str(out), "--config.sample.batch_size=2"]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  manifest = out / "manifest.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if manifest.exists() and len(manifest.read_text().splitlines()) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {json.loads(line)["id"] for line in manifest.read_text().splitlines()}
  assert 4 <= len(before) < 40, len(before)
  mtimes = {i: os.stat(out / f"{i}.mp4").st_mtime_ns for i in before}
  # SIGTERM (a preemption, or Ctrl-C's SIGINT): the round in progress is finished and written, then exit 0.
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while time.time() < deadline and proc.poll() is None:
    if len(manifest.read_text().splitlines()) >= len(before) + 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "received SIGTERM: finishing this round of videos" in err, err
  assert "rerun the same command to sample the rest" in err, err
  stopped = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
  assert len(stopped) < 40 and len(set(stopped)) == len(stopped), len(stopped)
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300).returncode == 0
  ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
  assert sorted(ids) == [f"{i:05d}" for i in range(40)]                # each item once
  assert {i: os.stat(out / f"{i}.mp4").st_mtime_ns for i in before} == mtimes    # finished ones not redone
  assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_a_stop_asked_in_the_last_round_is_a_finished_job(trained_run, tmp_path, capsys, monkeypatch):
  write = writer.OutputFolder.write_files

  def write_then_signal(self, *args, **kwargs):    # SIGTERM while the only round's video is written
    os.kill(os.getpid(), signal.SIGTERM)
    return write(self, *args, **kwargs)

  monkeypatch.setattr(writer.OutputFolder, "write_files", write_then_signal)
  assert _sample(trained_run, tmp_path / "out", "--prompt", "last") == 0
  err = capsys.readouterr().err
  assert "received SIGTERM: finishing this round of videos" in err and "sampled 1 videos" in err, err
  assert "stopped after" not in err and "rerun the same command" not in err, err
  assert [f for f in os.listdir(tmp_path / "out") if f.endswith(".mp4")] == ["last-0.mp4"]


def test_an_item_whose_media_fails_to_decode_is_reported_and_the_rest_are_written(trained_run, tmp_path, capsys):
  # +faststart: the header (moov) comes first, so the file probes as a 4 s clip; its frames are cut off.
  writer.write_mp4(tmp_path / "cut.mp4", np.random.default_rng(0).integers(0, 255, (32, 16, 16, 3), np.uint8), fps=8)
  data = (tmp_path / "cut.mp4").read_bytes()
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
  (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "ok", "id": "ok"}) + "\n"
                                    + json.dumps({"prompt": "cut", "id": "cut", "video": "cut.mp4", "extend": 2}) + "\n")
  assert _sample(trained_run, tmp_path / "out", "--prompts", str(tmp_path / "p.jsonl")) == 0
  err = capsys.readouterr().err
  assert "item cut: truncated or unreadable" in err and "1 failed (see above)" in err, err
  assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".mp4")) == ["ok.mp4"]
  assert [json.loads(line)["id"] for line in open(tmp_path / "out" / "manifest.jsonl")] == ["ok"]
