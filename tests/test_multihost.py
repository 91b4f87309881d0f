"""Multi-process (multi-host) inference: 2 local processes x 4 CPU devices,
joined by jax.distributed through the local launcher, write the same volume
as one process on one device, also when resuming a killed run."""
import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
import synthetic

import megan_jax
from megan_jax import infer, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "translate_local_multiprocess.py")
# Non-cubic; scales 8x10x9, 15x19x18, 30x37x36: 4 patches at hr1, 36 at hr2
# (not a multiple of the 8 devices, so the last batch is padded).
SHAPE = (30, 37, 36)
PROCESSES, DEVICES = 2, 4
# One patch per device, as in the 1-device reference with batch size 1: the
# same per-device program, so the outputs can be compared bit for bit.
BATCH = PROCESSES * DEVICES


def _volume(shape=SHAPE, seed=0):
  return synthetic.blob(shape, seed)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  affine = np.diag([4.0, 4.0, 4.0, 1.0])  # the smoke config's spacing
  affine[:3, 3] = [-50, -60, -40]
  path = str(tmp_path_factory.mktemp("src") / "src.nii.gz")
  nib.save(nib.Nifti1Image(_volume(), affine), path)
  return path


@pytest.fixture(scope="module")
def one_device(run_dir):
  return megan_jax.load(run_dir, devices=jax.devices()[:1], batch_size=1)


@pytest.fixture(scope="module")
def reference(one_device, source, tmp_path_factory):
  """One process, one device."""
  out = str(tmp_path_factory.mktemp("ref") / "ref.nii.gz")
  infer.translate_file(one_device, source, out, progress=False)
  return np.asarray(nib.load(out).dataobj)


def _launch(run_dir, src, out, processes=PROCESSES, timeout=240):
  cmd = [sys.executable, LAUNCHER, "--workdir", run_dir, "-i", src, "-o", out,
         "--processes", str(processes), "--devices-per-process", str(DEVICES),
         "--batch-size", str(BATCH), "--quiet", "--timeout", "120"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cache = jax.config.jax_compilation_cache_dir  # conftest's, for the session
  if cache:  # the second job reuses the first one's compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_processes_write_what_one_device_writes(run_dir, source,
                                                    reference, tmp_path):
  out = str(tmp_path / "out.nii.gz")
  r = _launch(run_dir, source, out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count(f"wrote {out}") == 1  # process 0 reports
  img = nib.load(out)
  np.testing.assert_array_equal(np.asarray(img.dataobj), reference)
  np.testing.assert_allclose(img.affine, nib.load(source).affine)
  assert os.listdir(tmp_path) == ["out.nii.gz"]  # no workspace left behind


@pytest.mark.slow
def test_two_processes_resume_a_killed_run(run_dir, source, one_device,
                                           reference, tmp_path, monkeypatch):
  """One process is killed during hr1; two processes continue from its
  workspace: process 0 reads it and sends the others the finished LR volume
  and hr1's patches so far, which they need to cut hr2's patches."""
  monkeypatch.setattr(infer, "RECORD_EVERY_S", 0.0)

  class Killed(Exception):
    pass

  def kill(scale, done):
    if scale == 1 and done >= 2:
      raise Killed()
  out = str(tmp_path / "out.nii.gz")
  with pytest.raises(Killed):
    infer.translate_file(one_device, source, out, progress=False,
                         on_batch=kill)
  partial = tmp_path / ".out.nii.gz.partial"
  progress = json.load(open(partial / "progress.json"))
  assert progress == {"0": "done", "1": 2}
  r = _launch(run_dir, source, out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not partial.exists()
  np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), reference)


