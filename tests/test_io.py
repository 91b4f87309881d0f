"""NIfTI I/O: geometry kept, atomic writes, one-line errors for bad files."""
import os

import nibabel as nib
import numpy as np
import pytest

from megan_jax import io
from megan_jax.errors import InputError


def _affine():
  a = np.diag([1.5, 0.9, 2.0, 1.0])
  a[:3, 3] = [-10.0, 20.5, 3.25]
  return a


def _write(path, data, affine=None, dtype=np.int16):
  img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine if affine is not None else _affine())
  img.header["descrip"] = b"megan test"
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, str(path))
  return str(path)


def test_roundtrip_keeps_affine_header_and_values(tmp_path):
  rng = np.random.default_rng(0)
  data = rng.integers(0, 1000, size=(7, 9, 5))
  src = _write(tmp_path / "in.nii.gz", data)
  vol = io.load_nifti(src)
  assert vol.data.dtype == np.float32 and vol.data.shape == (7, 9, 5)
  np.testing.assert_array_equal(vol.data, data)
  out = io.save_nifti(tmp_path / "out.nii.gz", vol.data * 0.5, like=vol)
  back = nib.load(out)
  np.testing.assert_allclose(back.affine, _affine())
  assert back.header.get_data_dtype() == np.float32
  assert back.header["descrip"].tobytes().startswith(b"megan test")
  assert back.header.get_xyzt_units() == ("mm", "sec")
  np.testing.assert_allclose(np.asarray(back.dataobj), data * 0.5)
  assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_4d_single_volume_is_squeezed(tmp_path):
  src = _write(tmp_path / "in.nii", np.ones((4, 5, 6, 1)) * np.arange(6)[:, None])
  vol = io.load_nifti(src)
  assert vol.data.shape == (4, 5, 6)
  # Written back with its header, it keeps the input's shape (X, Y, Z, 1).
  out = io.save_nifti(tmp_path / "out.nii.gz", vol.data * 2, like=vol)
  back = nib.load(out)
  assert back.shape == (4, 5, 6, 1)
  np.testing.assert_array_equal(back.get_fdata()[..., 0], vol.data * 2)
  # Without an input's header (or with a 3D one) the output is 3D.
  assert nib.load(io.save_nifti(tmp_path / "plain.nii.gz", vol.data)).shape \
      == (4, 5, 6)


def _err(path, **kw):
  with pytest.raises(InputError) as e:
    io.load_nifti(path, **kw)
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg
  return msg


