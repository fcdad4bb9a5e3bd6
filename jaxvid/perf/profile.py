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

Times are summed over every thread that runs the program's ops, so on N devices a step of S
seconds holds up to about N*S seconds of ops. An event counts when its name is an instruction
of the compiled program (or a rendezvous); runtime bookkeeping is left out. Made for XLA:CPU
traces, where every op is an event on a host thread; TPU and GPU traces are read from their
"XLA Ops" lines where the trace has them (on TPU, matmuls fused with other ops count as
"other"); where none is found the breakdown is empty and says so: open the trace in XProf.
"""

import collections
import glob
import os
import re

import jax

KINDS = ("matmul", "collective", "other")
_MATMUL = re.compile(r"^(dot|convolution|ynn_fusion|xnn_fusion|onednn|cublas|cudnn|.*gemm|.*matmul)", re.I)
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
  trace to `directory` (process_I/ under it in a multi-process job: processes on one host
  would write the same file); returns the `jax.profiler.ProfileData` of that call."""
  if jax.process_count() > 1:
    directory = os.path.join(directory, f"process_{jax.process_index()}")
  pattern = os.path.join(directory, "**", "*.xplane.pb")
  before = set(glob.glob(pattern, recursive=True))
  with jax.profiler.trace(directory):
    fn()
  files = sorted(set(glob.glob(pattern, recursive=True)) - before, key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {directory}")
  return jax.profiler.ProfileData.from_file(files[-1])


def _op_lines(profile):
  """Timelines that can hold XLA ops: host threads other than Python's, and each device's
  "XLA Ops" line."""
  for plane in profile.planes:
    for line in plane.lines:
      if (plane.name.startswith("/host") and line.name != "python") or (
          plane.name.startswith("/device") and line.name == "XLA Ops"):
        yield line


def self_times(profile, op_names) -> collections.Counter:
  """{op name: seconds of self time}: events named as an instruction in `op_names` (or a
  rendezvous), less the time of such events nested in them, summed over the op lines."""
  counted = lambda name: name in op_names or _COLLECTIVE.match(name) is not None
  out = collections.Counter()
  for line in _op_lines(profile):
    events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events if counted(e.name)),
                    key=lambda e: (e[0], -e[1]))
    stack = []                       # (end_ns, index) of the enclosing events
    own = [d for _, d, _ in events]
    for i, (start, duration, _) in enumerate(events):
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:
        own[stack[-1][1]] -= duration
      stack.append((start + duration, i))
    for (_, _, name), ns in zip(events, own):
      out[name] += max(ns, 0) / 1e9
  return out


def result_shapes(hlo_text: str) -> dict[str, str]:
  """{instruction name: result shape ("" for a tuple)} from a compiled module's text
  (`compiled.as_text()`)."""
  return {name: shape for name, shape in
          re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ([a-z]\w*\[[\d,]*\])?", hlo_text, re.M)}


def breakdown(profile, hlo_text: str, top: int = 10) -> dict:
  """{"seconds": {kind: s}, "fraction": {kind: share}, "top": [[op, kind, s, shape], ...]} of a
  trace of the program whose compiled text (`compiled.as_text()`) is `hlo_text`."""
  shapes = result_shapes(hlo_text)
  ops = self_times(profile, shapes)
  seconds = {k: 0.0 for k in KINDS}
  for name, s in ops.items():
    seconds[kind(name)] += s
  total = sum(seconds.values())
  return {"seconds": seconds,
          "fraction": {k: (v / total if total else 0.0) for k, v in seconds.items()},
          "top": [[name, kind(name), s, shapes.get(name, "")] for name, s in ops.most_common(top)]}


def table(title: str, b: dict) -> str:
  """A few lines: the share of each kind, then the costliest ops."""
  if not b["top"]:
    return f"{title}: no XLA op events in the trace (read it with XProf or TensorBoard's profile plugin)"
  lines = [f"{title}: " + ", ".join(f"{k} {100 * b['fraction'][k]:.0f}% ({b['seconds'][k]:.2f} s)" for k in KINDS)]
  lines += [f"  {s * 1e3:9.1f} ms  {k:<10}  {name} {shape}" for name, k, s, shape in b["top"]]
  return "\n".join(lines)
