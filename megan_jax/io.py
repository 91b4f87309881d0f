"""NIfTI in and out (nibabel), with the affine and header kept.

The only module that knows nibabel: volumes leave it as float32 ``[D, H, W]``
arrays in the file's voxel order, with the affine and header beside them.
Every problem a user can fix becomes one ``InputError`` line naming the file.
Writes are atomic (temporary file in the target folder, then rename) and
never replace an input file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import warnings
import zlib
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np

from megan_jax.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3D image: float32 data ``[D, H, W]``, its 4×4 affine and header."""
  data: np.ndarray
  affine: np.ndarray
  header: nib.nifti1.Nifti1Header | None = None
  path: str | None = None

  def with_data(self, data: np.ndarray) -> "Volume":
    """The same geometry (affine, header) with other voxels."""
    return dataclasses.replace(self, data=data, path=None)


def is_nifti_path(path: str | os.PathLike) -> bool:
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_nifti(path: str | os.PathLike, *, allow_constant: bool = True,
               what: str = "image") -> Volume:
  """Loads a 3D NIfTI file as float32 plus affine and header.

  A 4D image holding a single volume is squeezed to 3D.

  Args:
    path: a ``.nii`` or ``.nii.gz`` file.
    allow_constant: if False, an image with a single value is an error.
    what: how the message names the file's role ("input", "mask", ...).

  Returns:
    A ``Volume``.

  Raises:
    InputError: missing, unreadable, not NIfTI, truncated or corrupt
      (a .nii.gz stream is read to its end and its checksum checked), not 3D,
      non-finite or (unless allowed) constant.
  """
  path = os.fspath(path)
  img = _open_nifti(path, what)
  _check_gzip_stream(path, f"{what} {path}")  # the first reason to give
  return from_image(img, what=what, allow_constant=allow_constant, path=path)


def _check_gzip_stream(path: str, name: str) -> None:
  """For a gzip-compressed file: an ``InputError`` unless each of its
  streams (members) reads to its end with the checksum and length right.
  nibabel stops reading at the last voxel, before the gzip trailer, so a
  file damaged in transfer (bytes changed mid-stream) loads as wrong
  voxels, silently. Bytes after the last stream that start no other
  (padding, as nibabel ignores) are let be. The price: a second
  decompression (about 1 s per 500 MB of voxels)."""
  with open(path, "rb") as f:
    if f.read(2) != b"\x1f\x8b":  # not gzip (nibabel read it, so .nii)
      return
    f.seek(0)
    try:
      stream, pending = zlib.decompressobj(wbits=31), b""  # CRC, length
      while True:
        data, pending = pending or f.read(1 << 22), b""
        if not data:
          break
        stream.decompress(data, 1 << 24)  # a bounded piece at a time
        while stream.unconsumed_tail:
          stream.decompress(stream.unconsumed_tail, 1 << 24)
        if stream.eof:  # a stream ended: another, or the end of the file
          rest = stream.unused_data or f.read(1 << 22)
          if len(rest) == 1:
            rest += f.read(1)
          if not rest.startswith(b"\x1f\x8b"):
            return  # the end, or trailing bytes that start no stream
          stream, pending = zlib.decompressobj(wbits=31), rest
      if not stream.eof:
        raise EOFError("the file ends inside a compressed stream")
    except (OSError, EOFError, zlib.error) as e:
      raise InputError(f"{name}: corrupt compressed data ({_one_line(e)}): "
                       "the file is damaged (e.g. in transfer); its voxels "
                       "cannot be trusted") from None


def nifti_geometry(path: str | os.PathLike, *, what: str = "image"
                   ) -> tuple[tuple[int, int, int], np.ndarray]:
  """A NIfTI file's 3D shape and affine from its header alone (no voxels
  read), with ``load_nifti``'s checks on the file and its shape."""
  path = os.fspath(path)
  img = _open_nifti(path, what)
  name = f"{what} {path}"
  shape = _shape_3d(img, name)[0]
  return shape, _checked_affine(img, name)