def test_bad_files_give_one_line_errors(tmp_path):
  assert "no such file" in _err(tmp_path / "missing.nii.gz")
  txt = tmp_path / "notes.nii.gz"
  txt.write_text("hello")
  _err(txt)
  plain = tmp_path / "plain.txt"
  plain.write_text("hello")
  assert "NIfTI" in _err(plain)
  assert "folder" in _err(tmp_path)
  loop = tmp_path / "loop.nii.gz"
  loop.symlink_to(loop)
  assert "symbolic link to nothing" in _err(loop)
  # Truncated: cut the compressed stream in half.
  full = _write(tmp_path / "full.nii.gz", np.random.default_rng(1).normal(size=(20, 20, 20)), dtype=np.float32)
  raw = open(full, "rb").read()
  trunc = tmp_path / "trunc.nii.gz"
  trunc.write_bytes(raw[: len(raw) // 2])
  _err(trunc)
  # Damaged mid-stream (bytes changed in transfer) or in the gzip trailer:
  # nibabel reads up to the last voxel without the checksum, so both
  # loaded silently (wrong voxels, or right ones from a file that says it
  # is damaged).
  for name, spots in (("mid.nii.gz", range(len(raw) // 2, len(raw) // 2 + 50)),
                      ("crc.nii.gz", [len(raw) - 6])):
    bad = bytearray(raw)
    for k in spots:
      bad[k] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(bad))
    assert "corrupt compressed data" in _err(tmp_path / name)
  # A multi-member gzip (concatenated streams, as some tools write) is fine.
  import gzip
  body = gzip.decompress(raw)
  multi = tmp_path / "multi.nii.gz"
  multi.write_bytes(gzip.compress(body[:1000]) + gzip.compress(body[1000:]))
  np.testing.assert_array_equal(io.load_nifti(multi).data,
                                io.load_nifti(full).data)
  # Bytes after the last stream that start no other (padding; nibabel
  # ignores them): the voxels are whole, the file is taken.
  for tail in (b"\0" * 64, b"trailing bytes"):
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(raw + tail)
    np.testing.assert_array_equal(io.load_nifti(padded).data,
                                  io.load_nifti(full).data)
  # A second stream cut short is damage, though the voxels read whole.
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(gzip.compress(body[:1000]) + gzip.compress(body[1000:])[:-3])
  assert "corrupt compressed data" in _err(cut)
  # Uncompressed and truncated: the header is fine, the data are short.
  full2 = _write(tmp_path / "full2.nii", np.ones((20, 20, 20)), dtype=np.float32)
  raw2 = open(full2, "rb").read()
  trunc2 = tmp_path / "trunc2.nii"
  trunc2.write_bytes(raw2[: len(raw2) - 1000])
  _err(trunc2)
  assert "3D" in _err(_write(tmp_path / "two.nii", np.ones((4, 4))))
  assert "3D" in _err(_write(tmp_path / "four.nii", np.ones((4, 4, 4, 2))))
  nan = np.ones((4, 4, 4), np.float32)
  nan[1, 2, 3] = np.nan
  assert "non-finite" in _err(_write(tmp_path / "nan.nii", nan, dtype=np.float32))
  const = _write(tmp_path / "const.nii", np.full((4, 4, 4), 7))
  io.load_nifti(const)  # allowed by default (masks may be empty)
  assert "constant" in _err(const, allow_constant=False)


def test_save_never_overwrites_input_and_checks_folder(tmp_path):
  src = _write(tmp_path / "in.nii.gz", np.arange(27).reshape(3, 3, 3))
  vol = io.load_nifti(src)
  before = open(src, "rb").read()
  with pytest.raises(InputError, match="input"):
    io.save_nifti(src, vol.data, like=vol)
  with pytest.raises(InputError, match="input"):  # same file by another name
    io.save_nifti(os.path.join(tmp_path, ".", "in.nii.gz"), vol.data, like=vol)
  assert open(src, "rb").read() == before
  with pytest.raises(InputError, match="does not exist"):
    io.save_nifti(tmp_path / "nope" / "out.nii.gz", vol.data, like=vol)
  with pytest.raises(InputError, match=".nii"):
    io.save_nifti(tmp_path / "out.txt", vol.data, like=vol)


def test_unwritable_folder(tmp_path, monkeypatch):
  # Tests run as root in CI, where chmod cannot deny a write: ask os.access.
  monkeypatch.setattr(io.os, "access", lambda p, mode: False)
  with pytest.raises(InputError, match="not writable"):
    io.check_output_path(tmp_path / "x.nii.gz")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  def boom(img, path):
    open(path, "wb").write(b"half")
    raise RuntimeError("disk full")
  monkeypatch.setattr(io.nib, "save", boom)
  with pytest.raises(RuntimeError):
    io.save_nifti(tmp_path / "out.nii.gz", np.zeros((2, 2, 2)))
  assert os.listdir(tmp_path) == []

  def short(img, path):  # what a full disk looks like from gzip
    open(path, "wb").write(b"half")
    raise OSError("4096 requested and 4064 written")
  monkeypatch.setattr(io.nib, "save", short)
  with pytest.raises(OSError, match="could not be written") as e:
    io.save_nifti(tmp_path / "out.nii.gz", np.zeros((2, 2, 2)))
  assert e.value.filename == str(tmp_path / "out.nii.gz")
  assert os.listdir(tmp_path) == []


def test_write_text_is_atomic(tmp_path):
  path = tmp_path / "out.json"
  assert io.write_text(path, '{"a": 1}') == str(path)
  assert path.read_text() == '{"a": 1}'
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp left


def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path):
  """SIGKILL leaves atomic_path's temporary file (a 512³ output takes
  seconds to write: a killed translation left a 4-27 MB file each time,
  for good). Its writer holds a lock on it while writing; the next write
  of the same file removes one nobody holds. One held (a writer at work,
  in another container, say: process ids would not tell) stays, as does
  another file's."""
  import fcntl
  import subprocess
  import sys
  target = tmp_path / "out.nii.gz"
  prefix = io.temp_prefix(target)
  assert prefix.startswith(".tmp-")  # hidden: never read as an input
  stale = tmp_path / f"{prefix}abc.nii.gz"
  held = tmp_path / f"{prefix}def.nii.gz"
  other = tmp_path / f"{io.temp_prefix(tmp_path / 'b.nii.gz')}g.nii.gz"
  for f in (stale, held, other):
    f.write_bytes(b"half")
  # A writer in another process, at work: it holds its file's lock.
  writer = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys; "
       f"fd = os.open({str(held)!r}, os.O_RDONLY); "
       "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
       "sys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == "locked"
    with io.atomic_path(target) as tmp:
      assert os.path.basename(tmp).startswith(prefix)
      fd = os.open(tmp, os.O_RDONLY)  # this write's own file is held too
      with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os.close(fd)
      open(tmp, "w").write("whole")
  finally:
    writer.communicate("")
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["out.nii.gz", held.name, other.name])
  with io.atomic_path(target) as tmp:  # its writer gone: removed
    open(tmp, "w").write("again")
  assert sorted(os.listdir(tmp_path)) == sorted(["out.nii.gz", other.name])


def test_a_full_disk_names_the_output_not_the_temporary_file(tmp_path):
  # What a full disk raises from a write names no file (or the temporary
  # one): the error names the output, and the temporary file is gone.
  import errno
  for filename in (None, "tmp"):
    target = tmp_path / "scores.json"
    with pytest.raises(OSError, match="No space left") as e:
      with io.atomic_path(target) as tmp:
        open(tmp, "w").write("half")
        raise OSError(errno.ENOSPC, "No space left on device",
                      *([tmp] if filename else []))
    assert e.value.filename == str(target)
    assert e.value.errno == errno.ENOSPC
    assert ".tmp-" not in str(e.value)
    assert os.listdir(tmp_path) == []
  # numpy's short write (an OSError with no errno, "N requested and M
  # written") on a full filesystem says the disk is full.
  class Full:
    f_bavail = 0
  real = os.statvfs
  os.statvfs = lambda path: Full()
  try:
    with pytest.raises(OSError, match=r"could not be written \(No space "
                       r"left on device: 400 requested and 96 written\)"):
      with io.atomic_path(tmp_path / "a.npy"):
        raise OSError("400 requested and 96 written")
  finally:
    os.statvfs = real
  with pytest.raises(OSError, match=r"written \(400 requested and 96 "
                     r"written\)"):  # room left: numpy's words alone
    with io.atomic_path(tmp_path / "a.npy"):
      raise OSError("400 requested and 96 written")
  # An error about another file keeps its own name.
  with pytest.raises(OSError) as e:
    with io.atomic_path(tmp_path / "x.json"):
      open(tmp_path / "missing" / "y")
  assert e.value.filename == str(tmp_path / "missing" / "y")


def _patched_header(src, dst, **fields):
  """``src`` rewritten with raw header fields changed (what other tools or
  broken writers leave), bypassing nibabel's checks on saving."""
  raw = bytearray(open(src, "rb").read())
  hdr = nib.Nifti1Header.from_fileobj(open(src, "rb"), check=False)
  for k, v in fields.items():
    hdr[k] = v
  raw[:348] = hdr.binaryblock
  open(dst, "wb").write(bytes(raw))
  return str(dst)


def test_odd_voxels_and_broken_headers_give_one_line_errors(tmp_path):
  rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
  p = tmp_path / "rgb.nii"
  nib.save(nib.Nifti1Image(rgb, _affine()), str(p))
  assert "RGB" in _err(p)
  p = tmp_path / "complex.nii"
  nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), _affine()),
           str(p))
  assert "complex" in _err(p)
  good = _write(tmp_path / "good.nii", np.ones((4, 5, 6)), dtype=np.float32)
  for name, fields in (("inter.nii", {"scl_slope": 1.0, "scl_inter": np.inf}),
                       ("negdim.nii", {"dim": [3, 4, -5, 6, 1, 1, 1, 1]}),
                       ("dim0.nii", {"dim": [9, 4, 5, 6, 1, 1, 1, 1]})):
    msg = _err(_patched_header(good, tmp_path / name, **fields))
    assert name in msg
  # Affines (sforms) that place no voxel grid in space.
  def sform(name, rows):
    return _patched_header(good, tmp_path / name, qform_code=0, sform_code=1,
                           srow_x=rows[0], srow_y=rows[1], srow_z=rows[2])
  assert "singular" in _err(sform("z.nii", np.zeros((3, 4))))
  flat = _affine()[:3].copy()
  flat[:, 1] = flat[:, 0]  # two axes along one direction
  assert "singular" in _err(sform("f.nii", flat))
  nan = _affine()[:3].copy()
  nan[0, 3] = np.nan
  assert "non-finite" in _err(sform("n.nii", nan))
  with pytest.raises(InputError, match="singular"):
    io.nifti_geometry(str(tmp_path / "z.nii"))


