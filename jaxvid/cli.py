"""The `jaxvid` command: parse, build the config, call train or sample.

Exit status: 0 done, 2 bad input (one line naming the problem and the fix), 3 `jaxvid bench
--baseline` found a figure worse than the baseline's, 1 anything else.
A job that seems stuck (a collective waiting for a process that died, a loader that stopped):
`kill -USR1 PID` prints every thread's Python stack to its stderr and the job goes on.
"""

import argparse
import contextlib
import faulthandler
import logging
import signal
import sys
import traceback
import warnings

from jaxvid.errors import UserError

USAGE = """\
jaxvid train  --config PATH[:ARG] --workdir DIR [--config.KEY=VALUE ...]
jaxvid sample --workdir DIR (--prompt TEXT | --prompts FILE) --output DIR [--config.KEY=VALUE ...] [--step N] [--strict]
jaxvid encode --config PATH[:ARG] --manifest FILE --output STORE [--config.KEY=VALUE ...]
jaxvid export --workdir DIR --output PATH [--step N] [--config.distributed.KEY=VALUE ...]
jaxvid bench  --config PATH[:ARG] [--steps N] [--profile DIR] [--baseline FILE [--tolerance F]] [--config.KEY=VALUE ...]"""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jaxvid", usage=USAGE, description="Train and sample text-to-video diffusion transformers.")
  p.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  t = sub.add_parser("train", prog="jaxvid train", help="train a model (resumes if WORKDIR has checkpoints)")
  t.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py or configs/dit.py:B")
  t.add_argument("--workdir", required=True, help="run directory: config.json, metrics, checkpoints")
  t.add_argument("--init_from", default=None,
                 help="start a new run from the parameters of another run directory or export (a VAE "
                      "trained on images is inflated to clips)")
  t.add_argument("--init_optimizer", action="store_true",
                 help="with --init_from a run directory: take its optimizer state too")

  s = sub.add_parser("sample", prog="jaxvid sample", help="generate videos from prompts with a trained run")
  s.add_argument("--workdir", required=True, help="a run directory written by `jaxvid train`")
  group = s.add_mutually_exclusive_group(required=True)
  group.add_argument("--prompt", help="one prompt")
  group.add_argument("--prompts", help=".txt (a prompt a line) or .jsonl ({\"prompt\", \"id\"?, \"seed\"?, "
                     "\"negative_prompt\"?} plus a mode's fields: \"frames\"; \"image\"; \"video\" with \"extend\", "
                     "\"mask\" or \"strength\")")
  s.add_argument("--output", required=True, help="output folder: ID.mp4, ID.json, manifest.jsonl, index.html")
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  s.add_argument("--strict", action="store_true",
                 help="stop before any work if a line of --prompts is unusable (default: report and skip it)")

  c = sub.add_parser("encode", prog="jaxvid encode",
                     help="encode a manifest's clips into a latent store (resumes a partly written one)")
  c.add_argument("--config", required=True, help="config file: its autoencoder, text, data.buckets and data.fps")
  c.add_argument("--manifest", required=True, help=".jsonl or .csv with path and caption, or a folder of videos "
                 "with .txt captions")
  c.add_argument("--output", required=True, help="the store folder; train with --config.data.source=latents "
                 "--config.data.store=STORE")

  e = sub.add_parser("export", prog="jaxvid export", help="write an inference-only checkpoint (EMA parameters)")
  e.add_argument("--workdir", required=True, help="a run directory written by `jaxvid train`")
  e.add_argument("--output", required=True, help="a new folder; `jaxvid sample --workdir` accepts it")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

  b = sub.add_parser("bench", prog="jaxvid bench",
                     help="time the train step and the sampling forward of a config; prints JSON last")
  b.add_argument("--config", required=True, help="config file, e.g. configs/bench_cpu.py")
  b.add_argument("--steps", type=int, default=10,
                 help="timed steps (after 2 warm-up steps), in whole calls of train.steps_per_call steps "
                      "(of 4 sampling steps for the forward); the median per step is reported")
  b.add_argument("--profile", default=None, metavar="DIR",
                 help="also trace one train call and one forward call into DIR and print where their time went")
  b.add_argument("--baseline", default=None, metavar="FILE",
                 help="an earlier run's output (its JSON line): print the changes, exit 3 if a step time, "
                      "compile time or the peak memory grew by more than --tolerance")
  b.add_argument("--tolerance", type=float, default=None,
                 help="the growth --baseline allows, a fraction (default 0.1: 10%%)")

  for command in (t, s, c, e, b):
    command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
  return p


