"""Multi-process translation on one machine: the multi-host path, locally.

Starts ``--processes`` copies of itself, each with ``--devices-per-process``
forced CPU devices, joined into one JAX job whose coordinator listens on a
free port of 127.0.0.1. Every process translates the same input with the same
run folder; the patches of each HR scale are spread over all
``processes x devices`` devices, and process 0 alone writes OUT (and the
resume folder beside it). It is what a SLURM job does across nodes
(``launch/translate_slurm.sh``), small enough to try on a laptop:

  python launch/translate_local_multiprocess.py --workdir RUN \\
      -i IN.nii.gz -o OUT.nii.gz --processes 2 --devices-per-process 4

Any other ``megan translate`` option (``--batch-size auto``, ``--plan``,
``--skip-existing``, ``--mask-augment SEED``, ...) is passed on to every
process.

Exit status: 0 when every process succeeded, else the first failure's (the
other processes are then stopped).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

FORCE_DEVICES = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description="Translate IN with a trained run on several local "
      "processes (one JAX job over processes x devices CPU devices). Other "
      "megan translate options are passed on to every process.")
  p.add_argument("--workdir", required=True, help="a trained run's folder")
  p.add_argument("-i", "--input", required=True, nargs="+", metavar="IN",
                 help="source volume(s) (.nii/.nii.gz), a folder of them, "
                 "or 'mni152'")
  p.add_argument("-o", "--output", required=True, metavar="OUT",
                 help="output .nii/.nii.gz, a folder for several inputs "
                 "(written by process 0)")
  p.add_argument("--mask", nargs="+", metavar="MASK",
                 help="label mask(s), one per input")
  p.add_argument("--processes", type=int, default=2,
                 help="processes to start (default 2)")
  p.add_argument("--devices-per-process", type=int, default=4,
                 help="forced CPU devices per process (default 4)")
  p.add_argument("--batch-size", default=None,
                 help="patches per batch over all devices, or 'auto' "
                 "(default: the run's)")
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bf16", "bfloat16"))
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--timeout", type=int, default=300,
                 help="seconds to wait for every process to join")
  # Set by the launcher for the processes it starts.
  p.add_argument("--coordinator", help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  return p


def translate_argv(args) -> list[str]:
  """The ``megan translate`` arguments of every process."""
  argv = ["translate", "-i", *args.input, "-o", args.output,
          "--workdir", args.workdir, "--dtype", args.dtype]
  if args.mask:
    argv += ["--mask", *args.mask]
  if args.batch_size is not None:
    argv += ["--batch-size", str(args.batch_size)]
  if args.quiet or args.process_id:  # one set of progress bars is enough
    argv.append("--quiet")
  return argv + list(args.translate_options)


def _exit_now(rc: int) -> None:
  # A normal exit would wait at jax.distributed's shutdown barrier for
  # processes that may be stuck waiting for this one.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(rc)


def _exit_with_parent() -> None:
  """Ends this process if the launcher goes away (even killed by SIGKILL),
  so no process is left waiting in a collective."""
  parent = os.getppid()
  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    _exit_now(1)
  threading.Thread(target=watch, daemon=True).start()


def worker(args) -> int:
  """One process of the job: join it, then run ``megan translate``."""
  _exit_with_parent()
  try:
    from megan_jax import cli, sharding
    sharding.initialize_distributed(args.coordinator, args.processes,
                                    args.process_id, timeout_s=args.timeout)
    rc = cli.main(translate_argv(args))
  except SystemExit as e:  # a usage error: argparse said why
    _exit_now(e.code if isinstance(e.code, int) else 2)
  except BaseException:  # a bug, or interrupted: report, then leave at once
    traceback.print_exc()
    _exit_now(1)
  if rc:
    _exit_now(rc)
  return rc


def child_env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(FORCE_DEVICES)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{FORCE_DEVICES}={devices}"])
  # The package may not be installed: let the children import it from here.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def launch(args) -> int:
  """Starts the processes and waits for them."""
  if args.processes < 1 or args.devices_per_process < 1:
    print("error: --processes and --devices-per-process must be >= 1",
          file=sys.stderr)
    return 2
  # What every process would refuse alike: once here, before N start.
  why = None
  if args.timeout < 1:
    why = f"--timeout {args.timeout}: must be >= 1 second"
  else:
    from megan_jax import cli
    from megan_jax import state as state_lib
    from megan_jax.errors import InputError
    try:  # paired as megan translate pairs them: @FILE lists expanded
      state_lib.load_config(args.workdir)
      cli.translate_jobs(cli.expand_arg_files(args.input), args.output,
                         cli.expand_arg_files(args.mask or []))
    except InputError as e:
      why = str(e)
  if why:
    print(f"error: {why}", file=sys.stderr)
    return 2
  coordinator = f"127.0.0.1:{free_port()}"
  base = [sys.executable, os.path.abspath(__file__),
          "--workdir", args.workdir, "-i", *args.input, "-o", args.output,
          "--processes", str(args.processes), "--dtype", args.dtype,
          "--timeout", str(args.timeout)]
  if args.mask:
    base += ["--mask", *args.mask]
  if args.batch_size is not None:
    base += ["--batch-size", str(args.batch_size)]
  if args.quiet:
    base.append("--quiet")
  base += list(args.translate_options)
  env = child_env(args.devices_per_process)
  procs = []
  signal.signal(signal.SIGTERM, _interrupt)  # e.g. `kill LAUNCHER`: stop all
  try:
    for i in range(args.processes):
      cmd = base + ["--coordinator", coordinator, "--process-id", str(i)]
      # Process 0 reports ("wrote OUT"); the others only their errors.
      procs.append(subprocess.Popen(
          cmd, env=env, stdout=None if i == 0 else subprocess.DEVNULL))
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:  # the others would wait for it forever: stop them
        _stop(procs)
        return failed[0] if failed[0] > 0 else 1  # < 0: killed by a signal
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.2)
  except KeyboardInterrupt as e:
    # Ctrl-C reached the processes too (one process group): a moment to
    # end as megan translate does (process 0 says where the batches done
    # are kept); SIGTERM (a scheduler's) stops them at once.
    _stop(procs, 0.0 if isinstance(e, _Terminated) else INTERRUPT_GRACE_S)
    return 143 if isinstance(e, _Terminated) else 130  # 128 + the signal


class _Terminated(KeyboardInterrupt):
  """SIGTERM, stopping the launcher as Ctrl-C does."""


def _interrupt(signum, frame):
  raise _Terminated


INTERRUPT_GRACE_S = 5.0  # after Ctrl-C, before the processes are killed


def _stop(procs, grace_s: float = 0.0) -> None:
  """Kills the processes still running after ``grace_s`` seconds. SIGKILL:
  XLA's coordination client catches SIGTERM (as a preemption notice) and
  would keep waiting."""
  deadline = time.monotonic() + grace_s
  while (any(p.poll() is None for p in procs)
         and time.monotonic() < deadline):
    time.sleep(0.05)
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def parse_args(argv=None) -> argparse.Namespace:
  """The launcher's options; the rest (``translate_options``) go to
  ``megan translate`` as they are, checked here first (a misspelt option
  is a usage error before any process starts)."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  args.translate_options = rest
  if args.process_id is None:  # the launcher itself: check what goes on
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))  # megan_jax, installed or not
    from megan_jax import cli
    cli.build_parser().parse_args(translate_argv(args))  # exits if wrong
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.process_id is not None:
    return worker(args)
  return launch(args)


if __name__ == "__main__":
  sys.exit(main())
