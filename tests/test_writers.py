"""Tests for megan_jax.writers: event files read back, JSON lines, montages."""
import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
from PIL import Image

from megan_jax import writers
from megan_jax.errors import InputError

# ---------------------------------------------------------------------------
# An independent reader: bitwise CRC32C and a generic protobuf wire decoder.
# ---------------------------------------------------------------------------


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c_bitwise(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path):
  """TFRecord payloads of a file, checking lengths and both CRCs."""
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked(header)
    payload = data[pos + 12:pos + 12 + length]
    assert len(payload) == length
    end = pos + 12 + length
    (payload_crc,) = struct.unpack("<I", data[end:end + 4])
    assert payload_crc == _masked(payload)
    records.append(payload)
    pos += 16 + length
  assert pos == len(data)
  return records


def _decode(message: bytes) -> dict[int, list]:
  """Protobuf wire format -> {field: [raw values]} (bytes for wire type 2)."""

  def varint(pos):
    shift = value = 0
    while True:
      byte = message[pos]
      value |= (byte & 0x7F) << shift
      pos += 1
      shift += 7
      if not byte & 0x80:
        return value, pos

  fields, pos = {}, 0
  while pos < len(message):
    key, pos = varint(pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = varint(pos)
    elif wire == 1:
      value, pos = message[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = message[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = varint(pos)
      value, pos = message[pos:pos + n], pos + n
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    fields.setdefault(field, []).append(value)
  assert pos == len(message)
  return fields


def _int64(raw: int) -> int:
  return raw - (1 << 64) if raw >= 1 << 63 else raw


def _events(logdir):
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  return [_decode(r) for r in _read_records(path)]


# ---------------------------------------------------------------------------
# CRC32C.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("data,expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    # RFC 3720, appendix B.4.
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert writers.crc32c(data) == expected
  assert _crc32c_bitwise(data) == expected


def test_masked_crc_and_record_framing():
  payload = b"some event bytes"
  crc = writers.crc32c(payload)
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert writers.masked_crc32c(payload) == (rotated + 0xA282EAD8) % 2**32
  record = writers.tfrecord(payload)
  assert len(record) == 8 + 4 + len(payload) + 4
  assert struct.unpack("<Q", record[:8])[0] == len(payload)
  assert record[12:-4] == payload


# ---------------------------------------------------------------------------
# SummaryWriter.
# ---------------------------------------------------------------------------


def test_summary_writer_round_trip(tmp_path):
  logdir = str(tmp_path / "tb")
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  gray = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
  with writers.SummaryWriter(logdir) as w:
    w.write_scalars(3, {"loss/g": 1.25, "loss/d": np.float32(-0.5)})
    w.write_scalars(2**40, {"big_step": 7})
    w.write_scalars(-1, {"negative_step": 0.0})
    w.write_images(4, {"rgb": rgb, "gray": gray})
    # finite, but beyond float32 (struct.pack raised OverflowError)
    w.write_scalars(5, {"huge": 1e39, "tiny": -2.0 ** 200, "nan": math.nan})

  events = _events(logdir)
  assert len(events) == 6
  first = events[0]
  assert first[3] == [b"brain.Event:2"]
  for e in events:
    assert math.isfinite(struct.unpack("<d", e[1][0])[0])  # wall_time

  def scalars(event):
    out = {}
    for raw in _decode(event[5][0])[1]:
      value = _decode(raw)
      out[value[1][0].decode()] = struct.unpack("<f", value[2][0])[0]
    return out

  assert _int64(events[1][2][0]) == 3
  assert scalars(events[1]) == {"loss/g": 1.25, "loss/d": -0.5}
  assert _int64(events[2][2][0]) == 2**40
  assert scalars(events[2]) == {"big_step": 7.0}
  assert _int64(events[3][2][0]) == -1

  images = {}
  assert _int64(events[4][2][0]) == 4
  for raw in _decode(events[4][5][0])[1]:
    value = _decode(raw)
    image = _decode(value[4][0])
    png = Image.open(io.BytesIO(image[4][0]))
    images[value[1][0].decode()] = (image[1][0], image[2][0], image[3][0],
                                    np.asarray(png))
  assert images["rgb"][:3] == (5, 7, 3)
  np.testing.assert_array_equal(images["rgb"][3], rgb)
  assert images["gray"][:3] == (3, 4, 1)
  np.testing.assert_array_equal(
      images["gray"][3], np.round(gray * 255).astype(np.uint8))
  last = scalars(events[5])
  assert last["huge"] == math.inf and last["tiny"] == -math.inf
  assert math.isnan(last["nan"])


def test_summary_events_reach_the_file_within_flush_secs(tmp_path,
                                                        monkeypatch):
  """Held in the file's buffer until a montage filled it or the writer
  closed, scalars were lost to a SIGTERM/SIGKILL and a live TensorBoard
  saw none for hundreds of steps: now on disk once FLUSH_SECS passed."""
  logdir = tmp_path / "tb"
  w = writers.SummaryWriter(str(logdir))
  w.write_scalars(1, {"loss": 1.0})
  assert len(_events(str(logdir))) == 1  # the version event: still held
  monkeypatch.setattr(writers, "FLUSH_SECS", 0.0)
  w.write_scalars(2, {"loss": 2.0})
  assert len(_events(str(logdir))) == 3  # both scalars, file still open
  w.close()


def test_summary_writer_image_batch_and_bad_images(tmp_path):
  batch = np.zeros((2, 4, 4, 1), np.uint8)
  batch[1] = 200
  with writers.SummaryWriter(tmp_path) as w:
    w.write_images(0, {"batch": batch})
    with pytest.raises(InputError, match="'bad'"):
      w.write_images(0, {"bad": np.zeros((4, 4, 2), np.uint8)})
    with pytest.raises(InputError, match="int32"):
      w.write_images(0, {"ints": np.zeros((4, 4), np.int32)})
  events = _events(str(tmp_path))
  tags = [_decode(raw)[1][0] for raw in _decode(events[1][5][0])[1]]
  assert tags == [b"batch/image/0", b"batch/image/1"]


def test_two_writers_in_one_folder_get_separate_files(tmp_path):
  a = writers.SummaryWriter(tmp_path)
  b = writers.SummaryWriter(tmp_path)
  a.close()
  b.close()
  assert a.path != b.path
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
  with pytest.raises(ValueError, match="closed"):
    a.write_scalars(0, {"x": 1.0})


def test_tensorboard_reads_our_event_files(tmp_path):
  pytest.importorskip("tensorboard")
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator

  rgb = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
  with writers.SummaryWriter(tmp_path) as w:
    for step in range(3):
      w.write_scalars(step * 10, {"loss": 0.5 * step, "lr": 2e-4})
    w.write_images(20, {"montage": rgb})

  acc = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.SCALARS: 0,
                                    event_accumulator.IMAGES: 0})
  acc.Reload()
  tags = acc.Tags()
  assert set(tags["scalars"]) == {"loss", "lr"}
  assert tags["images"] == ["montage"]
  loss = acc.Scalars("loss")
  assert [e.step for e in loss] == [0, 10, 20]
  np.testing.assert_allclose([e.value for e in loss], [0.0, 0.5, 1.0])
  np.testing.assert_allclose(
      [e.value for e in acc.Scalars("lr")], 2e-4, rtol=1e-6)
  (image,) = acc.Images("montage")
  assert (image.step, image.height, image.width) == (20, 6, 9)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), rgb)


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
  # A run logs steps 1-5 and is killed; its checkpoint was at step 3. The
  # resumed run logs 4 and 5 again: TensorBoard and metrics.jsonl show each
  # step once, with the resumed run's values.
  pytest.importorskip("tensorboard")
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  import time
  with writers.create_default_writer(tmp_path) as w:
    for step in range(1, 6):
      w.write_scalars(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "los')  # killed mid-line
  time.sleep(1.1)  # event files sort by their time stamp
  with writers.create_default_writer(tmp_path) as w:
    w.resume_from(3)
    for step in (4, 5):
      w.write_scalars(step, {"loss": 10.0 * step})
  acc = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  got = [(e.step, e.value) for e in acc.Scalars("loss")]
  assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in lines] == got


