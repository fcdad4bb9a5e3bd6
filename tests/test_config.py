"""Config loading, overrides and every bad-config error path."""

import glob
import json
import os

import jax
import pytest

from conftest import REPO, SMALL, TINY
from jaxvid import cli, config
from jaxvid.errors import UserError
from jaxvid.train import state as state_lib

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
VARIANTS = {
    "dit.py": ["S", "B", "L", "XL", "wan1.3B"],
    "vae.py": ["S", "B", "L", "S_images", "S_from_images", "S_decoder"],
    "tiny.py": ["", "latent"],
}


def all_specs():
  for path in CONFIGS:
    for arg in VARIANTS.get(os.path.basename(path), [""]):
      yield f"{path}:{arg}" if arg else path


@pytest.mark.parametrize("spec", list(all_specs()), ids=lambda s: os.path.basename(s))
def test_every_config_resolves_and_builds(spec):
  cfg = config.load(spec)
  # On 8 devices, or as many as the global batch splits over (bench_cpu.py: a batch of 2).
  config.validate(cfg, num_devices=min(8, cfg.train.batch_size), train=True)
  _, abstract = state_lib.abstract_model(cfg)   # shapes only: costs no memory at full size
  assert sum(x.size for x in jax.tree.leaves(abstract)) > 0
  assert config.from_json(config.to_json(cfg)) == cfg


def test_wan_variant_keeps_wans_rope_only_layout():
  assert config.load(os.path.join(REPO, "configs", "dit.py:wan1.3B")).model.pos_embed == "none"
  assert config.load(os.path.join(REPO, "configs", "dit.py:S")).model.pos_embed == "sincos"


def test_overrides_parse_to_field_types():
  cfg = config.load(TINY, ["--config.train.steps=7", "--config.optim.lr=1", "--config.model.qk_norm=false",
                           "--config.model.patch=(1,2,2)", "--config.data.source=synthetic"])
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
  assert cfg.model.qk_norm is False
  assert cfg.model.patch == (1, 2, 2)


@pytest.mark.parametrize("override, words", [
    ("--config.train.stepz=5", "unknown config key 'train.stepz'"),
    ("--config.nope.steps=5", "unknown config key 'nope.steps'"),
    ("--config.train=5", "unknown config key 'train'"),
    ("--config.train.steps=abc", "train.steps=abc: expected int"),
    ("--config.train.steps=1.5", "expected int"),
    ("--config.optim.lr=fast", "expected float"),
    ("--config.model.qk_norm=maybe", "expected true or false"),
    ("--config.model.patch=(1,2.5,2)", "expected a tuple of int"),
    ("--config.train.steps", "has no value"),
])
def test_bad_overrides(override, words):
  with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
    config.load(TINY, [override])


@pytest.mark.parametrize("overrides, words", [
    (["--config.video.frames=5"], "video.frames=5 is not divisible by its patch size 2"),
    (["--config.video.height=30"], "video.height=30 is not divisible"),
    (["--config.model.heads=3"], "model.heads=3 does not divide model.width=128"),
    (["--config.model.heads=64"], "head dim"),
    (["--config.model.dtype=float64"], "model.dtype='float64' must be one of"),
    (["--config.model.remat=some"], "model.remat='some'"),
    (["--config.model.scan_unroll=0"], "model.scan_unroll=0 must be an integer from 1"),
    (["--config.model.pos_embed=learned"], "model.pos_embed='learned' must be"),
    (["--config.text.encoder=t5"], "text.encoder='t5' must be"),
    (["--config.text.vocab=2"], "text.vocab=2 must be at least 3"),
    (["--config.data.prefetch=-1"], "data.workers=0 and data.prefetch=-1 must be >= 0"),
    (["--config.data.workers=-1"], "data.workers=-1 and data.prefetch=2 must be >= 0"),
    (["--config.mesh.data=3"], "mesh .* has 3 devices but 8 are present; set --config.mesh.data=-1 to fill them"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=3"],
     "has 3 devices but 8 are present; set --config.mesh.data=-1 --config.mesh.fsdp=1 to fill them"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one -1"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=3"], "cannot fill 8 devices: 3 does not divide it; set "
                                                        "--config.mesh.data=-1 --config.mesh.fsdp=1 to fill them"),
    (["--config.train.batch_size=12"], "train.batch_size=12 is not divisible by mesh.data"),
    (["--config.mesh.data=4", "--config.mesh.tensor=2", "--config.model.heads=1", "--config.model.width=64"],
     "model.heads=1 is not divisible by mesh.tensor=2"),
    (["--config.data.source=files"], "needs --config.data.manifest"),
    (["--config.data.source=latents"], "needs --config.data.store"),
    (["--config.data.crop=left"], "data.crop='left' must be one of"),
    (["--config.data.buckets=((8,32,30),)"], "width=30 is not divisible by its patch size 4"),
    (["--config.data.buckets=((8,32,32,12),)"], "batch 12 is not divisible by mesh.data"),
    (["--config.data.buckets=((8,32,32),(8,32,32))"], "lists a shape twice"),
    (["--config.data.buckets=(8,32,32)"], "must be .frames, height, width. or"),
    (["--config.autoencoder.name=sdxl"], "autoencoder.name='sdxl' must be one of"),
    (["--config.data.source=youtube"], "must be one of"),
    (["--config.text.drop_rate=1.5"], r"text.drop_rate=1.5 must be in \[0, 1\)"),
    (["--config.train.steps=0"], "train.steps=0 must be at least 1"),
    (["--config.sample.sampler=ddim"], "sample.sampler='ddim' must be one of"),
    (["--config.sample.guidance_interval=(0.8,0.2)"], r"sample.guidance_interval=\(0.8, 0.2\) must be"),
    (["--config.sample.guidance_interval=(0,1,1)"], "must be .lo, hi."),
    (["--config.sample.context_frames=8"], r"sample.context_frames=8 must be in \[0, video.frames=8\)"),
    (["--config.model.condition=image"], "model.condition='image' must be one of"),
    (["--config.cond.none=-1.0"], "cond.* weights"),
    (["--config.cond.none=0", "--config.cond.first_frame=0", "--config.cond.prefix=0", "--config.cond.suffix=0",
      "--config.cond.boxes=0"], "with a positive sum"),
])
def test_validation_errors_name_the_key(overrides, words):
  cfg = config.load(TINY, overrides)
  with pytest.raises(UserError, match=words):
    config.validate(cfg, num_devices=8, train=True)


