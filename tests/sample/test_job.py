"""The sampling job: determinism per seed, the output folder, resume, and bad prompt files."""

import json
import os

import jax
import numpy as np
import pytest

from jaxvid import cli
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.sample import job, writer
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import state as state_lib


def _sample(run, out, *args):
  return cli.main(["sample", "--workdir", str(run), "--output", str(out), *args])


@pytest.fixture(scope="module")
def generate(trained_run):
  cfg = job.load_run_config(str(trained_run), ["--config.sample.steps=2"])
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)
  graphdef, abstract = state_lib.abstract_model(cfg)
  ckpt = ckpt_lib.Checkpointer(str(trained_run))
  params = ckpt.restore_params(4, ckpt_lib.with_shardings(abstract, state_lib.param_shardings(abstract, mesh, rules)))
  ckpt.close()
  fn = jax.jit(job.make_generate(cfg, graphdef, mesh, rules))
  tok = text.make_tokenizer(cfg)

  def run(prompts, seeds):
    return np.asarray(fn(params, tok(prompts), tok([""] * len(prompts)), np.array(seeds, np.int32)))

  return run


def test_sampling_is_deterministic_per_seed_and_independent_of_batch_position(generate):
  a = generate(["a red circle", "a blue square", "x", "y"], [1, 2, 3, 4])
  b = generate(["a red circle", "a blue square", "x", "y"], [1, 2, 3, 4])
  c = generate(["y", "x", "a blue square", "a red circle"], [4, 3, 2, 1])
  assert a.shape == (4, 4, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[0], c[3])        # same (prompt, seed) at another batch position
  assert np.any(a[0] != generate(["a red circle"] * 4, [5, 5, 5, 5])[0])   # another seed, another video


def test_sample_cli_writes_the_folder_and_resumes(trained_run, tmp_path):
  prompts = tmp_path / "p.jsonl"
  rows = [{"prompt": "a red circle moving left on a gray background", "id": "red", "seed": 3},
          {"prompt": "a <b>blue</b> square moving up", "id": "../../escape"},
          {"prompt": "a green diamond moving down", "negative_prompt": "red"}]
  prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "out"
  assert _sample(trained_run, out, "--prompts", str(prompts)) == 0
  ids = sorted(f[:-4] for f in os.listdir(out) if f.endswith(".mp4"))
  assert ids == ["00002", "escape", "red"]            # ids sanitized: nothing written outside `out`
  assert not (tmp_path.parent / "escape.mp4").exists()
  for item_id in ids:
    video = writer.read_mp4(out / f"{item_id}.mp4")
    assert video.shape == (4, 16, 16, 3)
    record = json.load(open(out / f"{item_id}.json"))
    assert {"prompt", "seed", "sampler", "steps", "guidance", "checkpoint_step", "config_hash", "mode"} <= set(record)
    assert record["checkpoint_step"] == 4
  assert json.load(open(out / "red.json"))["seed"] == 3
  assert json.load(open(out / "00002.json"))["negative_prompt"] == "red"
  assert len(open(out / "manifest.jsonl").read().splitlines()) == 3
  page = open(out / "index.html").read()
  assert "&lt;b&gt;blue&lt;/b&gt;" in page and "<b>blue" not in page

  mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".mp4")}
  assert _sample(trained_run, out, "--prompts", str(prompts)) == 0     # resume: nothing to do
  assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes
  assert len(open(out / "manifest.jsonl").read().splitlines()) == 3


def test_single_prompt_and_txt_file(trained_run, tmp_path):
  assert _sample(trained_run, tmp_path / "one", "--prompt", "a red circle", "--config.sample.seed=7") == 0
  assert [f for f in os.listdir(tmp_path / "one") if f.endswith(".mp4")] == ["a_red_circle-7.mp4"]
  (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")
  assert _sample(trained_run, tmp_path / "txt", "--prompts", str(tmp_path / "p.txt"), "--step", "2") == 0
  assert sorted(f for f in os.listdir(tmp_path / "txt") if f.endswith(".mp4")) == ["00000.mp4", "00001.mp4"]
  assert json.load(open(tmp_path / "txt" / "00000.json"))["checkpoint_step"] == 2


@pytest.mark.parametrize("content, name, words", [
    ("", "p.jsonl", "has no prompts"),
    ('{"prompt": "ok"}\n{"prompt": \n', "p.jsonl", "p.jsonl:2: not valid JSON"),
    ('{"text": "no prompt key"}\n', "p.jsonl", 'p.jsonl:1: each line needs a "prompt" string'),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "p.jsonl", "id 'x' appears twice"),
    ('{"prompt": "a", "seed": "one"}\n', "p.jsonl", "non-integer seed"),
    (None, "missing.jsonl", "prompt file .* not found"),
])
def test_bad_prompt_files(trained_run, tmp_path, capsys, content, name, words):
  path = tmp_path / name
  if content is not None:
    path.write_text(content)
  assert _sample(trained_run, tmp_path / "out", "--prompts", str(path)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and __import__("re").search(words, err[0]), err
  assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_bad_step_and_empty_prompt(trained_run, tmp_path, capsys):
  assert _sample(trained_run, tmp_path / "o", "--prompt", "x", "--step", "3") == 2
  assert "no checkpoint for --step 3; available: [2, 4]" in capsys.readouterr().err
  assert _sample(trained_run, tmp_path / "o", "--prompt", "  ") == 2
  assert "--prompt is empty" in capsys.readouterr().err