def test_output_header_drops_the_inputs_display_window_and_intent(tmp_path):
  img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), _affine())
  img.header["cal_min"], img.header["cal_max"] = 0.0, 1.0
  img.header.set_intent("label")
  nib.save(img, str(tmp_path / "lab.nii.gz"))
  vol = io.load_nifti(str(tmp_path / "lab.nii.gz"))
  out = io.save_nifti(str(tmp_path / "o.nii.gz"), vol.data * 200.0, like=vol)
  hdr = nib.load(out).header
  assert float(hdr["cal_min"]) == 0.0 and float(hdr["cal_max"]) == 0.0
  assert hdr.get_intent()[0] == "none"
  assert hdr["descrip"] == vol.header["descrip"]  # the rest is kept


def test_check_same_grid():
  a = _affine()
  io.check_same_grid("m", (4, 5, 6), a + 1e-4, (4, 5, 6), a)  # float noise
  io.check_same_grid("m", (4, 5, 6), None, (4, 5, 6), a)  # array: shape only
  with pytest.raises(InputError, match="m: shape 4x5x7 differs"):
    io.check_same_grid("m", (4, 5, 7), a, (4, 5, 6), a)
  shifted = a.copy()
  shifted[0, 3] += 0.5  # a third of a voxel
  with pytest.raises(InputError, match="m: affine differs from the input's"):
    io.check_same_grid("m", (4, 5, 6), shifted, (4, 5, 6), a, ref="input")


