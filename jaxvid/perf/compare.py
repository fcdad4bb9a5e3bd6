"""A `jaxvid bench` result against an earlier one: the regression check.

  jaxvid bench --config configs/bench_cpu.py > base.txt              # once, on a known-good commit
  jaxvid bench --config configs/bench_cpu.py --baseline base.txt      # later: exit status 3 if worse

`load` reads the baseline (a file holding bench's JSON line, or its whole printed output: the
last line that is a bench result counts). `compare` sets each metric beside the baseline's;
a GATED metric (lower is better) regresses when it exceeds the baseline by more than the
tolerance, a fraction (0.1: 10%). The machine's measured matmul peak and the MFU are shown,
not gated: when the peak moved, so did the machine, and the step times moved with it. Where
the two runs differ in what they measured (config, device, JAX version) the comparison says
so; it still compares (an A/B of two configs is a use of it).
"""

import json
import math

from jaxvid.errors import UserError

# (key, label, unit): lower is better; these decide the verdict.
GATED = (("train_step_s", "train step", "ms"), ("forward_s", "forward (sampling step)", "ms"),
         ("peak_memory_bytes", "peak memory / device", "MiB"), ("compile_s", "compile (train step)", "s"),
         ("forward_compile_s", "compile (forward)", "s"))
# (key, label, unit): higher is better; shown only.
SHOWN = (("peak_flops", "peak matmul (measured)", "GFLOP/s"), ("mfu", "MFU train", "%"),
         ("forward_mfu", "MFU forward", "%"))
# The growth a gated figure may show before it counts as a regression (--tolerance's default).
TOLERANCE = 0.1
# What must match for the two runs to have measured the same thing.
SAME = ("config", "train_steps_per_call", "device", "host", "jax", "params", "flops_per_step")
_SCALE = {"ms": 1e3, "s": 1.0, "MiB": 2.0 ** -20, "GFLOP/s": 1e-9, "%": 100.0}


def load(path: str) -> dict:
  """The bench result in `path`: the last line that parses as a JSON object whose gated metrics
  are positive numbers (so a file of bench's whole stdout works)."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UserError(f"--baseline {path}: cannot read it ({e.strerror}); save one with "
                    f"`jaxvid bench ... > {path}`") from None
  for line in reversed(lines):
    line = line.strip()
    if not line.startswith("{"):
      continue
    try:
      result = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(result, dict) and all(_number(result.get(key)) for key, _, _ in GATED):
      return result
  raise UserError(f"--baseline {path}: no `jaxvid bench` result in it (the JSON line bench prints last, "
                  f"with {', '.join(key for key, _, _ in GATED)} positive numbers); save one with "
                  f"`jaxvid bench ... > {path}`")


def _number(x) -> bool:
  """Whether x is a finite number above 0 (not a bool)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def compare(baseline: dict, result: dict, tolerance: float) -> dict:
  """{"metrics": {key: {"baseline", "now", "change"}}, "regressed": [keys], "differs":
  [[name, baseline's, now]], "tolerance"}: change is now / baseline - 1. A value that is not a
  positive number (a shown metric an older bench lacks) is None, and so is its change."""
  metrics = {}
  for key, _, _ in GATED + SHOWN:
    before, now = (x if _number(x) else None for x in (baseline.get(key), result.get(key)))
    change = now / before - 1 if before is not None and now is not None else None
    metrics[key] = {"baseline": before, "now": now, "change": change}
  regressed = [key for key, _, _ in GATED if metrics[key]["change"] is not None and metrics[key]["change"] > tolerance]
  return {"metrics": metrics, "regressed": regressed, "differs": _differences(baseline, result),
          "tolerance": tolerance}


def _differences(baseline: dict, result: dict) -> list[list]:
  """[[name, baseline's, now], ...] for the SAME keys that differ (a dict's keys one by one)."""
  out = []
  for key in SAME:
    a, b = baseline.get(key), result.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [[f"{key}.{k}", a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    elif a != b:
      out.append([key, a, b])
  return out


def _value(x, unit: str) -> str:
  return "-" if x is None else f"{x * _SCALE[unit]:,.1f} {unit}"


def table(c: dict) -> str:
  """The comparison as text: a row per metric, then what differs, then the verdict."""
  rows = [("", "baseline", "now", "change", "")]
  for group, gated in ((GATED, True), (SHOWN, False)):
    for key, label, unit in group:
      m = c["metrics"][key]
      change = "-" if m["change"] is None else f"{100 * m['change']:+.1f} %"
      verdict = ("REGRESSED" if key in c["regressed"] else "ok") if gated and m["change"] is not None else ""
      rows.append((label, _value(m["baseline"], unit), _value(m["now"], unit), change, verdict))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  lines = ["  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
  lines += [f"note: the runs differ in {name}: {before} -> {now}" for name, before, now in c["differs"]]
  lines.append(f"against the baseline (tolerance {100 * c['tolerance']:g} %): "
               + (f"regressed: {', '.join(c['regressed'])}" if c["regressed"] else "no regression"))
  return "\n".join(lines)