def test_writers_of_one_second_sort_in_the_order_they_were_made(
    tmp_path, monkeypatch):
  """TensorBoard reads a folder's event files in name order: the 10th
  writer's file sorted before the 9th's, so a resume's restart marker was
  read before the events it drops (each step logged twice)."""
  import itertools
  monkeypatch.setattr(writers, "_file_counter", itertools.count(9))
  monkeypatch.setattr(writers.time, "time", lambda: 1_700_000_000.0)
  first = writers.SummaryWriter(tmp_path)
  first.close()
  second = writers.SummaryWriter(tmp_path)
  second.close()
  assert sorted([first.path, second.path]) == [first.path, second.path]


# ---------------------------------------------------------------------------
# JsonlWriter, MultiWriter, create_default_writer.
# ---------------------------------------------------------------------------


def test_jsonl_writer(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  w = writers.JsonlWriter(path)
  w.write_scalars(1, {"l1": np.float32(0.25), "acc": 1})
  w.write_images(1, {"ignored": np.zeros((2, 2), np.uint8)})
  # Lines are on disk before close: a crashed run keeps its log.
  assert len(path.read_text().splitlines()) == 1
  w.write_scalars(2, {"l1": float("nan")})
  w.close()
  # Appends on reopening (a resumed run continues the file).
  with writers.JsonlWriter(path) as w2:
    w2.write_scalars(3, {"l1": 0.125})
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3]
  assert lines[0]["l1"] == 0.25 and lines[0]["acc"] == 1.0
  assert math.isnan(lines[1]["l1"])
  assert all("wall_time" in r for r in lines)


