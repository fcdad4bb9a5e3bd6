"""Where a step's time goes: a JAX profiler trace of one call, summed by kind of XLA op.

  jaxvid bench --config configs/bench_cpu.py --profile runs/profile

`trace` records one call of a function with `jax.profiler.trace` (the folder opens in
TensorBoard's profile plugin, XProf or Perfetto); `breakdown` reads the XLA op events of the
trace back (`jax.profiler.ProfileData`) and sums each op's self time (its duration less that of
the ops nested in it, such as the body of a while loop) by kind:

  matmul      dots and convolutions, also inside library fusions (XNNPACK/YNNPACK/oneDNN on
              CPU, cuBLAS/cuDNN on GPU)
  collective  all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, and the
              time a device waits for the others to reach one (XLA:CPU's rendezvous)
  other       everything else: elementwise fusions, copies, transposes, loop control

Times are summed over every device (CPU: every thread that runs XLA ops), so on N devices
a step of S seconds holds up to N*S seconds of ops.
"""

import collections
import glob
import os
import re

import jax

KINDS = ("matmul", "collective", "other")
_MATMUL = re.compile(r"^(dot|convolution|conv|ynn_fusion|xnn_fusion|onednn|cublas|cudnn|gemm|.*gemm|.*matmul)", re.I)
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|rendezvous|wait:)",
                         re.I)


def kind(op_name: str) -> str:
  """One of KINDS for an XLA op's event name (e.g. "ynn_fusion.58", "all-reduce.3")."""
  if _COLLECTIVE.match(op_name):
    return "collective"
  if _MATMUL.match(op_name):
    return "matmul"
  return "other"


def trace(fn, directory: str):
  """Calls fn() (which must block until its result is ready) under the profiler, writing the
  trace to `directory`; returns the `jax.profiler.ProfileData` of that call."""
  with jax.profiler.trace(directory):
    fn()
  files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {directory}")
  return jax.profiler.ProfileData.from_file(files[-1])


def _op_lines(profile):
  """The timelines of XLA ops: CPU threads that run them, the "XLA Ops" line of each device."""
  for plane in profile.planes:
    for line in plane.lines:
      if ("XLAEigen" in line.name and plane.name.startswith("/host")) or (
          plane.name.startswith("/device") and line.name == "XLA Ops"):
        yield line


def self_times(profile) -> collections.Counter:
  """{op event name: seconds of self time}, summed over the op lines of the trace."""
  out = collections.Counter()
  for line in _op_lines(profile):
    events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda e: (e[0], -e[1]))
    stack = []                       # [end_ns, index] of the enclosing events
    own = [d for _, d, _ in events]
    for i, (start, duration, _) in enumerate(events):
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:
        own[stack[-1][1]] -= duration
      stack.append((start + duration, i))
    for (_, _, name), ns in zip(events, own):
      if not name.startswith("ThunkExecutor"):        # XLA:CPU's wrapper around a whole program
        out[name] += ns / 1e9
  return out


def result_shapes(hlo_text: str) -> dict[str, str]:
  """{instruction name: result shape} from a compiled module's text (`compiled.as_text()`)."""
  return dict(re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ([a-z]\w*\[[\d,]*\])", hlo_text, re.M))


def breakdown(profile, hlo_text: str = "", top: int = 10) -> dict:
  """{"seconds": {kind: s}, "fraction": {kind: share}, "top": [[op, kind, s, shape], ...]} of a
  trace; an op's result shape is taken from `hlo_text` (the compiled program's) when given."""
  ops = self_times(profile)
  shapes = result_shapes(hlo_text)
  seconds = {k: 0.0 for k in KINDS}
  for name, s in ops.items():
    seconds[kind(name)] += s
  total = sum(seconds.values())
  return {"seconds": seconds,
          "fraction": {k: (v / total if total else 0.0) for k, v in seconds.items()},
          "top": [[name, kind(name), s, shapes.get(name, "")] for name, s in ops.most_common(top)]}


def table(title: str, b: dict) -> str:
  """A few lines: the share of each kind, then the costliest ops."""
  lines = [f"{title}: " + ", ".join(f"{k} {100 * b['fraction'][k]:.0f}% ({b['seconds'][k]:.2f} s)" for k in KINDS)]
  lines += [f"  {s * 1e3:9.1f} ms  {k:<10}  {name} {shape}" for name, k, s, shape in b["top"]]
  return "\n".join(lines)