def _shape_3d(img, name: str) -> tuple[tuple[int, int, int], bool]:
  """The image's 3D shape, and whether it is 4D with one volume (squeezed)."""
  shape = tuple(int(n) for n in img.shape)
  squeeze = len(shape) == 4 and shape[3] == 1
  if squeeze:
    shape = shape[:3]
  if len(shape) != 3:
    raise InputError(f"{name}: expected a 3D image, got shape "
                     f"{'x'.join(map(str, img.shape))}")
  if min(shape) < 1:
    raise InputError(f"{name}: invalid shape {'x'.join(map(str, shape))} "
                     "in its header")
  return shape, squeeze


def _checked_affine(img, name: str) -> np.ndarray:
  """The image's affine, refused when non-finite or singular (no voxel
  grid in space: orientation and voxel sizes are undefined)."""
  try:
    affine = np.asarray(img.affine, np.float64)
  except Exception as e:  # nibabel computing it from a broken header
    raise InputError(f"{name}: invalid affine ({_one_line(e)})") from None
  m = affine[:3, :3]
  if not np.isfinite(affine).all():
    raise InputError(f"{name}: its affine has non-finite entries")
  sv = np.linalg.svd(m, compute_uv=False)
  if not sv.min() > 1e-9 * max(sv.max(), 1e-300):
    raise InputError(f"{name}: its affine is singular (a zero voxel size "
                     "or parallel axes): no voxel grid in space")
  return affine


def _open_nifti(path: str, what: str):
  """``nib.load`` with every problem one ``InputError`` line."""
  if not os.path.exists(path):
    if os.path.lexists(path):
      raise InputError(f"{what} {path}: a symbolic link to nothing (broken "
                       "or a loop)")
    raise InputError(f"{what} {path}: no such file")
  if os.path.isdir(path):
    raise InputError(f"{what} {path}: is a folder, expected a NIfTI file")
  if not os.access(path, os.R_OK):
    raise InputError(f"{what} {path}: not readable (permission denied)")
  try:
    with quiet_log("nibabel.global"):
      img = nib.load(path)
  except nib.filebasedimages.ImageFileError:
    raise InputError(f"{what} {path}: not a NIfTI image") from None
  except Exception as e:  # nibabel's many ways of refusing a header
    raise InputError(f"{what} {path}: unreadable ({_one_line(e)})") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise InputError(f"{what} {path}: not a NIfTI image (nibabel read it "
                     f"as {type(img).__name__}; only .nii and .nii.gz files "
                     "are taken)")
  return img


@contextlib.contextmanager
def quiet_log(name: str):
  """The Python logger ``name`` silent meanwhile: what a library (nibabel,
  orbax through absl) logs on stderr about a bad file, our one-line error
  says instead."""
  log = logging.getLogger(name)
  level = log.level
  log.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    log.setLevel(level)


def from_image(img, *, what: str = "image", allow_constant: bool = True,
               path: str | None = None) -> Volume:
  """A nibabel image (in memory or from a file) as a ``Volume``, with the
  checks ``load_nifti`` makes: 3D (a 4D image of one volume is squeezed),
  finite, and (unless allowed) not constant."""
  name = f"{what} {path}" if path else what
  shape, squeeze = _shape_3d(img, name)
  affine = _checked_affine(img, name)
  dtype = np.dtype(img.get_data_dtype())
  if dtype.fields is not None:
    raise InputError(f"{name}: RGB or other multi-value voxels "
                     f"({dtype}); expected one value per voxel")
  if dtype.kind == "c":
    raise InputError(f"{name}: complex voxels ({dtype}); expected real "
                     "values (e.g. the magnitude image)")
  try:
    data = _as_float32(img.dataobj)
  except MemoryError:
    raise InputError(
        f"{name}: too large to read ({'x'.join(map(str, shape))} voxels, "
        f"{np.prod(shape, dtype=np.float64) * 4 / 2**30:.1f} GiB as "
        "float32)") from None
  except Exception as e:  # truncated, corrupt, or a broken scaling
    raise InputError(
        f"{name}: truncated or corrupt data ({_one_line(e)})") from None
  if squeeze:
    data = data[..., 0]
  try:
    check_finite(data, path, what=what)
  except InputError:
    _check_float32_range(img, data, name)  # the better reason, if so
    raise
  if not allow_constant:
    check_not_constant(data, path, what=what)
  header = img.header.copy()
  return Volume(data=data, affine=affine, header=header, path=path)