def test_check_same_grid_tolerance_is_a_hundredth_of_a_voxel():
  """Affines may differ by up to 1 % of the smallest voxel side (float
  noise, rounding in a header), not more: a shift of 0.005 voxel is the
  same grid, one of 0.012 or 0.05 voxel is not. Measured in the smallest
  side (0.9 mm of _affine's 1.5 x 0.9 x 2.0), along every axis alike."""
  a = _affine()
  side = 0.9
  for axis in range(3):
    for fraction, same in ((0.005, True), (0.008, True), (0.012, False),
                           (0.05, False)):
      for sign in (1, -1):
        moved = a.copy()
        moved[axis, 3] += sign * fraction * side
        if same:
          io.check_same_grid("m", (4, 5, 6), moved, (4, 5, 6), a)
        else:
          with pytest.raises(InputError, match="m: affine differs"):
            io.check_same_grid("m", (4, 5, 6), moved, (4, 5, 6), a)
  # The rotation / scaling part counts too: 5 % of a voxel on a direction.
  tilted = a.copy()
  tilted[1, 0] += 0.05 * side
  with pytest.raises(InputError, match="m: affine differs"):
    io.check_same_grid("m", (4, 5, 6), tilted, (4, 5, 6), a)


def test_check_same_grid_counts_the_far_corners():
  """A voxel size 0.5 % off or a turn of 0.5 degrees moves each affine
  entry by under 1 % of a voxel, but the far voxels of a 512x512x100 CT
  grid by several voxels: refused, naming where; float noise (1e-6
  relative, a header's float32 rounding) at that size still passes."""
  a = np.diag([0.7, 0.7, 2.5, 1.0])
  shape = (512, 512, 100)
  bigger = a.copy()
  bigger[0, 0] = bigger[1, 1] = 0.7035
  turn = np.deg2rad(0.5)
  turned = np.eye(4)
  turned[:2, :2] = [[np.cos(turn), -np.sin(turn)],
                    [np.sin(turn), np.cos(turn)]]
  for other in (bigger, turned @ a):
    assert np.abs(other - a).max() <= 0.01 * 0.7  # entries within 1 %
    with pytest.raises(InputError, match=r"m: affine differs .* voxel "
                       r"\(511, 511, 0\)"):
      io.check_same_grid("m", shape, other, shape, a)
  io.check_same_grid("m", shape, a * (1 + 1e-6), shape, a)
  # One header's two forms of one oblique grid: the qform (a float32
  # quaternion) and the sform differ by 0.28 voxel at a CT grid's far
  # corner (a tool that reads the other form wrote the mask): the same grid.
  rng = np.random.default_rng(3)
  for _ in range(20):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                  [-axis[1], axis[0], 0]])
    tilt = np.deg2rad(rng.uniform(0.02, 3.0))
    turn = np.eye(3) + np.sin(tilt) * k + (1 - np.cos(tilt)) * k @ k
    ct = np.eye(4)
    ct[:3, :3] = turn @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([0.488, 0.488, 1])
    ct[:3, 3] = [125.0, 140.0, -310.0]
    header = nib.Nifti1Header()
    header.set_qform(ct, 1)
    big = (512, 512, 300)
    io.check_same_grid("m", big, header.get_qform(), big, ct)
  one = (1, 5, 6)  # an axis of one voxel: its column still compared
  thick = a.copy()
  thick[0, 0] = 0.8
  with pytest.raises(InputError, match="m: affine differs"):
    io.check_same_grid("m", one, thick, one, a)


