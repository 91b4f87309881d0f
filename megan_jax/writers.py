"""Metric writers: TensorBoard event files, JSON lines and PNG montages.

The interface mirrors CLU's ``MetricWriter`` (``write_scalars(step, dict)``,
``write_images``, ``flush``, ``close``) without depending on CLU, TensorFlow
or TensorBoard: `SummaryWriter` encodes TensorBoard's event files by hand
(TFRecord framing around ``Event`` protocol buffers), so ``tensorboard
--logdir`` reads them, and `JsonlWriter` writes one JSON object per line for
anyone with a text editor, ``jq`` or pandas. `montage` draws the three
orthogonal centre slices of a few volumes, for a PNG on disk or an image
summary.

Only host-side numpy, PIL and matplotlib here; nothing runs under jit.
"""
import abc
import io
import itertools
import json
import os
import socket
import struct
import time
from typing import Any, Mapping, Sequence

import numpy as np

from megan_jax.errors import InputError

Scalar = Any  # a Python number, a numpy scalar or a 0-d (jax) array


class MetricWriter(abc.ABC):
  """Writes scalars and images per training step (CLU's interface)."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Writes ``{tag: value}`` scalars for ``step``."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes ``{tag: image}`` for ``step``.

    Images are ``[H, W]``, ``[H, W, C]`` or a batch ``[N, H, W, C]`` with C
    in {1, 3, 4}; uint8, or floats in [0, 1].
    """

  def resume_from(self, step: int) -> None:
    """Marks that the run goes on from ``step`` (a checkpoint): what an
    earlier run, killed after that checkpoint, wrote for later steps is
    dropped, since those steps are written again. Default: nothing to do."""

  def flush(self) -> None:
    """Makes everything written so far visible on disk."""

  def close(self) -> None:
    """Flushes and releases files; the writer is not used afterwards."""
    self.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


# ---------------------------------------------------------------------------
# CRC32C and TFRecord framing.
# ---------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Castagnoli, bit-reversed
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it.

  Pure Python, table driven: a few MB/s, plenty for scalars and PNG images.
  """
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits, add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of length, data, masked CRC of data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# ---------------------------------------------------------------------------
# Protocol buffer encoding of tensorflow/core/util/event.proto and
# tensorflow/core/framework/summary.proto (only the fields written here).
# ---------------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64s: ten bytes of two's complement
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _int_field(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(value))


def _bytes_field(field: int, value: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(value)) + value


def _double_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float_field(field: int, value: float) -> bytes:
  if abs(value) > _FLOAT32_MAX and value == value:  # beyond float32: ±inf,
    value = float("inf") if value > 0 else float("-inf")  # as a cast would
  return _key(field, _FIXED32) + struct.pack("<f", value)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           summary: bytes | None = None,
           session_log: bytes | None = None) -> bytes:
  """An ``Event``: wall_time = 1, step = 2, file_version = 3, summary = 5,
  session_log = 7."""
  out = _double_field(1, wall_time) + _int_field(2, step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  if session_log is not None:
    out += _bytes_field(7, session_log)
  return out


SESSION_START = 1  # SessionLog.status START


def _scalar_value(tag: str, value: float) -> bytes:
  """A ``Summary.Value``: tag = 1, simple_value = 2 (float)."""
  return _bytes_field(1, tag.encode()) + _float_field(2, value)


def _image_value(tag: str, png: bytes, height: int, width: int,
                 colorspace: int) -> bytes:
  """A ``Summary.Value`` with image = 4: ``Summary.Image`` fields 1 to 4."""
  image = (_int_field(1, height) + _int_field(2, width)
           + _int_field(3, colorspace) + _bytes_field(4, png))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


def _summary(values: Sequence[bytes]) -> bytes:
  """A ``Summary``: repeated value = 1."""
  return b"".join(_bytes_field(1, v) for v in values)


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


def _as_uint8_images(tag: str, image: np.ndarray) -> list[np.ndarray]:
  """``image`` as a list of ``[H, W, C]`` uint8 arrays, C in {1, 3, 4}."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
    raise InputError(
        f"image {tag!r} must be [H, W], [H, W, C] or [N, H, W, C] with C in "
        f"1, 3, 4, got shape {image.shape}")
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.floating):
      raise InputError(
          f"image {tag!r} must be uint8 or float in [0, 1], got {image.dtype}")
    image = np.clip(np.nan_to_num(image), 0.0, 1.0)
    image = np.round(image * 255).astype(np.uint8)
  return list(image)


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a ``[H, W, C]`` uint8 image (C in {1, 3, 4})."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------
# Writers.
# ---------------------------------------------------------------------------