def test_mesh_minus_one_fills_devices():
  cfg = config.load(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=-1"])
  assert config.mesh_shape(cfg, 8) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}


def test_missing_config_file_and_broken_get_config(tmp_path):
  with pytest.raises(UserError, match="not found"):
    config.load(str(tmp_path / "nope.py"))
  (tmp_path / "bad.py").write_text("def get_config(arg=''):\n  raise ValueError('no such variant ' + arg)\n")
  with pytest.raises(UserError, match="no such variant Q"):
    config.load(f"{tmp_path}/bad.py:Q")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(UserError, match="no get_config"):
    config.load(str(tmp_path / "empty.py"))


def test_dit_variant_unknown_is_one_line_error():
  with pytest.raises(UserError, match="unknown variant"):
    config.load(os.path.join(REPO, "configs", "dit.py") + ":Huge")


def test_model_hash_ignores_how_it_runs_not_what_it_is():
  a = config.load(TINY)
  b = config.load(TINY, ["--config.model.dtype=bfloat16", "--config.train.steps=9", "--config.video.frames=16",
                         "--config.model.scan_unroll=2"])
  c = config.load(TINY, ["--config.model.width=256"])
  assert config.model_hash(a) == config.model_hash(b)
  assert config.model_hash(a) != config.model_hash(c)
  assert "model.width: saved 128, now 256" in config.model_diffs(a, c)


def test_vae_shortcuts_change_the_hash_and_old_vaes_keep_theirs():
  """vae.shortcuts changes the function, so it is part of the hash; off, a VAE keeps the hash it
  had before the key existed (the value pinned here is what jaxvid at 0003899 computed for the
  S VAE of then: widths 32/64/64, no shortcuts)."""
  vae = os.path.join(REPO, "configs", "vae.py") + ":S"
  old_s = ["--config.vae.channels=32", "--config.vae.channel_mult=(1,2,2)"]
  off = config.load(vae, [*old_s, "--config.vae.shortcuts=False"])
  on = config.load(vae, [*old_s, "--config.vae.shortcuts=True"])
  assert config.model_hash(off) == "2fb75a42a57d"
  assert config.model_hash(on) != config.model_hash(off)
  assert "vae.shortcuts: saved False, now True" in config.model_diffs(off, on)


@pytest.mark.parametrize("argv, words", [
    (["train", "--config", TINY, "--workdir", "{w}", "--config.train.stepz=1"], "unknown config key"),
    (["train", "--config", TINY, "--workdir", "{w}", "--config.video.frames=5"], "not divisible"),
    (["train", "--workdir", "{w}"], "the following arguments are required: --config"),
    (["train", "--config", TINY, "--workdir", "{w}", "--bogus"], "unrecognized arguments --bogus"),
    (["sample", "--workdir", "{w}", "--prompt", "x", "--output", "{w}/o"], "config.json not found"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
  argv = [a.replace("{w}", str(tmp_path / "run")) for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxvid: error:") and words in err[0], err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_saved_config_round_trips_json():
  cfg = config.load(TINY, SMALL + ["--config.data.buckets=((4,16,16),(4,16,32,4))"])
  again = config.from_json(config.to_json(cfg))
  assert json.loads(config.to_json(again)) == json.loads(config.to_json(cfg))