def test_make_folder_makes_or_names_why_not(tmp_path):
  new = tmp_path / "a" / "b"
  assert io.make_folder(new, "--out") == [str(tmp_path / "a"), str(new)]
  assert new.is_dir() and io.make_folder(new) == []
  assert os.listdir(new) == []  # its probe file is gone
  io.remove_empty_folders([str(tmp_path / "a"), str(new)])  # deepest first
  assert not (tmp_path / "a").exists()
  a_file = tmp_path / "f"
  a_file.write_text("")
  with pytest.raises(InputError, match=f"--out {a_file}: exists and is not "
                     "a folder"):
    io.make_folder(a_file, "--out")
  with pytest.raises(InputError, match=f"folder {a_file / 'x'}: Not a "
                     "directory"):
    io.make_folder(a_file / "x")


def test_make_folder_tries_a_file_and_removes_what_it_made(tmp_path,
                                                           monkeypatch):
  # Root passes os.access on any folder; only a real write tells (e.g. /sys).
  import tempfile

  def refused(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
  with pytest.raises(InputError, match="--out .*new/er: Permission denied"):
    io.make_folder(tmp_path / "new" / "er", "--out")
  assert os.listdir(tmp_path) == []  # both folders it made are gone


def test_values_beyond_float32_are_named_so_without_numpy_warnings(
    tmp_path, recwarn):
  # A float64 voxel past float32's range, and an int16 file whose scale
  # factor takes it there: both read as inf, which is not in the files
  # (the message said "NaN or inf" after two lines of numpy's warning).
  big = np.ones((4, 4, 4))
  big[1, 1, 1] = 1e39
  msg = _err(_write(tmp_path / "f64.nii", big, dtype=np.float64))
  assert "1 voxel(s) beyond float32's range (up to 1e+39" in msg
  img = nib.Nifti1Image(np.full((4, 4, 4), 300, np.int16), _affine())
  img.header.set_slope_inter(1e38, 0)
  nib.save(img, tmp_path / "scaled.nii")
  msg = _err(tmp_path / "scaled.nii")
  assert "64 voxel(s) beyond float32's range" in msg and "scl_slope" in msg
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
  # A real inf is still called that.
  inf = np.ones((4, 4, 4), np.float32)
  inf[0, 0, 0] = np.inf
  assert "non-finite" in _err(_write(tmp_path / "inf.nii", inf,
                                     dtype=np.float32))


def test_save_nifti_keeps_values_an_integer_type_cannot_hold_exactly(
    tmp_path):
  # dtype=int16 truncated [0, 0.01] floats to 0 silently; NaN or complex
  # data were written (and NaN files then refused by load_nifti).
  rng = np.random.default_rng(0)
  small = (rng.random((6, 5, 4)) / 100).astype(np.float32)
  out = io.save_nifti(tmp_path / "s.nii.gz", small, dtype=np.int16)
  back = nib.load(out)
  assert back.get_data_dtype() == np.int16
  np.testing.assert_allclose(io.load_nifti(out).data, small, atol=1e-6)
  # Whole numbers in range: written as they are, no scale factor.
  labels = rng.integers(0, 4, (6, 5, 4)).astype(np.float32)
  out = io.save_nifti(tmp_path / "l.nii.gz", labels, dtype=np.uint8)
  img = nib.load(out)
  assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
  np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
  # Out of an integer type's range: scaled, not wrapped.
  wide = np.linspace(-1e5, 1e5, 120).reshape(6, 5, 4)
  out = io.save_nifti(tmp_path / "w.nii.gz", wide, dtype=np.int16)
  np.testing.assert_allclose(io.load_nifti(out).data, wide, rtol=1e-3,
                             atol=10)
  for bad, what in ((np.where(labels > 2, np.nan, labels), "non-finite"),
                    (labels.astype(np.complex64), "real numbers")):
    with pytest.raises(ValueError, match=what):
      io.save_nifti(tmp_path / "bad.nii.gz", bad)
    assert not (tmp_path / "bad.nii.gz").exists()
  # Finite float64 values beyond float32's range were written as inf.
  for dtype, what in ((np.float32, "beyond float32's range"),
                      (np.complex64, "an integer or float type")):
    with pytest.raises(ValueError, match=what):
      io.save_nifti(tmp_path / "bad.nii.gz", np.full((3, 3, 3), 1e39),
                    dtype=dtype)
    assert not (tmp_path / "bad.nii.gz").exists()