_file_counter = itertools.count()
# A SummaryWriter flushes at a write once this many seconds have passed
# since its last flush (TensorFlow's writer: every 120 s, on a thread), so a
# live TensorBoard follows a run that logs.
FLUSH_SECS = 10.0


class _FileWriter(MetricWriter):
  """A writer that owns one open file (``self._file``, ``self.path``)."""

  _file: Any = None
  path: str = ""

  def _check_open(self) -> None:
    if self._file is None:
      raise ValueError(f"write to a closed {type(self).__name__} ({self.path})")

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class SummaryWriter(_FileWriter):
  """Writes TensorBoard event files, with no TensorFlow at runtime.

  The file is ``<logdir>/events.out.tfevents.<time>.<host>.<pid>.<n>`` (the
  pid and a counter keep two writers in one second apart; both zero-padded,
  since TensorBoard reads a folder's files in name order: a counter's 10
  sorted before its 9, and a resumed run's restart came before the old
  events it drops); its first record
  is the ``brain.Event:2`` file-version event that TensorBoard expects.
  Scalars are legacy ``simple_value`` summaries, images PNG-encoded
  ``Summary.Image``s: TensorBoard shows both in its Scalars / Images tabs.
  Events reach the file within ``FLUSH_SECS`` of the next write, and at
  `flush` (training flushes before each checkpoint) and `close`.
  """

  def __init__(self, logdir: str | os.PathLike):
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}."
            f"{socket.gethostname()}.{os.getpid():07d}."
            f"{next(_file_counter):06d}")
    self.path = os.path.join(os.fspath(logdir), name)
    self._file = open(self.path, "wb")
    self._flushed = time.monotonic()
    self._write_event(_event(time.time(), 0, file_version="brain.Event:2"))
    self.flush()

  def _write_event(self, event: bytes) -> None:
    self._check_open()
    self._file.write(tfrecord(event))
    if time.monotonic() - self._flushed >= FLUSH_SECS:
      self.flush()

  def flush(self) -> None:
    super().flush()
    self._flushed = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    if not scalars:
      return
    values = [_scalar_value(tag, float(v)) for tag, v in scalars.items()]
    self._write_event(_event(time.time(), int(step), summary=_summary(values)))

  def resume_from(self, step: int) -> None:
    """A ``SessionLog`` START event at ``step + 1``, what TensorFlow writes
    when a run restarts: TensorBoard then drops the events of steps after
    ``step`` read before it (the old files')."""
    self._write_event(_event(time.time(), int(step) + 1,
                             session_log=_int_field(1, SESSION_START)))
    self.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    values = []
    for tag, image in images.items():
      batch = _as_uint8_images(tag, image)
      for i, img in enumerate(batch):
        # TF's image summaries name the members of a batch "<tag>/image/<i>";
        # a single image keeps its tag.
        name = tag if len(batch) == 1 else f"{tag}/image/{i}"
        values.append(_image_value(name, encode_png(img), img.shape[0],
                                   img.shape[1], img.shape[2]))
    if values:
      self._write_event(
          _event(time.time(), int(step), summary=_summary(values)))


class JsonlWriter(_FileWriter):
  """Appends one JSON object per `write_scalars` call to a text file.

  Each line is ``{"step": ..., "wall_time": ..., "<tag>": value, ...}``.
  Non-finite values are written as Python's ``json`` writes them (``NaN``,
  ``Infinity``), which ``json.loads`` and pandas read back; strict JSON
  parsers do not. Images are ignored (see `SummaryWriter`, `montage`). Lines
  are flushed as they are written, so a crashed run keeps its log.
  """

  def __init__(self, path: str | os.PathLike):
    folder = os.path.dirname(os.fspath(path))
    if folder:
      os.makedirs(folder, exist_ok=True)
    self.path = os.fspath(path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    self._check_open()
    record = {"step": int(step), "wall_time": time.time()}
    record.update((tag, float(v)) for tag, v in scalars.items())
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def resume_from(self, step: int) -> None:
    """Drops the lines of steps after ``step`` (the file is rewritten
    atomically)."""
    self._check_open()
    self._file.close()
    def before(line):  # a half line (a kill mid-write) goes too
      try:
        return json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):
        return False
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if before(line)]
    from megan_jax import io as mio  # `io` here is the standard library's
    mio.write_text(self.path, "".join(kept))
    self._file = open(self.path, "a", encoding="utf-8")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images  # a text log has no images