# How far apart two affines may put a voxel, beyond 1 % of a voxel, per mm
# of its distance from the first voxel: what NIfTI's qform can hold of an
# oblique grid (a float32 quaternion: its sform and qform, one header's
# two forms of one grid, differ by up to 1.2e-3 mm per mm, measured over
# random obliques; near 180° turns lose the most). A voxel size 0.5 % off
# or a turn of 0.5° (5e-3, 8.7e-3 mm per mm) is another grid.
GRID_RELATIVE_TOLERANCE = 2.5e-3


def check_same_grid(name: str, shape, affine, ref_shape, ref_affine,
                    ref: str = "image") -> None:
  """Raises ``InputError`` unless ``(shape, affine)`` is the voxel grid of
  ``(ref_shape, ref_affine)``: the same shape, and every voxel centre
  within 1 % of a voxel (the smallest side), plus
  ``GRID_RELATIVE_TOLERANCE`` of its distance from the first voxel, of the
  same place in the world, the grid's far corners included (a mask in
  another space, e.g. flipped, at another resolution or turned by a degree,
  would otherwise be applied silently in the wrong place); the affines'
  entries also agree to 1 % of a voxel (for axes of one voxel).
  ``affine`` None (an array) checks the shape alone."""
  shape, ref_shape = tuple(int(n) for n in shape), tuple(
      int(n) for n in ref_shape)
  if shape != ref_shape:
    raise InputError(f"{name}: shape {'x'.join(map(str, shape))} differs "
                     f"from the {ref}'s {'x'.join(map(str, ref_shape))}")
  if affine is None or ref_affine is None:
    return
  a = np.asarray(affine, np.float64)[:3]
  b = np.asarray(ref_affine, np.float64)[:3]
  voxel = float(np.linalg.norm(b[:, :3], axis=0).min())
  # The grid's 8 corner voxels: an affine map's largest move is at one.
  corners = np.array(np.meshgrid(*[(0, max(n - 1, 0)) for n in shape],
                                 indexing="ij")).reshape(3, -1)
  moved = np.linalg.norm((a - b) @ np.vstack(
      [corners, np.ones(corners.shape[1])]), axis=0)
  allowed = (0.01 * voxel + GRID_RELATIVE_TOLERANCE
             * np.linalg.norm(b[:, :3] @ corners, axis=0))
  worst = int(np.argmax(moved - allowed))
  entries = float(np.abs(a - b).max())
  if not (moved <= allowed).all() or not entries <= 0.01 * voxel:
    if (moved <= allowed).all():
      where = f"its voxel axes differ by up to {entries:.3g} mm"
    else:
      where = (f"voxels up to {moved[worst]:.3g} mm apart, "
               f"{moved[worst] / voxel:.2g} voxel, at voxel "
               f"{tuple(int(i) for i in corners[:, worst])}")
    raise InputError(
        f"{name}: affine differs from the {ref}'s ({where}; it must be "
        f"on the {ref}'s voxel grid: same orientation, voxel size and "
        "origin)")


def _as_float32(dataobj) -> np.ndarray:
  """The voxels (scaled) as float32; values beyond its range become inf
  silently (`_check_float32_range` says so, not numpy's warning)."""
  with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.asarray(dataobj, dtype=np.float32)