def _setup_logging(verbose: bool) -> None:
  # JAX warns whenever Python's fork hooks run: a subprocess started with a preexec_fn (ffmpeg no
  # longer is, see jaxvid/__init__.py) or a fork-started worker of a library.
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
  logging.basicConfig(level=logging.INFO, format="jaxvid: %(message)s", stream=sys.stderr, force=True)
  # grain's worker processes read absl flags, which only an absl app would have parsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if not verbose:
    import absl.logging  # orbax and grain log through absl
    absl.logging.set_verbosity(absl.logging.WARNING)
    for name in ("absl", "orbax", "grain", "jax"):
      logging.getLogger(name).setLevel(logging.WARNING)


def run(argv: list[str]) -> int | None:
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    raise UserError(f"jaxvid {args.command}: unrecognized arguments {' '.join(unknown)} (see jaxvid --help)")
  _setup_logging(args.verbose)

  from jaxvid import config as config_lib  # heavy imports after parsing, so --help is fast
  from jaxvid.parallel import distributed
  if args.command == "train":
    from jaxvid.train import loop
    if args.init_optimizer and not args.init_from:
      raise UserError("--init_optimizer needs --init_from RUN_DIR")
    cfg = config_lib.load(args.config, overrides)
    distributed.initialize(cfg, batch=cfg.train.batch_size)
    loop.train(cfg, args.workdir, init_from=args.init_from, init_optimizer=args.init_optimizer)
  elif args.command == "sample":
    from jaxvid.sample import items as items_lib
    from jaxvid.sample import job
    from jaxvid.train import export
    cfg = export.load_run_config(args.workdir, overrides)
    distributed.initialize(cfg, batch=cfg.sample.batch_size)
    items = (items_lib.single_prompt(args.prompt, cfg) if args.prompt is not None
             else items_lib.read_prompts(args.prompts, cfg, strict=args.strict))
    job.sample(cfg, args.workdir, items, args.output, step=args.step)
  elif args.command == "encode":
    from jaxvid.data import latents
    cfg = config_lib.load(args.config, overrides)
    cfg.data.manifest = args.manifest
    distributed.initialize(cfg)
    import jax
    config_lib.validate(cfg, jax.device_count())
    counts = latents.encode(cfg, args.manifest, args.output)
    logging.getLogger("jaxvid").info("encode: %d clips written, %d already in %s, %d skipped (process %d)",
                                     counts["written"], counts["present"], args.output, counts["skipped"],
                                     jax.process_index())
  elif args.command == "bench":
    from jaxvid.perf import bench
    if args.steps < 1:
      raise UserError("--steps must be at least 1")
    if args.tolerance is not None and args.baseline is None:
      raise UserError("--tolerance needs --baseline FILE (an earlier `jaxvid bench` output)")
    from jaxvid.perf import compare
    tolerance = compare.TOLERANCE if args.tolerance is None else args.tolerance
    if not tolerance >= 0:
      raise UserError(f"--tolerance must be a fraction >= 0 (0.1: 10%), got {tolerance}")
    baseline = None if args.baseline is None else (args.baseline, compare.load(args.baseline))   # before the run
    cfg = config_lib.load(args.config, overrides)
    distributed.initialize(cfg, batch=cfg.train.batch_size)
    return bench.main(cfg, args.steps, args.profile, baseline, tolerance)
  elif args.command == "export":
    from jaxvid.train import export
    cfg = export.run_config(args.workdir, overrides)
    distributed.initialize(cfg)
    export.export_run(cfg, args.workdir, args.output, args.step)


def _register_stack_dump() -> None:
  """`kill -USR1 PID` prints every thread's stack to the process's stderr (file descriptor 2)."""
  # Not on Windows (no SIGUSR1), nor where there is no stderr to print to.
  with contextlib.suppress(AttributeError, ValueError, OSError, RuntimeError):
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  verbose = "--verbose" in argv
  _register_stack_dump()
  try:
    status = run(argv)
  except UserError as e:
    if verbose:
      traceback.print_exc()
    print(f"jaxvid: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxvid: interrupted", file=sys.stderr)
    return 130
  return status or 0


if __name__ == "__main__":
  sys.exit(main())
