"""The megan command line: outputs with the input's geometry, one-line errors."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from megan_jax import cli
from megan_jax.errors import InputError
from megan_jax.normalise import normalise


def _ball(path, shape=(24, 28, 20), affine=None):
  z, y, x = np.indices(shape)
  c = np.array(shape) / 2
  vol = 100.0 * (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < 64)
  affine = np.diag([1.2, 0.8, 2.0, 1.0]) if affine is None else affine
  nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(path))
  return str(path)


def _run(argv, capsys):
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for command in ("edges", "demo"):
    assert command in out


def test_edges_writes_sketch_with_input_geometry(tmp_path, capsys):
  src = _ball(tmp_path / "ball.nii.gz")
  out = tmp_path / "edges.nii.gz"
  code, stdout, _ = _run(["edges", "-i", src, "-o", str(out)], capsys)
  assert code == 0
  img = nib.load(out)
  np.testing.assert_allclose(img.affine, nib.load(src).affine)
  sketch = np.asarray(img.dataobj)
  assert sketch.shape == (24, 28, 20) and sketch.max() == pytest.approx(1.0)
  assert os.path.exists(tmp_path / "edges.png")
  assert sorted(os.listdir(tmp_path)) == ["ball.nii.gz", "edges.nii.gz", "edges.png"]


@pytest.mark.parametrize("flag,engine", [([], None), (["--engine", "numpy"],
                                                      "numpy"),
                                         (["--engine", "jax"], "jax")])
def test_edges_engine_flag(tmp_path, capsys, monkeypatch, flag, engine):
  from megan_jax import edges
  seen, real = [], edges.canny_3d
  monkeypatch.setattr(edges, "canny_3d", lambda *a, **k: seen.append(
      k.get("engine")) or real(*a, **k))
  src = _ball(tmp_path / "ball.nii.gz")
  out = tmp_path / "edges.nii.gz"
  code, _, _ = _run(["edges", "-i", src, "-o", str(out), "--no-png"] + flag,
                    capsys)
  assert code == 0 and seen == [engine]
  scaled = normalise(np.asarray(nib.load(src).dataobj))[0]
  np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj),
                                real(scaled, engine=engine))


def test_edges_sketches_the_scaled_volume_the_networks_see(tmp_path, capsys):
  # A few bright outlier voxels set the raw volume's largest gradient and
  # wiped out every real edge; training and translation sketch the volume
  # clipped at data.percentiles (or data.window), and so does megan edges.
  from megan_jax import edges
  raw = np.asarray(nib.load(_ball(tmp_path / "b.nii.gz")).dataobj).copy()
  raw[3, 3, 3:6] = 5000.0
  src = str(tmp_path / "outliers.nii.gz")
  nib.save(nib.Nifti1Image(raw, np.eye(4)), src)
  for flags, scaled in (
      ([], normalise(raw)[0]),
      (["--percentiles", "1", "99"], normalise(raw, percentiles=(1, 99))[0]),
      (["--window", "0", "50"], normalise(raw, window=(0, 50))[0])):
    out = tmp_path / "e.nii.gz"
    code, _, err = _run(["edges", "-i", src, "-o", str(out), "--no-png"]
                        + flags, capsys)
    assert code == 0, err
    got = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(got, edges.canny_3d(scaled))
    # The ball's surface is there, not only the outliers' few voxels.
    assert (got > 0).sum() > 10 * (edges.canny_3d(raw) > 0).sum()
    out.unlink()
  for flags in (["--percentiles", "50", "10"], ["--window", "5", "5"],
                ["--window", "0", "inf"]):
    code, _, err = _run(["edges", "-i", src, "-o", str(tmp_path / "f.nii"),
                         "--no-png"] + flags, capsys)
    assert code == 2 and flags[0] in err and err.count("\n") == 1
    assert not (tmp_path / "f.nii").exists()


def test_edges_with_label_mask(tmp_path, capsys):
  src = _ball(tmp_path / "ball.nii.gz")
  lab = np.zeros((24, 28, 20), np.float32)
  lab[2:6, 2:6, 2:6] = 1
  affine = nib.load(src).affine
  nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "lab.nii.gz"))
  out = tmp_path / "e.nii.gz"
  code, _, _ = _run(["edges", "-i", src, "-o", str(out), "--mask",
                     str(tmp_path / "lab.nii.gz"), "--no-png"], capsys)
  assert code == 0
  sketch = np.asarray(nib.load(out).dataobj)
  assert sketch[2, 2, 2] == 1.0 and sketch[3:5, 3:5, 3:5].min() > 0
  # The same mask in another space (mirrored; half the voxel size) would
  # land in the wrong place: refused, one line naming it.
  for name, other in (("flip.nii.gz", np.diag([-1, 1, 1, 1]) @ affine),
                      ("half.nii.gz", np.diag([.5, .5, .5, 1]) @ affine)):
    nib.save(nib.Nifti1Image(lab, other), str(tmp_path / name))
    code, _, err = _run(["edges", "-i", src, "-o", str(tmp_path / "f.nii"),
                         "--mask", str(tmp_path / name), "--no-png"], capsys)
    assert code == 2 and name in err and "affine differs" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "f.nii").exists()


@pytest.mark.parametrize("case", ["missing", "not_nifti", "constant", "same_as_input",
                                  "mask_shape", "bad_out_folder", "two_d"])
def test_bad_input_is_one_line_no_output(case, tmp_path, capsys):
  src = _ball(tmp_path / "in.nii.gz")
  out = str(tmp_path / "out.nii.gz")
  argv = ["edges", "-i", src, "-o", out]
  name = src
  if case == "missing":
    name = str(tmp_path / "nope.nii.gz")
    argv[2] = name
  elif case == "not_nifti":
    name = str(tmp_path / "x.nii.gz")
    open(name, "w").write("not an image")
    argv[2] = name
  elif case == "constant":
    name = str(tmp_path / "c.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), name)
    argv[2] = name
  elif case == "same_as_input":
    argv[4] = src
  elif case == "mask_shape":
    name = str(tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), name)
    argv += ["--mask", name]
  elif case == "bad_out_folder":
    name = str(tmp_path / "no" / "out.nii.gz")
    argv[4] = name
  elif case == "two_d":
    name = str(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), name)
    argv[2] = name
  before = sorted(os.listdir(tmp_path))
  code, _, err = _run(argv, capsys)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("megan: error:")
  assert name in lines[0]
  assert "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == before  # nothing left behind


def test_console_script_no_traceback(tmp_path):
  """The installed entry point: exit status and stderr of a real process."""
  r = subprocess.run([sys.executable, "-m", "megan_jax.cli", "edges", "-i",
                      str(tmp_path / "missing.nii"), "-o", str(tmp_path / "o.nii")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
  assert "missing.nii" in r.stderr


@pytest.mark.slow
def test_edges_on_embedded_template(tmp_path, capsys):
  out = tmp_path / "mni_edges.nii.gz"
  code, _, _ = _run(["edges", "-i", "mni152", "-o", str(out)], capsys)
  assert code == 0
  from megan_jax import data
  t1 = nib.load(data.mni152_path("t1"))
  img = nib.load(out)
  np.testing.assert_allclose(img.affine, t1.affine)
  assert img.shape == t1.shape
  assert os.path.getsize(tmp_path / "mni_edges.png") > 10_000


def test_evaluate_prints_json(tmp_path, capsys):
  import json
  rng = np.random.default_rng(0)
  target = rng.uniform(0, 100, (16, 16, 16)).astype(np.float32)
  t = tmp_path / "t.nii.gz"
  p = tmp_path / "p.nii.gz"
  nib.save(nib.Nifti1Image(target, np.eye(4)), str(t))
  nib.save(nib.Nifti1Image(target + 10.0, np.eye(4)), str(p))
  code, out, _ = _run(["evaluate", "--pred", str(p), "--target", str(t)], capsys)
  assert code == 0
  scores = json.loads(out)
  span = target.max() - target.min()
  # +10 everywhere, clipped at the top of the target's range
  assert 0 < scores["mae"] <= 10 / span + 1e-6
  assert scores["ssim"] < 1 and np.isfinite(scores["psnr"])
  code, out, _ = _run(["evaluate", "--pred", str(t), "--target", str(t)], capsys)
  def strict(c):
    raise AssertionError(f"{c} is not JSON")
  same = json.loads(out, parse_constant=strict)  # no Infinity / NaN
  assert same["mae"] == 0 and same["ssim"] == pytest.approx(1.0)
  assert same["psnr"] is None  # infinite
  bad = tmp_path / "small.nii.gz"
  nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(bad))
  code, _, err = _run(["evaluate", "--pred", str(bad), "--target", str(t)], capsys)
  assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1
  code, _, err = _run(["evaluate", "--pred", str(p), "--target", str(t),
                       "--out", str(tmp_path / "no" / "s.json")], capsys)
  assert code == 2 and "does not exist" in err
  (tmp_path / "dir.json").mkdir()
  code, _, err = _run(["evaluate", "--pred", str(p), "--target", str(t),
                       "--out", str(tmp_path / "dir.json")], capsys)
  assert code == 2 and "dir.json: is a folder" in err and ".tmp-" not in err


def test_batch_size_takes_an_integer_or_auto(capsys):
  parser = cli.build_parser()
  base = ["translate", "-i", "a.nii", "-o", "b.nii", "--workdir", "w"]
  assert parser.parse_args(base + ["--batch-size", "auto"]).batch_size == "auto"
  assert parser.parse_args(base + ["--batch-size", "12"]).batch_size == 12
  for bad in ("0", "lots"):
    with pytest.raises(SystemExit) as e:
      parser.parse_args(base + ["--batch-size", bad])
    assert e.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_evaluate_folders_matched_by_name(tmp_path, capsys):
  import json
  rng = np.random.default_rng(0)
  for d in ("pred", "target", "masks"):
    (tmp_path / d).mkdir()
  want = {}
  for i, name in enumerate(["a.nii.gz", "b.nii"]):
    target = rng.uniform(0, 100, (16, 16, 16)).astype(np.float32)
    pred = target + rng.normal(0, 5 * (i + 1), target.shape).astype(np.float32)
    mask = np.zeros(target.shape, np.float32)
    mask[2:12, 3:13, 4:14] = 1
    for d, v in (("pred", pred), ("target", target), ("masks", mask)):
      nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / d / name))
    code, out, _ = _run(["evaluate", "--pred", str(tmp_path / "pred" / name),
                         "--target", str(tmp_path / "target" / name),
                         "--mask", str(tmp_path / "masks" / name)], capsys)
    want[name] = json.loads(out)
  (tmp_path / "target" / "extra.nii.gz").write_bytes(
      (tmp_path / "target" / "a.nii.gz").read_bytes())  # unmatched: ignored
  out_json = tmp_path / "scores.json"
  code, out, _ = _run(["evaluate", "--pred", str(tmp_path / "pred"),
                       "--target", str(tmp_path / "target"), "--mask",
                       str(tmp_path / "masks"), "--out", str(out_json)],
                      capsys)
  assert code == 0
  got = json.loads(out)
  assert got == json.loads(out_json.read_text())
  assert got["count"] == 2
  rows = {os.path.basename(r["pred"]): r for r in got["subjects"]}
  for name, one in want.items():
    for k in ("ssim", "psnr", "mae", "mse"):
      assert rows[name][k] == pytest.approx(one[k])
  for k in ("ssim", "mae"):
    vals = [want[n][k] for n in want]
    assert got["mean"][k] == pytest.approx(np.mean(vals))
    assert got["std"][k] == pytest.approx(np.std(vals))
  assert want["b.nii"]["mae"] > want["a.nii.gz"]["mae"]  # noisier
  # a prediction without its target is one line naming the missing file
  nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)),
           str(tmp_path / "pred" / "c.nii.gz"))
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "pred"),
                       "--target", str(tmp_path / "target")], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert str(tmp_path / "target" / "c.nii.gz") in err
  # A mistyped --pred beside a target folder: the typo is the error, not
  # the kinds of the two ("a folder, but --pred is not").
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "prd"),
                       "--target", str(tmp_path / "target")], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert f"prediction {tmp_path / 'prd'}: no such file or folder" in err
  # The same name with the other NIfTI ending is its target (translate keeps
  # each input's ending: a .nii prediction of a .nii.gz target).
  os.remove(tmp_path / "pred" / "c.nii.gz")
  nib.save(nib.load(tmp_path / "pred" / "a.nii.gz"),
           str(tmp_path / "pred" / "a.nii"))
  os.remove(tmp_path / "pred" / "a.nii.gz")
  nib.save(nib.load(tmp_path / "masks" / "a.nii.gz"),
           str(tmp_path / "masks" / "a.nii"))
  os.remove(tmp_path / "masks" / "a.nii.gz")
  code, out, err = _run(["evaluate", "--pred", str(tmp_path / "pred"),
                         "--target", str(tmp_path / "target"), "--mask",
                         str(tmp_path / "masks")], capsys)
  assert code == 0, err
  rows = {os.path.basename(r["target"]): r for r in json.loads(out)["subjects"]}
  assert sorted(rows) == ["a.nii.gz", "b.nii"]
  assert rows["a.nii.gz"]["ssim"] == pytest.approx(want["a.nii.gz"]["ssim"])
  # Both endings of one name among the predictions: one target, not scored
  # twice (the mean would count it twice).
  nib.save(nib.load(tmp_path / "pred" / "a.nii"),
           str(tmp_path / "pred" / "a.nii.gz"))
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "pred"),
                       "--target", str(tmp_path / "target")], capsys)
  assert code == 2 and "matched by two predictions" in err, err
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "pred"),
                       "--target", str(tmp_path / "target" / "a.nii.gz")],
                      capsys)
  assert code == 2 and "not a folder" in err


def test_compile_cache_location():
  home = {"XDG_CACHE_HOME": "/c"}
  assert cli.compile_cache_dir(home) == "/c/megan_jax/xla"
  assert cli.compile_cache_dir({**home, "MEGAN_COMPILE_CACHE": "/x"}) == "/x"
  assert cli.compile_cache_dir({**home, "MEGAN_COMPILE_CACHE": "off"}) is None
  assert cli.compile_cache_dir({**home, "JAX_COMPILATION_CACHE_DIR": "/j"}) is None


def test_command_line_keeps_compiled_programs_between_runs(run_dir, tmp_path):
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION", "MEGAN_COMPILE"))}
  env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # smoke sizes
  argv = [sys.executable, "-m", "megan_jax.cli", "translate", "-i", "mni152",
          "-o", str(tmp_path / "o.nii.gz"), "--workdir", run_dir, "--plan"]
  r = subprocess.run(argv, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "WARNING" not in r.stderr, r.stderr[-2000:]  # orbax's, say
  cached = os.listdir(tmp_path / "cache" / "megan_jax" / "xla")
  assert len(cached) >= 3  # LR, HR steps and edge kernels
  off = dict(env, XDG_CACHE_HOME=str(tmp_path / "off"),
             MEGAN_COMPILE_CACHE="0")
  r = subprocess.run(argv, env=off, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and not (tmp_path / "off").exists()


def test_inputs_from_a_list_file(tmp_path):
  listing = tmp_path / "inputs.txt"
  listing.write_text("# test subjects\na.nii.gz\n\nsub dir/b.nii  \r\n\n")
  nested = tmp_path / "more.txt"
  nested.write_text(f"@{listing}\nc.nii\n")
  argv = cli.expand_arg_files(
      ["translate", "-i", f"@{nested}", "-o", "out/", "--workdir", "w"])
  args = cli.build_parser().parse_args(argv)
  assert args.input == ["a.nii.gz", "sub dir/b.nii", "c.nii"]


@pytest.mark.parametrize("content,why", [
    (None, "No such file"), ("# nothing\n\n", "no entries"),
    (b"\xff\xfe\x00bad", "not UTF-8"), ("@SELF\n", "nested")])
def test_a_bad_list_file_is_one_line_naming_it(tmp_path, capsys, content,
                                               why):
  listing = tmp_path / "inputs.txt"
  if isinstance(content, bytes):
    listing.write_bytes(content)
  elif content is not None:
    listing.write_text(content.replace("SELF", str(listing)))
  rc = cli.main(["translate", "-i", f"@{listing}", "-o", str(tmp_path / "o"),
                 "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert str(listing) in err and why in err
  assert sorted(os.listdir(tmp_path)) == ["inputs.txt"] * (
      content is not None)


def test_several_inputs_refuse_a_nifti_file_name_as_their_folder(tmp_path):
  with pytest.raises(InputError, match="NIfTI file name; give a folder"):
    cli.translate_jobs(["a.nii.gz", "b.nii.gz"], str(tmp_path / "two.nii.gz"))
  (tmp_path / "named.nii").mkdir()  # an existing folder is taken as asked
  jobs = cli.translate_jobs(["a.nii.gz", "b.nii.gz"],
                            str(tmp_path / "named.nii"))
  assert [os.path.basename(o) for _, o, _ in jobs] == ["a.nii.gz", "b.nii.gz"]


def test_a_folder_input_is_its_nifti_files(tmp_path):
  # Was "is a folder, expected a NIfTI file" (megan evaluate takes folders).
  src = tmp_path / "scans"
  src.mkdir()
  for name in ("b.nii", "a.nii.gz", ".hidden.nii", "notes.txt"):
    (src / name).write_text("")
  jobs = cli.translate_jobs([str(src)], str(tmp_path / "out"))
  assert [(os.path.basename(i), o) for i, o, _ in jobs] == [
      ("a.nii.gz", str(tmp_path / "out" / "a.nii.gz")),
      ("b.nii", str(tmp_path / "out" / "b.nii"))]
  only = tmp_path / "one"
  only.mkdir()
  (only / "c.nii").write_text("")  # one file: still into the folder OUT
  assert cli.translate_jobs([str(only)], str(tmp_path / "o2")) == [
      (str(only / "c.nii"), str(tmp_path / "o2" / "c.nii"), None)]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "sub.nii.gz").mkdir()  # a folder: not a file
  with pytest.raises(InputError, match="empty: a folder holding no .nii"):
    cli.translate_jobs([str(tmp_path / "empty")], str(tmp_path / "o3"))
  # Its masks: a folder, matched by name (by position they would pair with
  # the wrong scans wherever all share one grid).
  masks = tmp_path / "masks"
  masks.mkdir()
  for name in ("b.nii.gz", "a.nii.gz"):
    (masks / name).write_text("")
  jobs = cli.translate_jobs([str(src), "mni152"], str(tmp_path / "out"),
                            [str(masks), "m.nii"])
  assert [(os.path.basename(i), m and os.path.basename(m))
          for i, _, m in jobs] == [("a.nii.gz", "a.nii.gz"),
                                   ("b.nii", "b.nii.gz"),
                                   ("mni152", "m.nii")]
  with pytest.raises(InputError, match="input .*scans is a folder; give a "
                     "folder of masks"):
    cli.translate_jobs([str(src)], str(tmp_path / "out"), ["m.nii"])
  os.remove(masks / "b.nii.gz")
  with pytest.raises(InputError, match=r"mask .*masks/b\.nii: no such file"):
    cli.translate_jobs([str(src)], str(tmp_path / "out"), [str(masks)])


@pytest.mark.parametrize("argv,flag", [
    (["translate", "-i", "a.nii", "-o", "b.nii", "--workdir", "w", "--mask",
      "m.nii", "--mask-augment", "-1"], "--mask-augment"),
    (["edges", "-i", "a.nii", "-o", "b.nii", "--sigma", "inf"], "--sigma"),
    (["edges", "-i", "a.nii", "-o", "b.nii", "--sigma", "1e6"], "--sigma"),
    (["edges", "-i", "a.nii", "-o", "b.nii", "--sigma", "-1"], "--sigma"),
])
def test_out_of_range_options_are_usage_errors(argv, flag, capsys):
  with pytest.raises(SystemExit) as e:
    cli.build_parser().parse_args(argv)
  assert e.value.code == 2 and flag in capsys.readouterr().err


def test_edges_refuses_a_montage_path_that_is_a_folder(tmp_path, capsys):
  (tmp_path / "x.png").mkdir()
  code, _, err = _run(["edges", "-i", "mni152", "-o", str(tmp_path / "x.nii.gz")],
                      capsys)
  assert code == 2 and "x.png" in err and "folder" in err
  assert sorted(os.listdir(tmp_path)) == ["x.png"]  # no NIfTI either


def test_edges_whose_montage_cannot_be_written_leaves_no_nifti(
    tmp_path, capsys, monkeypatch):
  import errno
  from megan_jax import writers
  real = writers.encode_png

  def full(image):  # the disk fills up while the PNG is written
    real(image)
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(writers, "encode_png", full)
  out = tmp_path / "x.nii.gz"
  code, _, err = _run(["edges", "-i", "mni152", "-o", str(out)], capsys)
  assert code == 2 and "x.png" in err and "No space left" in err
  assert os.listdir(tmp_path) == []  # neither file, no temporary one


def test_edges_thresholds_above_one_are_refused(tmp_path, capsys):
  code, _, err = _run(["edges", "-i", "mni152", "-o",
                       str(tmp_path / "x.nii.gz"), "--low", "0.5",
                       "--high", "2"], capsys)
  assert code == 2 and "--high 2" in err and "< 1" in err
  assert os.listdir(tmp_path) == []


def test_edges_high_threshold_one_is_refused(tmp_path, capsys):
  # No voxel lies strictly above the largest gradient: an empty sketch.
  code, _, err = _run(["edges", "-i", "mni152", "-o",
                       str(tmp_path / "x.nii.gz"), "--high", "1"], capsys)
  assert code == 2 and "--high 1" in err and "< 1" in err
  assert os.listdir(tmp_path) == []


def test_bad_process_count_in_the_environment(monkeypatch, capsys):
  monkeypatch.setenv("MEGAN_DISTRIBUTED", "1")
  monkeypatch.setenv("MEGAN_NUM_PROCESSES", "abc")
  code, _, err = _run(["translate", "--workdir", "w", "-i", "a.nii", "-o",
                       "b.nii"], capsys)
  assert code == 2 and "MEGAN_NUM_PROCESSES='abc'" in err
  assert err.count("\n") == 1


def test_local_launcher_passes_every_input_on():
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "launcher", os.path.join(root, "launch", "translate_local_multiprocess.py"))
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  args = launcher.parse_args(
      ["--workdir", "w", "-i", "a.nii", "b.nii", "-o", "out", "--mask",
       "ma.nii", "mb.nii", "--batch-size", "auto", "--skip-existing",
       "--mask-augment", "7", "--processes", "3"])
  assert args.processes == 3  # the launcher's own
  argv = launcher.translate_argv(args)
  assert argv[:4] == ["translate", "-i", "a.nii", "b.nii"]
  assert argv[argv.index("--mask") + 1:argv.index("--mask") + 3] == [
      "ma.nii", "mb.nii"]
  got = cli.build_parser().parse_args(argv)  # what every process runs
  assert got.input == ["a.nii", "b.nii"] and got.batch_size == "auto"
  assert got.skip_existing and got.mask_augment == 7
  assert "--processes" not in argv
  # checked before any process starts: a misspelt option is a usage error
  for bad in (["--skip-exsting"], ["--batch-size", "0"]):
    with pytest.raises(SystemExit) as e:
      launcher.parse_args(["--workdir", "w", "-i", "a.nii", "-o", "o.nii",
                           *bad])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [
    ["train", "--config", "demo:smoke", "--workdir", "{f}/run"],
    ["demo", "--out", "{f}/demo"],
    ["edges", "-i", "mni152", "-o", "{f}/e.nii.gz"],
])
def test_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, argv):
  # Under a file: the folder cannot be made (NotADirectoryError), whichever
  # command finds out first.
  f = tmp_path / "plain.txt"
  f.write_text("x")
  code, _, err = _run([a.format(f=f) for a in argv], capsys)
  assert code == 2, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "plain.txt" in err
  assert sorted(os.listdir(tmp_path)) == ["plain.txt"]


def test_os_error_line_names_the_files():
  e = OSError(28, "No space left on device", "/d/out.nii.gz")
  assert cli.os_error_line(e) == "/d/out.nii.gz: No space left on device"
  e = OSError(18, "Invalid cross-device link", "/a", None, "/b")
  assert cli.os_error_line(e) == "/a -> /b: Invalid cross-device link"
  assert cli.os_error_line(OSError("odd")) == "odd"


def test_demo_steps_below_one_make_no_folder(tmp_path, capsys):
  code, _, err = _run(["demo", "--out", str(tmp_path / "d"), "--steps", "0"],
                      capsys)
  assert code == 2 and "--steps 0" in err and not (tmp_path / "d").exists()



def test_a_failed_demo_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
  # A demo that fails (a full disk, say) took away its run folder but left
  # the --out folder it had made, empty; a folder that was there stays.
  from megan_jax import demo

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device", str(tmp_path / "x"))
  monkeypatch.setattr(demo, "run", full)
  out = tmp_path / "new" / "d"
  code, _, err = _run(["demo", "--out", str(out)], capsys)
  assert code == 2 and "No space left" in err
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "kept").mkdir()
  code, _, _ = _run(["demo", "--out", str(tmp_path / "kept")], capsys)
  assert code == 2 and (tmp_path / "kept").is_dir()


def test_evaluate_names_an_empty_mask(tmp_path, capsys):
  a = np.random.default_rng(0).uniform(0, 1, (8, 9, 10)).astype(np.float32)
  for name, data in (("t.nii", a), ("p.nii", a + 0.1),
                     ("m.nii", np.zeros_like(a))):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "p.nii"),
                       "--target", str(tmp_path / "t.nii"),
                       "--mask", str(tmp_path / "m.nii")], capsys)
  assert code == 2 and f"mask {tmp_path / 'm.nii'}: selects no voxels" in err


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
  """A KeyboardInterrupt inside a command ends ``main`` with the shell's
  status for SIGINT, 130, and the one line ``megan: interrupted``."""
  def interrupted(args):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, "cmd_edges", interrupted)
  code, _, err = _run(["edges", "-i", "a.nii", "-o", str(tmp_path / "b.nii"),
                       "--no-png"], capsys)
  assert code == 130
  assert err.strip().splitlines() == ["megan: interrupted"]


def test_integer_options_accept_their_lowest_value(capsys):
  """The lowest allowed value is accepted (``--batch-size 1``,
  ``--mask-augment 0``), the one below refused with status 2."""
  parser = cli.build_parser()
  base = ["translate", "-i", "a.nii", "-o", "b.nii", "--workdir", "w",
          "--mask", "m.nii"]
  assert parser.parse_args(base + ["--batch-size", "1"]).batch_size == 1
  assert parser.parse_args(base + ["--mask-augment", "0"]).mask_augment == 0
  for flag, below in (("--batch-size", "0"), ("--mask-augment", "-1")):
    with pytest.raises(SystemExit) as e:
      parser.parse_args(base + [flag, below])
    assert e.value.code == 2 and flag in capsys.readouterr().err
  assert cli._int_at_least(5, "5") == 5
  with pytest.raises(Exception, match="must be >= 5"):
    cli._int_at_least(5, "4")


def test_config_overrides_only_for_train(tmp_path, capsys, monkeypatch):
  """``--config.FIELD=VALUE`` on another command is a usage error (status 2,
  ``<override>: config overrides are for 'megan train'``) before any work;
  on ``train`` it reaches the command as ``args.overrides``."""
  ran = []
  monkeypatch.setattr(cli, "cmd_edges", lambda args: ran.append(args) or 0)
  with pytest.raises(SystemExit) as e:
    cli.main(["edges", "-i", "a.nii", "-o", str(tmp_path / "b.nii"),
              "--config.steps=3"])
  assert e.value.code == 2 and not ran
  assert ("--config.steps=3: config overrides are for 'megan train'"
          in capsys.readouterr().err)
  monkeypatch.setattr(cli, "cmd_train", lambda args: ran.append(args) or 0)
  assert cli.main(["train", "--workdir", str(tmp_path / "w"),
                   "--config.steps=3"]) == 0
  assert ran[0].command == "train" and ran[0].overrides == ["--config.steps=3"]


@pytest.mark.parametrize("off", ["0", "off", "false", "no", "OFF", "False"])
def test_compile_cache_turned_off(off):
  """Each documented off value of MEGAN_COMPILE_CACHE (0, off, false, no; any
  case) means no cache folder: None, not a folder named after the value."""
  env = {"XDG_CACHE_HOME": "/c", "MEGAN_COMPILE_CACHE": off}
  assert cli.compile_cache_dir(env) is None


def test_evaluate_errors_name_what_is_wrong(tmp_path, capsys):
  a = np.random.default_rng(0).uniform(0, 1, (12, 13, 14)).astype(np.float32)
  for name, data in (("t.nii", a), ("p.nii", a + 0.1)):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
  base = ["evaluate", "--pred", str(tmp_path / "p.nii"), "--target",
          str(tmp_path / "t.nii")]
  # An --out that is a link to an input is that input: refused, kept.
  link = tmp_path / "link.json"
  link.symlink_to(tmp_path / "p.nii")
  before = (tmp_path / "p.nii").read_bytes()
  code, _, err = _run(base + ["--out", str(link)], capsys)
  assert code == 2 and "is an input" in err
  assert (tmp_path / "p.nii").read_bytes() == before
  # An empty --range is named as such.
  for lo, hi in (("5", "5"), ("0", "inf")):
    code, _, err = _run(base + ["--range", lo, hi], capsys)
    assert code == 2 and err.count("\n") == 1 and f"--range {lo} {hi}" in err
  # Too small for SSIM: the prediction is named (folders name no file).
  tiny = np.random.default_rng(1).uniform(0, 1, (2, 2, 2)).astype(np.float32)
  for d in ("P", "T"):
    (tmp_path / d).mkdir()
    nib.save(nib.Nifti1Image(tiny, np.eye(4)), str(tmp_path / d / "s.nii"))
  code, _, err = _run(["evaluate", "--pred", str(tmp_path / "P"), "--target",
                       str(tmp_path / "T")], capsys)
  assert code == 2 and f"prediction {tmp_path / 'P' / 's.nii'}:" in err
  # .JSON in capitals is a JSON name too.
  code, _, _ = _run(base + ["--out", str(tmp_path / "S.JSON")], capsys)
  assert code == 0 and (tmp_path / "S.JSON").exists()


def test_demo_refuses_a_run_folder_that_is_a_file(tmp_path, capsys):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "run").write_text("")
  code, _, err = _run(["demo", "--out", str(tmp_path / "d")], capsys)
  assert code == 2 and "exists and is not a folder" in err


def test_a_path_of_the_wrong_kind_is_named_so(tmp_path, capsys):
  f = tmp_path / "afile"
  f.write_text("")
  code, _, err = _run(["translate", "--workdir", str(f), "-i", str(f), "-o",
                       str(tmp_path / "o.nii")], capsys)
  assert code == 2 and f"workdir {f}: not a folder" in err
  code, _, err = _run(["train", "--config", str(tmp_path), "--workdir",
                       str(tmp_path / "w")], capsys)
  assert code == 2 and f"config {tmp_path}: not a file" in err
  from megan_jax import state as state_lib
  with pytest.raises(InputError, match=f"workdir {f}: not a folder"):
    state_lib.load_config(str(f))