def _check_float32_range(img, data: np.ndarray, name: str) -> None:
  """Where ``data`` (float32) has infinities its file does not: an
  ``InputError`` saying the values are beyond float32's range."""
  try:
    with np.errstate(over="ignore", invalid="ignore"):
      raw = np.asarray(img.dataobj, dtype=np.float64)
  except Exception:  # too large to read twice, say: the first error stands
    return
  raw = raw.reshape(data.shape)
  over = np.isinf(data) & np.isfinite(raw)
  if over.any():
    big = float(np.abs(raw[over]).max())
    raise InputError(
        f"{name}: {int(over.sum())} voxel(s) beyond float32's range "
        f"(up to {big:.3g}; float32 ends at {float(np.finfo(np.float32).max):.3g}"
        "): rescale the image (or its scl_slope)")


def check_finite(data: np.ndarray, path: str | None, *, what: str = "image"):
  bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
  if bad:
    name = f"{what} {path}" if path else what
    raise InputError(f"{name}: {bad} non-finite voxel(s) (NaN or inf)")


def check_not_constant(data: np.ndarray, path: str | None, *,
                       what: str = "image"):
  name = f"{what} {path}" if path else what
  if data.size == 0:
    raise InputError(f"{name}: empty (shape {tuple(data.shape)})")
  if float(data.min()) == float(data.max()):
    value = float(data.flat[0])
    raise InputError(f"{name}: constant image (every voxel is "
                     f"{value:g}): no anatomy in it")


def check_output_path(out: str | os.PathLike,
                      inputs: Iterable[str | os.PathLike | None] = ()):
  """Checks ``out`` is a NIfTI path in a writable folder and is no input."""
  out = os.fspath(out)
  if not is_nifti_path(out):
    raise InputError(f"output {out}: name must end in .nii or .nii.gz")
  if os.path.isdir(out):
    raise InputError(f"output {out}: is a folder")
  for inp in inputs:
    if inp is None:
      continue
    if same_file(out, os.fspath(inp)):
      raise InputError(f"output {out}: is the input file {inp}; "
                       "refusing to overwrite an input")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise InputError(f"output {out}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise InputError(f"output {out}: folder {folder} is not writable")


def same_file(a: str, b: str) -> bool:
  """Whether paths ``a`` and ``b`` name one file (links followed; by path
  if either does not exist yet)."""
  if os.path.exists(a) and os.path.exists(b):
    return os.path.samefile(a, b)
  return os.path.abspath(a) == os.path.abspath(b)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None
                ) -> Iterator[str]:
  """Yields a temporary path beside ``path``; renames it to ``path`` on success.

  On any exception the temporary file is removed, so nothing half-written is
  left behind (a process killed outright leaves it: the next write of
  ``path`` removes it, `temp_prefix`); an ``OSError`` naming no file or
  the temporary one (a full disk, say) is raised again naming ``path``.
  ``suffix`` defaults to the target's (``.nii.gz``, ``.png``), which lets
  writers pick the format from the name.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if suffix is None:
    base = os.path.basename(path)
    suffix = ".nii.gz" if base.lower().endswith(".nii.gz") else (
        os.path.splitext(base)[1])
  prefix = temp_prefix(path)
  _remove_abandoned_temps(folder, prefix)
  try:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
  except OSError as e:  # no such folder, no permission, no inode left, ...
    raise OSError(e.errno, f"could not be written ({e.strerror or e})",
                  path) from None
  try:
    _lock(fd, block=True)  # held while this process writes it: in use
    yield tmp
    # mkstemp makes the file private (0600); give it the usual permissions.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename in (None, tmp):
      reason = e.strerror or _one_line(e)  # str(e) names the temporary file
      if e.errno is None and _disk_full(folder):  # numpy's short write
        reason = f"No space left on device: {reason}"
      raise OSError(e.errno, f"could not be written ({reason})",
                    path) from None
    raise
  finally:
    os.close(fd)


def _disk_full(folder: str) -> bool:
  """Whether ``folder``'s filesystem has no block left for this user."""
  try:
    return os.statvfs(folder).f_bavail == 0
  except OSError:
    return False


TEMP_PREFIX = ".tmp-"  # hidden: no folder of inputs takes them as volumes