def test_a_failing_job_stops_with_the_error(run_dir, source, tmp_path):
  out = str(tmp_path / "out.nii.gz")
  # Found by every process: the job stops with their error.
  damaged = tmp_path / "damaged.nii.gz"
  damaged.write_bytes(open(source, "rb").read()[:200])
  r = _launch(run_dir, str(damaged), out, timeout=120)
  assert r.returncode == 2
  assert str(damaged) in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(out)
  # What every process would refuse alike, refused once before they start
  # (a missing run; the mask count; the timeout).
  missing = str(tmp_path / "no_run")
  r = _launch(missing, source, out, timeout=120)
  assert r.returncode == 2 and r.stderr.count("\n") == 1
  assert missing in r.stderr
  base = [sys.executable, LAUNCHER, "--workdir", run_dir, "-i", source,
          "-o", out]
  for extra, said in ((["--mask", source, source], "2 mask(s) for 1 input"),
                      (["--timeout", "0"], "--timeout 0")):
    r = subprocess.run(base + extra, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
  assert not os.path.exists(out)
  # Masks are counted against the inputs of @FILE lists as megan translate
  # counts them (two inputs listed, two masks: not refused, so the missing
  # run is what is said).
  listed = tmp_path / "inputs.txt"
  listed.write_text(f"{source}\n{source}\n")
  r = subprocess.run([sys.executable, LAUNCHER, "--workdir", missing, "-i",
                      f"@{listed}", "-o", str(tmp_path / "o") + "/",
                      "--mask", source, source],
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 2 and missing in r.stderr, r.stderr
  assert "mask(s)" not in r.stderr


def _megan_job(argvs, timeout=240,
               prefix=("-m", "megan_jax.cli", "--distributed")):
  """Runs ``megan --distributed ARGV`` once per entry of ``argvs`` as one
  job (what srun starts: the MEGAN_* variables instead of SLURM's), one CPU
  device each; returns ``[(exit status, stdout, stderr)]``. Another
  ``prefix`` (``("-c", script)``) runs a script instead."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = []
  for i, argv in enumerate(argvs):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MEGAN_COORDINATOR=f"127.0.0.1:{port}",
               MEGAN_NUM_PROCESSES=str(len(argvs)), MEGAN_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, *prefix, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=ROOT))
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:  # a hang is a failure, and leaves no process behind
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


@pytest.mark.slow
def test_processes_that_disagree_all_stop_with_an_error(run_dir, tmp_path):
  # Each process reads its own copy of the inputs (node-local disks, say).
  # One missing on one process; one whose voxels differ between the
  # processes (same shape): every process stops with an error naming it (no
  # wrong volume, no process left waiting in a collective for the others),
  # and the inputs all agree on are still translated.
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  copies = []
  for i in range(2):
    folder = tmp_path / f"node{i}"
    folder.mkdir()
    nib.save(nib.Nifti1Image(_volume(seed=1), affine),
             str(folder / "same.nii.gz"))
    nib.save(nib.Nifti1Image(_volume(seed=2 + i), affine),
             str(folder / "other.nii.gz"))
    nib.save(nib.Nifti1Image(_volume(seed=1), affine),
             str(folder / "blocked.nii.gz"))
    copies.append(folder)
  out = tmp_path / "out.nii.gz"
  missing = str(tmp_path / "node1" / "missing.nii.gz")
  (c0, _, e0), (c1, _, e1) = _megan_job([
      ["translate", "--workdir", run_dir, "--quiet", "-o", str(out), "-i",
       str(copies[0] / "same.nii.gz")],
      ["translate", "--workdir", run_dir, "--quiet", "-o", str(out), "-i",
       missing]])
  assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
  assert missing in e1 and "failed on process 1" in e0, (e0, e1)
  assert "Traceback" not in e0 + e1 and not out.exists()

  # Process 0 alone writes, so only it finds that the resume folder of
  # blocked.nii.gz cannot be made (a file is in the way): all the same stop
  # that input and go on. An input constant on the working grid (a 1 mm
  # checkerboard, an even grey at 4 mm, where the run works) is refused by every
  # process alike when the cascade prepares it (that once stopped the
  # whole job). Node-local copies under other names (same.nii.gz on one,
  # copy.nii.gz on the other): one output, named by process 0's.
  spike = (np.indices((40, 40, 40)).sum(axis=0) % 2).astype(np.float32)
  nib.save(nib.Nifti1Image(spike, np.diag([1.0, 1.0, 1.0, 1.0])),
           str(tmp_path / "spike.nii.gz"))
  os.rename(copies[1] / "same.nii.gz", copies[1] / "copy.nii.gz")
  folder = tmp_path / "out"
  folder.mkdir()
  (folder / ".blocked.nii.gz.partial").write_text("in the way")
  (c0, o0, e0), (c1, o1, e1) = _megan_job([
      ["translate", "--workdir", run_dir, "--quiet", "-o", f"{folder}/", "-i",
       *(str(copies[i] / f) for f in ("blocked.nii.gz", "other.nii.gz")),
       str(tmp_path / "spike.nii.gz"),
       str(copies[i] / ("same.nii.gz" if i == 0 else "copy.nii.gz"))]
      for i in range(2)])
  assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
  for err in (e0, e1):
    assert "other.nii.gz: differs between the processes" in err, err
    assert "spike.nii.gz" in err and "Traceback" not in err, err
  assert ".blocked.nii.gz.partial" in e0
  assert f"output {folder / 'blocked.nii.gz'}: failed on process 0" in e1
  assert sorted(os.listdir(folder)) == [".blocked.nii.gz.partial",
                                        "same.nii.gz"]
  assert o0.count("wrote") == 1 and o1.count("wrote") == 0  # process 0 writes


API_SCRIPT = """
import os, sys
import numpy as np
from megan_jax import infer, sharding
sharding.initialize_distributed()
run, outs = sys.argv[1:3]
t = infer.load(run, batch_size=2)
x = np.random.default_rng(0).uniform(0, 255, (30, 37, 36)).astype(np.float32)
for out in outs.split(","):
  try:
    t.translate(x, out=out)
    print("returned; the file exists:", os.path.exists(out))
  except ValueError as e:
    print("raised:", e)
"""


@pytest.mark.slow
def test_translate_to_a_file_on_several_processes(run_dir, tmp_path):
  """``Translator.translate(array, out=...)`` in a job: no process returns
  before the file is there, and an output only process 0 could find bad
  stops every process (the others waited in a collective for it)."""
  good = str(tmp_path / "y.nii.gz")
  bad = str(tmp_path / "no_folder" / "y.nii.gz")
  results = _megan_job([[run_dir, f"{good},{bad}"]] * 2, timeout=180,
                       prefix=("-c", API_SCRIPT))
  for code, stdout, stderr in results:
    assert code == 0, stderr[-2000:]
    assert "returned; the file exists: True" in stdout, stdout
    assert f"raised: output {bad}" in stdout, stdout


@pytest.mark.slow
def test_processes_given_another_job_all_stop_with_an_error(run_dir,
                                                            tmp_path):
  # Node-local copies out of step: process 1's list file lacks an input;
  # then process 1's copy of the run has another edge sigma. Either used to
  # give a wrong volume with exit 0 or a hang in a collective.
  import shutil
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  srcs = []
  for seed in (1, 2):
    srcs.append(str(tmp_path / f"s{seed}.nii.gz"))
    nib.save(nib.Nifti1Image(_volume(seed=seed), affine), srcs[-1])
  folder = tmp_path / "out"
  outs = _megan_job([
      ["translate", "--workdir", run_dir, "--quiet", "-o", f"{folder}/",
       "-i", *srcs],
      ["translate", "--workdir", run_dir, "--quiet", "-o", f"{folder}/",
       "-i", srcs[0]]])
  for code, _, err in outs:
    assert code == 2, err[-2000:]
    assert ("megan translate: not the same on every process of this job: "
            "the number of inputs and which have a mask (") in err, err[-2000:]
    assert "Traceback" not in err
  assert not folder.exists()

  other = tmp_path / "run_copy"
  shutil.copytree(run_dir, other)
  config = json.loads((other / "config.json").read_text())
  config["edges"]["sigma"] = 2 * config["edges"]["sigma"] + 1
  (other / "config.json").write_text(json.dumps(config))
  out = tmp_path / "o.nii.gz"
  outs = _megan_job([
      ["translate", "--workdir", wd, "--quiet", "-o", str(out), "-i", srcs[0]]
      for wd in (run_dir, str(other))])
  for code, _, err in outs:
    assert code == 2, err[-2000:]
    assert ("translation: not the same on every process of this job: the "
            "run's config (") in err, err
    assert "Traceback" not in err
  assert not out.exists()


@pytest.mark.slow
def test_launcher_stopped_by_sigterm_stops_its_processes(run_dir, source,
                                                         tmp_path):
  import signal
  import time
  cmd = [sys.executable, LAUNCHER, "--workdir", run_dir, "-i", source, "-o",
         str(tmp_path / "o.nii.gz"), "--processes", "2",
         "--devices-per-process", "1", "--quiet"]
  p = subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  children = lambda: subprocess.run(["pgrep", "-P", str(p.pid)],
                                    capture_output=True,
                                    text=True).stdout.split()
  deadline = time.monotonic() + 60
  while not children() and time.monotonic() < deadline:
    time.sleep(0.1)
  started = children()
  assert started, "the launcher started no process"
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=60) == 143  # 128 + SIGTERM, as the shell reports
  assert not any(os.path.exists(f"/proc/{c}") for c in started)


def test_launcher_gives_interrupted_processes_a_moment_to_end():
  # After Ctrl-C (which reaches the processes too) they were killed at
  # once, so process 0 never said where the batches done are kept. A
  # process that ends within the grace period is not killed; one that does
  # not end is, once it is over.
  import importlib.util
  spec = importlib.util.spec_from_file_location("launcher", LAUNCHER)
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  quick = subprocess.Popen([sys.executable, "-c",
                            "import time; time.sleep(0.5)"])
  stuck = subprocess.Popen([sys.executable, "-c",
                            "import time; time.sleep(60)"])
  launcher._stop([quick, stuck], grace_s=2.0)
  assert quick.returncode == 0  # ended by itself (was killed: -9)
  assert stuck.returncode == -9  # SIGKILL, once the grace period is over
  assert launcher.INTERRUPT_GRACE_S > 0
  again = subprocess.Popen([sys.executable, "-c",
                            "import time; time.sleep(60)"])
  launcher._stop([again])  # SIGTERM's path: at once
  assert again.returncode == -9


def test_distributed_is_for_translate_only(tmp_path, capsys):
  from megan_jax import cli
  assert cli.main(["--distributed", "edges", "-i", "a.nii", "-o",
                   str(tmp_path / "e.nii")]) == 2
  err = capsys.readouterr().err
  assert "megan edges: runs as one process" in err and err.count("\n") == 1


AGREE_SCRIPT = """
import sys
pid, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
from megan_jax import infer, sharding
sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
import numpy as np
# process 0's array everywhere, in slabs of 2 rows (the last one short)
want = np.arange(35, dtype=np.float32).reshape(7, 5)
mine = want if pid == 0 else -3 * want
got = sharding.broadcast_from_0(mine, chunk_bytes=mine[0].nbytes * 2)
print("broadcast", got.shape == want.shape and bool((got == want).all()),
      flush=True)
# the hosts differ in the memory they have free: process 1 has almost none
infer.memory_budget = lambda dev: ((2 ** 40 if pid == 0 else 1), "test")
t = infer.load(run_dir, batch_size="auto")
print("batch", t.batch_size, t.batch_info["per_process"], flush=True)
vol = (np.random.default_rng(0).random((30, 37, 26)) * 200).astype(np.float32)
print("shape", t.translate(vol).shape, flush=True)
"""


@pytest.mark.slow
def test_auto_batch_size_is_one_for_all_processes(run_dir, tmp_path):
  # Each process picks from its own free memory; the job must run one batch
  # size (the smallest pick), or the processes' programs would not match.
  script = tmp_path / "agree.py"
  script.write_text(AGREE_SCRIPT)
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                             run_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert "batch 2 [" in out and "shape (30, 37, 26)" in out, out
    assert "broadcast True" in out, out
  picks = [json.loads(o.split("batch 2 ")[1].splitlines()[0]) for o, _ in outs]
  assert picks[0] == picks[1] and picks[0][1] == 2 and picks[0][0] > 2


def test_single_process_helpers():
  mesh = sharding.make_mesh()
  assert sharding.is_local(mesh)
  n = mesh.devices.size
  data = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
  ids = np.arange(2 * n)[::-1].copy()
  batch = sharding.global_batch(data.shape, mesh, lambda i: data[i], ids)
  assert batch.sharding == sharding.batch_sharded(mesh)
  np.testing.assert_array_equal(np.asarray(batch), data[ids])
  rep = sharding.global_replicate({"w": data}, mesh)["w"]
  np.testing.assert_array_equal(sharding.local_value(rep), data)
  big = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  np.testing.assert_array_equal(
      sharding.broadcast_from_0(big, chunk_bytes=big[0].nbytes * 2), big)
  sharding.assert_same_on_all(big, "anything")  # one process: nothing to do


def test_assert_same_parts_names_only_what_differs(monkeypatch):
  # Two processes, faked: the other process's digest of part "b" differs.
  import hashlib
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def every(digests):
    other = digests.copy()
    other[1] = np.frombuffer(hashlib.sha256(b"z").digest()[:16], np.uint8)
    return np.stack([digests, other])
  monkeypatch.setattr(sharding, "process_values", every)
  from megan_jax.errors import InputError
  with pytest.raises(InputError, match=(
      r"^w: not the same on every process of this job: b \(")) as e:
    sharding.assert_same_parts({"a": "x", "b": "y"}, "w")
  assert e.value.agreed is True  # every process met it: they go on together
  monkeypatch.setattr(sharding, "process_values",
                      lambda d: np.stack([d, d]))
  sharding.assert_same_parts({"a": "x", "b": "y"}, "w")  # all agree


class _Recorded(Exception):
  pass


def _record_parts(monkeypatch):
  """Makes ``sharding.assert_same_parts`` record its parts and stop."""
  seen = []

  def record(parts, what):
    seen.append((what, dict(parts)))
    raise _Recorded
  monkeypatch.setattr(sharding, "assert_same_parts", record)
  return seen


def test_what_the_processes_compare(run_dir, source, tmp_path, monkeypatch):
  from megan_jax import cli
  import shutil
  other = str(tmp_path / "other.nii.gz")
  shutil.copy(source, other)
  seen = _record_parts(monkeypatch)
  with pytest.raises(_Recorded):
    cli._translate(cli.build_parser().parse_args([
        "translate", "--workdir", run_dir, "-i", source, other, "-o",
        f"{tmp_path}/out/", "--mask", source, source, "--plan"]), [])
  (what, parts), = seen
  assert what == "megan translate"
  assert json.loads(parts["the number of inputs and which have a mask"]) == [
      True, True]
  options = json.loads(parts["--mask-augment, --skip-existing or --plan"])
  assert options == [None, False, True]
  # A Translator spanning several processes compares the batch size asked
  # for: "auto" (each process's own pick is agreed on later).
  seen.clear()
  monkeypatch.setattr(sharding, "is_local", lambda mesh: False)
  with pytest.raises(_Recorded):
    infer.load(run_dir, batch_size="auto")
  (what, parts), = seen
  assert what == "translation" and parts["the batch size"] == "auto"
  assert parts["the dtype"] == "float32"
  assert set(parts) == {"the run's config", "the intensity range",
                        "the batch size", "the dtype"}


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True),
                                             ("0", False), ("", False)])
def test_distributed_requested(value, expected):
  assert sharding.distributed_requested({sharding.ENV_REQUEST: value}) is expected
  assert sharding.distributed_requested({}) is False


SHARD_SCRIPT = """
import numpy as np
from megan_jax import sharding
mesh = sharding.make_mesh()
assert mesh.devices.size == 2, mesh
got = sharding.shard_batch({"even": np.zeros((4, 3)), "odd": np.zeros((3, 3))},
                           mesh)
assert got["even"].sharding == sharding.batch_sharded(mesh), got["even"].sharding
assert got["odd"].sharding == sharding.replicated(mesh), got["odd"].sharding
print("shard_batch ok")
"""


def test_shard_batch_splits_a_divisible_batch_and_replicates_the_rest():
  """``shard_batch`` splits a leaf whose leading axis divides by the device
  count (``batch_sharded``) and replicates one that does not: on this
  process's device(s), and on 2 forced host devices in a subprocess (a batch
  of 4 split, a batch of 3 replicated)."""
  mesh = sharding.make_mesh()
  n = mesh.devices.size
  data = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
  got = sharding.shard_batch({"x": data}, mesh)["x"]
  assert got.sharding == sharding.batch_sharded(mesh)
  np.testing.assert_array_equal(np.asarray(got), data)
  if n > 1:
    odd = sharding.shard_batch(data[:n + 1], mesh)
    assert odd.sharding == sharding.replicated(mesh)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], capture_output=True,
                     text=True, timeout=120, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "shard_batch ok" in r.stdout