class MultiWriter(MetricWriter):
  """Forwards every call to each of several writers."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for w in self.writers:
      w.write_images(step, images)

  def resume_from(self, step: int) -> None:
    for w in self.writers:
      w.resume_from(step)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create_default_writer(logdir: str | os.PathLike) -> MultiWriter:
  """TensorBoard events in ``logdir`` and ``logdir/metrics.jsonl``."""
  return MultiWriter([
      SummaryWriter(logdir),
      JsonlWriter(os.path.join(os.fspath(logdir), "metrics.jsonl")),
  ])


# ---------------------------------------------------------------------------
# Montage of orthogonal slices.
# ---------------------------------------------------------------------------

_CELL_INCHES = 2.4
_DPI = 100


def montage(
    volumes: Mapping[str, np.ndarray],
    path: str | os.PathLike | None = None,
    *,
    slices: Sequence[int] | None = None,
    vmin: float = -1.0,
    vmax: float = 1.0,
) -> np.ndarray:
  """Draws the three orthogonal slices of each volume, one row per volume.

  Columns are the planes through the slice index on axis 0, 1 and 2. Each
  plane is shown transposed with the origin at the bottom left, the usual
  display of nibabel-ordered (RAS-like) arrays; the title names the volume,
  the axis and the index. Grey scale from ``vmin`` to ``vmax`` (the
  networks' [-1, 1] by default), the same for every panel so intensities
  compare across volumes.

  Args:
    volumes: ``{name: [D, H, W] array}``, drawn in order; the shapes may
      differ (e.g. the scales of the cascade).
    path: if given, the PNG is written there atomically (a temporary file in
      the same folder, then ``os.replace``), so a viewer never sees half a
      file.
    slices: the indices ``(i, j, k)`` of the three planes, for every volume;
      by default each volume's centre ``(D // 2, H // 2, W // 2)``.
    vmin: the intensity drawn black.
    vmax: the intensity drawn white.

  Returns:
    The figure as an ``[H, W, 3]`` uint8 RGB array (for `write_images`).
  """
  # Imported here: matplotlib costs ~0.5 s to import, and only montage
  # needs it. The object-oriented API selects no global backend.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top

  if not volumes:
    raise InputError("montage needs at least one volume, got none")
  arrays = {}
  for name, volume in volumes.items():
    volume = np.asarray(volume)
    if volume.ndim != 3 or 0 in volume.shape:
      raise InputError(
          f"montage volume {name!r} must be a non-empty 3D array, got shape "
          f"{volume.shape}")
    index = tuple(s // 2 for s in volume.shape) if slices is None else tuple(
        int(i) for i in slices)
    if len(index) != 3 or not all(
        0 <= i < s for i, s in zip(index, volume.shape)):
      raise InputError(
          f"montage slices {tuple(slices)} are outside volume {name!r} of "
          f"shape {volume.shape}")
    arrays[name] = (volume.astype(np.float32), index)

  rows = len(arrays)
  fig = Figure(figsize=(3 * _CELL_INCHES, rows * _CELL_INCHES), dpi=_DPI)
  canvas = FigureCanvasAgg(fig)
  axes = fig.subplots(rows, 3, squeeze=False)
  for row, (name, (volume, index)) in enumerate(arrays.items()):
    for axis in range(3):
      plane = np.take(volume, index[axis], axis=axis)
      ax = axes[row, axis]
      ax.imshow(plane.T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                interpolation="nearest")
      ax.set_title(f"{name}  axis {axis} = {index[axis]}", fontsize=8)
      ax.set_axis_off()
  fig.tight_layout()
  canvas.draw()
  rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()

  if path is not None:
    write_png(os.fspath(path), rgb)
  return rgb


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes an ``[H, W, 3]`` uint8 RGB array as a PNG, atomically (a
  temporary file beside ``path``, then renamed), making its folder."""
  path = os.fspath(path)
  from megan_jax import io as mio  # `io` here is the standard library's
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with mio.atomic_path(path, ".png") as tmp:
    with open(tmp, "wb") as f:
      f.write(encode_png(image))


__all__ = [
    "JsonlWriter",
    "MetricWriter",
    "MultiWriter",
    "SummaryWriter",
    "create_default_writer",
    "crc32c",
    "encode_png",
    "masked_crc32c",
    "montage",
    "tfrecord",
    "write_png",
]