def temp_prefix(path: str | os.PathLike) -> str:
  """The start of `atomic_path`'s temporary names for ``path``:
  ``.tmp-<digest of the file name>-``. The writer holds an exclusive
  ``flock`` on its file while it writes; a process killed outright (no
  clean-up) leaves the file, unlocked, and the next write of ``path``
  removes it (`_remove_abandoned_temps`). Locks, not process ids: a
  process of another pid namespace (a container) sharing the folder is
  seen as running."""
  name = os.path.basename(os.fspath(path)).encode()
  return f"{TEMP_PREFIX}{hashlib.sha1(name).hexdigest()[:8]}-"


def _lock(fd: int, block: bool) -> bool:
  """An exclusive ``flock`` on ``fd``: whether it was had (False where it is
  held elsewhere, or where the filesystem has no locks)."""
  import fcntl
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
  except OSError:
    return False
  return True


def _remove_abandoned_temps(folder: str, prefix: str) -> None:
  """Removes the files in ``folder`` named ``prefix...`` that no process
  holds locked (their writers were killed); where a file cannot be locked
  (held, or no locks on this filesystem) it stays."""
  try:
    names = [n for n in os.listdir(folder) if n.startswith(prefix)]
  except OSError:
    return
  for name in names:
    path = os.path.join(folder, name)
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      if _lock(fd, block=False):
        with contextlib.suppress(OSError):
          os.remove(path)
    finally:
      os.close(fd)


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows
  (``os.umask`` sets it for every thread, e.g. orbax's writers, meanwhile)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


def save_nifti(path: str | os.PathLike, data: np.ndarray,
               affine: np.ndarray | None = None,
               header: nib.nifti1.Nifti1Header | None = None, *,
               like: Volume | None = None,
               inputs: Iterable[str | os.PathLike | None] = (),
               dtype=np.float32) -> str:
  """Writes ``data`` as NIfTI atomically, keeping an input's affine and header.

  Args:
    path: target ``.nii`` / ``.nii.gz``.
    data: the 3D array.
    affine, header: geometry to keep (default: ``like``'s).
    like: a ``Volume`` whose affine and header to keep.
    inputs: paths that must not be overwritten (``like.path`` is added).
    dtype: on-disk data type; the header's data type is updated to it,
      everything else (qform/sform codes, units, description, ...) is
      kept. Values it holds exactly (whole numbers in an integer type's
      range, anything in a float type) are written as they are; others get
      the scale factor nibabel picks (``scl_slope``/``scl_inter``), never
      a silent truncation.

  Raises:
    ValueError: for data that are not 3D, not real numbers or not finite
      (also once in ``dtype``), or a ``dtype`` that is not a real number
      type.

  Returns:
    ``path``.
  """
  path = os.fspath(path)
  inputs = list(inputs)
  if like is not None:
    affine = like.affine if affine is None else affine
    header = like.header if header is None else header
    inputs.append(like.path)
  check_output_path(path, inputs)
  if affine is None:
    affine = np.eye(4)
  data = np.asarray(data)
  if data.ndim != 3:
    raise ValueError(f"save_nifti expects a 3D array, got shape {data.shape}")
  if data.dtype.kind not in "biuf":
    raise ValueError(f"save_nifti expects real numbers, got dtype "
                     f"{data.dtype}")
  if data.dtype.kind == "f" and not np.isfinite(data).all():
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise ValueError(f"save_nifti: {path}: {bad} non-finite value(s) (NaN "
                     "or inf) in the data; load_nifti would refuse the file")
  dtype = np.dtype(dtype)
  if dtype.kind not in "iuf":
    raise ValueError(f"save_nifti: {path}: dtype {dtype}: an integer or "
                     "float type")
  if (dtype.kind == "f" and data.size and data.dtype.kind == "f"
      and float(np.abs(data).max()) > float(np.finfo(dtype).max)):
    raise ValueError(f"save_nifti: {path}: values up to "
                     f"{float(np.abs(data).max()):g} beyond {dtype}'s range "
                     "(they would be written as inf, which load_nifti "
                     "refuses)")
  img = output_image(data, affine, header, dtype)
  with atomic_path(path) as tmp:  # a full disk, say, names ``path``
    nib.save(img, tmp)
  return path


def output_image(data: np.ndarray, affine, header=None,
                 dtype=np.float32):
  """The NIfTI image `save_nifti` writes (no checks): ``data`` (3D) with
  ``affine`` and a copy of ``header`` (NIfTI-2 stays NIfTI-2), its data
  type set to ``dtype`` (scaled only where ``dtype`` cannot hold the values
  exactly), its display window and intent unset; a 4D header of one volume
  keeps the data 4D. `infer.Translator.translate` returns it for an image
  in memory."""
  data = np.asarray(data)
  dtype = np.dtype(dtype)
  exact = (dtype.kind == "f" or data.size == 0 or (
      dtype.kind in "iu" and bool(np.all(np.mod(data, 1) == 0))
      and np.iinfo(dtype).min <= data.min()
      and data.max() <= np.iinfo(dtype).max))
  if header is not None and isinstance(header, nib.Nifti2Header):
    cls = nib.Nifti2Image
  else:
    cls = nib.Nifti1Image
  header = header.copy() if header is not None else None
  if header is not None:
    kept = tuple(header.get_data_shape())
    if kept[:3] == data.shape and set(kept[3:]) == {1}:
      data = data.reshape(kept)  # a 4D input with one volume stays 4D
    elif len(kept) != 3:
      header.set_data_shape(data.shape)
  img = cls(data.astype(dtype if exact else np.float64, copy=False), affine,
            header)
  img.header.set_data_dtype(dtype)
  # Exact: no scaling. Else nibabel picks one that spans the type's range.
  img.header.set_slope_inter(*((1.0, 0.0) if exact else (np.nan, np.nan)))
  # The input's display window and meaning (e.g. a label intent) are not the
  # output's: unset them (0 = use the data's range; no intent).
  img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
  img.header.set_intent("none")
  return img


def make_folder(folder: str | os.PathLike, what: str = "folder"
                ) -> list[str]:
  """Makes ``folder`` (and missing parents) and checks that a file can be
  written there, before any work that ends by writing there; an
  ``InputError`` ``"{what} {folder}: why"`` if not (the folders the failed
  check made are removed). Returns the folders it made, outermost first
  (`remove_empty_folders` takes them away again after a failure)."""
  given = os.fspath(folder)
  folder = os.path.abspath(given)
  made, up = [], folder
  while not os.path.exists(up):
    made.insert(0, up)
    up = os.path.dirname(up)
  try:
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise NotADirectoryError(0, "exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder):
      pass
  except OSError as e:
    remove_empty_folders(made)
    raise InputError(f"{what} {given}: {e.strerror or e}") from None
  return made


def remove_empty_folders(folders: Iterable[str]) -> None:
  """Removes those of ``folders`` that exist and are empty, deepest first
  (so a parent emptied by its child's removal goes too)."""
  for f in sorted(folders, key=lambda f: f.count(os.sep), reverse=True):
    with contextlib.suppress(OSError):
      if os.path.isdir(f) and not os.listdir(f):
        os.rmdir(f)


def write_text(path: str | os.PathLike, text: str) -> str:
  """Writes ``text`` to ``path`` atomically (`atomic_path`); returns the path."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
  return os.fspath(path)


def read_list_file(path: str | os.PathLike) -> list[str]:
  """The entries of a text list file (training data, ``megan translate -i
  @LIST``): one per line, surrounding blanks stripped, blank lines and
  ``#`` comments skipped, a UTF-8 BOM ignored. Raises ``OSError`` and
  ``UnicodeDecodeError`` for the caller to word."""
  with open(path, encoding="utf-8-sig") as f:  # a BOM is no entry
    lines = [line.strip() for line in f]
  return [line for line in lines if line and not line.startswith("#")]


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text[:200]