def test_create_default_writer_writes_both(tmp_path):
  w = writers.create_default_writer(tmp_path)
  assert isinstance(w, writers.MultiWriter)
  w.write_scalars(5, {"g": 2.0})
  w.write_images(5, {"img": np.zeros((3, 3, 3), np.uint8)})
  w.flush()
  w.close()
  text = (tmp_path / "metrics.jsonl").read_text()
  records = [json.loads(line) for line in text.splitlines()]
  assert records[0]["step"] == 5 and records[0]["g"] == 2.0
  events = _events(str(tmp_path))
  assert len(events) == 3  # file version, scalars, image


# ---------------------------------------------------------------------------
# montage.
# ---------------------------------------------------------------------------


def test_montage_writes_a_png_and_returns_rgb(tmp_path):
  rng = np.random.default_rng(2)
  volumes = {"input": rng.uniform(-1, 1, (10, 12, 8)),
             "output": np.full((6, 6, 6), 1.0)}
  path = tmp_path / "out" / "montage.png"
  rgb = writers.montage(volumes, path)
  assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
  with Image.open(path) as png:
    assert png.mode == "RGB"
    assert png.size == (rgb.shape[1], rgb.shape[0])
    np.testing.assert_array_equal(np.asarray(png), rgb)
  assert os.listdir(path.parent) == ["montage.png"]  # no temporary left
  # Two rows: the bright constant volume fills the lower half's panels.
  top, bottom = rgb[: rgb.shape[0] // 2], rgb[rgb.shape[0] // 2:]
  assert (bottom == 255).all(axis=2).sum() > (top == 255).all(axis=2).sum()


def test_montage_without_path_and_with_slices():
  vol = np.zeros((8, 8, 8))
  vol[2] = 1.0
  one = writers.montage({"a": vol}, slices=(2, 4, 4))
  other = writers.montage({"a": vol}, slices=(5, 4, 4))
  assert one.shape == other.shape
  assert not np.array_equal(one, other)  # the axis-0 panel shows slice 2 vs 5
  assert one.shape[0] < writers.montage({"a": vol, "b": vol}).shape[0]


def test_montage_bad_input():
  with pytest.raises(InputError, match="at least one"):
    writers.montage({})
  with pytest.raises(InputError, match="'flat'"):
    writers.montage({"flat": np.zeros((4, 4))})
  with pytest.raises(InputError, match="outside"):
    writers.montage({"a": np.zeros((4, 4, 4))}, slices=(0, 4, 0))


def test_montage_default_slices_are_each_volumes_centre():
  """With no ``slices``, every panel shows index ``s // 2`` of its axis (the
  documented centre), not ``(s - 1) // 2``: pixel for pixel the same figure
  as ``slices=(D // 2, H // 2, W // 2)`` on even sides, where the two differ."""
  rng = np.random.default_rng(7)
  vol = rng.uniform(-1, 1, (6, 8, 10))
  centre = writers.montage({"a": vol}, slices=(3, 4, 5))
  np.testing.assert_array_equal(writers.montage({"a": vol}), centre)
  # the check can tell: the slices just below the centre draw another figure
  below = writers.montage({"a": vol}, slices=(2, 3, 4))
  assert below.shape != centre.shape or not np.array_equal(below, centre)


def _panel_cells(rgb, column, n):
  """The ``n x n`` grid of a montage panel's voxels as drawn, top row first:
  True where the cell is bright. The panel is the black rectangle of the
  figure's ``column``-th third; each cell is read at its centre."""
  third = rgb.shape[1] // 3
  part = rgb[:, column * third:(column + 1) * third]
  dark = part.max(axis=2) < 40
  rows = np.flatnonzero(dark.sum(axis=1) > third // 3)
  r0, r1 = rows.min(), rows.max() + 1
  cols = np.flatnonzero(dark[r0:r1].sum(axis=0) > (r1 - r0) // 3)
  c0, c1 = cols.min(), cols.max() + 1
  centres_r = (r0 + (np.arange(n) + 0.5) * (r1 - r0) / n).astype(int)
  centres_c = (c0 + (np.arange(n) + 0.5) * (c1 - c0) / n).astype(int)
  cells = part[centres_r[:, None], centres_c[None, :]].min(axis=2)
  return cells > 200


def test_montage_orientation_is_transposed_with_origin_lower(tmp_path):
  """Each panel draws its plane transposed with the origin at the bottom left
  (the documented display): a voxel at plane index ``[0, n - 1]`` (first
  row, last column of the array) appears in the panel's top-left corner, and
  the whole panel is ``flipud(plane.T)``. Not transposing would put it at the
  bottom right, ``origin="upper"`` at the bottom left. Read from the PNG."""
  n = 8
  vol = np.full((n, n, n), -1.0)  # vmin everywhere: black panels
  c = n // 2
  vol[c, 0, n - 1] = 1.0  # axis-0 plane [y, x]: [0, n-1]
  vol[0, c, n - 1] = 1.0  # axis-1 plane [z, x]: [0, n-1]
  vol[0, n - 1, c] = 1.0  # axis-2 plane [z, y]: [0, n-1]
  path = tmp_path / "m.png"
  writers.montage({"v": vol}, path)
  with Image.open(path) as png:
    rgb = np.asarray(png.convert("RGB"))
  for axis in range(3):
    plane = np.take(vol, c, axis=axis)
    assert plane[0, n - 1] == 1.0 and (plane > 0).sum() == 1
    cells = _panel_cells(rgb, axis, n)
    assert cells[0, 0], (axis, np.argwhere(cells))  # top left
    np.testing.assert_array_equal(cells, np.flipud(plane.T > 0))
