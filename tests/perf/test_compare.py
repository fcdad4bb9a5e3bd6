"""`jaxvid bench --baseline`: a result set beside an earlier one, and a regression failing the
command (jaxvid/perf/compare.py)."""

import json

import pytest

from conftest import SMALL, TINY
from jaxvid import cli
from jaxvid.errors import UserError
from jaxvid.perf import bench
from jaxvid.perf import compare


def _result(**changes):
  r = {"train_step_s": 2.0, "forward_s": 0.5, "peak_memory_bytes": 2 ** 30, "compile_s": 10.0,
       "forward_compile_s": 4.0, "peak_flops": 3e11, "mfu": 0.6, "forward_mfu": 0.7, "device": "2 x cpu (cpu)",
       "jax": "0.10.2", "params": 1000, "flops_per_step": 1e12,
       "config": {"attention": "auto", "width": 384, "mesh": {"data": 2}}}
  return {**r, **changes}


def test_a_slower_step_beyond_the_tolerance_regresses_and_a_faster_one_does_not():
  base = _result()
  c = compare.compare(base, _result(train_step_s=2.3, forward_s=0.45), tolerance=0.1)
  assert c["regressed"] == ["train_step_s"]
  assert c["metrics"]["train_step_s"]["change"] == pytest.approx(0.15)
  assert c["metrics"]["forward_s"]["change"] == pytest.approx(-0.1)
  assert compare.compare(base, _result(train_step_s=2.19), 0.1)["regressed"] == []
  assert compare.compare(base, _result(train_step_s=2.19), 0.05)["regressed"] == ["train_step_s"]
  # More memory is a regression too; the machine's peak and the MFU are only shown.
  c = compare.compare(base, _result(peak_memory_bytes=2 ** 31, peak_flops=1e11, mfu=0.2), 0.1)
  assert c["regressed"] == ["peak_memory_bytes"]
  text = compare.table(c)
  assert "REGRESSED" in text.splitlines()[3] and text.splitlines()[3].startswith("peak memory / device")
  assert "-66.7 %" in text and text.endswith("regressed: peak_memory_bytes")


def test_the_comparison_names_what_differs_between_the_runs():
  base = _result()
  now = _result(config={"attention": "xla", "width": 384, "mesh": {"data": 2}}, jax="0.10.3")
  c = compare.compare(base, now, 0.1)
  assert c["differs"] == [["config.attention", "auto", "xla"], ["jax", "0.10.2", "0.10.3"]]
  assert "note: the runs differ in config.attention: auto -> xla" in compare.table(c)
  assert compare.compare(base, _result(), 0.1)["differs"] == []
  # A baseline missing a shown metric (an older bench) compares the rest.
  old = {k: v for k, v in base.items() if k != "forward_mfu"}
  assert compare.compare(old, base, 0.1)["metrics"]["forward_mfu"]["change"] is None


def test_load_takes_the_json_line_of_a_saved_output(tmp_path):
  saved = tmp_path / "base.txt"
  saved.write_text("train step   2000.0 ms\nnot json {\n" + json.dumps(_result()) + "\n\n")
  assert compare.load(str(saved))["train_step_s"] == 2.0
  (tmp_path / "empty.txt").write_text("train step 2000 ms\n{\"loss\": 1.0}\n")
  with pytest.raises(UserError, match="no `jaxvid bench` result in it"):
    compare.load(str(tmp_path / "empty.txt"))
  with pytest.raises(UserError, match="cannot read it"):
    compare.load(str(tmp_path / "missing.txt"))
  with pytest.raises(UserError, match="cannot read it"):
    compare.load(str(tmp_path))                                   # a folder
  # A gated figure that is not a positive number cannot be a baseline: nothing would be judged.
  for bad in (float("nan"), float("inf"), 0, True, "4.2", None):
    (tmp_path / "bad.json").write_text(json.dumps(_result(train_step_s=bad)))
    with pytest.raises(UserError, match="positive numbers"):
      compare.load(str(tmp_path / "bad.json"))


def test_a_shown_figure_that_is_not_a_number_is_left_out():
  c = compare.compare(_result(mfu="n/a", forward_mfu=float("nan")), _result(), 0.1)
  assert c["metrics"]["mfu"] == {"baseline": None, "now": 0.6, "change": None}
  assert c["metrics"]["forward_mfu"]["change"] is None and c["regressed"] == []
  assert "MFU train" in compare.table(c)


def test_bench_with_a_bad_baseline_or_tolerance_fails_before_it_runs(tmp_path, capsys):
  args = ["bench", "--config", TINY, *SMALL, "--steps", "1", "--config.mesh.data=-1"]
  (tmp_path / "base.json").write_text(json.dumps(_result()))
  assert cli.main(args + ["--baseline", str(tmp_path / "missing.txt")]) == 2
  assert cli.main(args + ["--baseline", str(tmp_path / "base.json"), "--tolerance", "-0.1"]) == 2
  assert cli.main(args + ["--tolerance", "0.2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith("jaxvid: error: --baseline") and "cannot read it" in err[0]
  assert err[1].startswith("jaxvid: error: --tolerance must be a fraction >= 0")
  assert err[2] == "jaxvid: error: --tolerance needs --baseline FILE (an earlier `jaxvid bench` output)"


def test_bench_against_a_faster_baseline_exits_3_and_keeps_its_json_last(tmp_path, capsys):
  # A real run against a baseline 1000x faster in every gated metric: all of them regress.
  fast = _result(**{key: 1e-3 for key, _, _ in compare.GATED})
  (tmp_path / "base.json").write_text(json.dumps(fast))
  assert cli.main(["bench", "--config", TINY, *SMALL, "--steps", "1", "--config.mesh.data=-1",
                   "--baseline", str(tmp_path / "base.json")]) == bench.REGRESSED == 3
  captured = capsys.readouterr()
  lines = captured.out.strip().splitlines()
  result = json.loads(lines[-1])
  assert sorted(result["baseline"]["regressed"]) == sorted(key for key, _, _ in compare.GATED)
  assert result["baseline"]["file"] == str(tmp_path / "base.json")
  assert any(line.startswith("train step") and line.endswith("REGRESSED") for line in lines[:-1])
  assert any(line.startswith("note: the runs differ in config.") for line in lines[:-1])
  assert "worse than the baseline" in captured.err
  # This run's whole output, saved, is a baseline: the figures this run measured.
  (tmp_path / "out.txt").write_text(captured.out)
  again = compare.load(str(tmp_path / "out.txt"))
  assert again["train_step_s"] == result["train_step_s"] and again["baseline"]["file"] == result["baseline"]["file"]
