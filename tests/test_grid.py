"""The working grid: every volume reaches the networks the same way up
(``data.orientation``) and at the run's spacing, and results go back to the
input's own grid."""
import itertools
import json

import ml_collections
import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest
import synthetic

from megan_jax import configs, dataset, grid, infer, io, state
from megan_jax.errors import InputError

ALL_ORIENTATIONS = [
    np.array([[perm[i], flips[i]] for i in range(3)], float)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product([1, -1], repeat=3)]


def _grid_config(orientation="RAS", spacing=0.0):
  return ml_collections.ConfigDict(
      {"data": {"orientation": orientation, "spacing": spacing}})


def _ras_volume(shape=(5, 6, 7), zooms=(2.0, 3.0, 4.0)):
  data = np.random.default_rng(0).random(shape).astype(np.float32)
  affine = np.diag([*zooms, 1.0])
  affine[:3, 3] = [10, -20, 30]
  return io.Volume(data, affine)


def _stored(vol, t):
  """``vol`` as a scanner could have stored it: axes permuted/flipped by the
  ornt ``t``, the affine changed so every voxel keeps its world place."""
  return io.Volume(np.ascontiguousarray(nio.apply_orientation(vol.data, t)),
                   vol.affine @ nio.inv_ornt_aff(t, vol.data.shape))


@pytest.mark.parametrize("t", ALL_ORIENTATIONS,
                         ids=lambda t: "".join(nib.aff2axcodes(
                             nio.inv_ornt_aff(t, (2, 2, 2)))))
def test_every_storage_order_reaches_the_same_ras_grid_and_back(t):
  ras = _ras_volume()
  vol = _stored(ras, t)
  label = vol.data > 0.5
  work = grid.to_working(vol, _grid_config(), label)
  np.testing.assert_array_equal(work.volume.data, ras.data)
  np.testing.assert_allclose(work.volume.affine, ras.affine, atol=1e-12)
  np.testing.assert_array_equal(work.label, ras.data > 0.5)
  assert grid.working_shape(_grid_config(), vol) == ras.data.shape
  np.testing.assert_array_equal(work.restore(work.volume.data), vol.data)


def test_already_ras_is_left_alone_and_empty_orientation_keeps_voxel_order():
  ras = _ras_volume()
  work = grid.to_working(ras, _grid_config())
  assert work.volume is ras and work.transform is None
  lps = _stored(ras, np.array([[0, -1], [1, -1], [2, 1]], float))
  kept = grid.to_working(lps, _grid_config(""))
  assert kept.volume is lps
  assert not np.array_equal(grid.to_working(lps, _grid_config("RAS"))
                            .volume.data, lps.data)
  np.testing.assert_array_equal(  # "LPS" asks for the storage order itself
      grid.to_working(lps, _grid_config("lps")).volume.data, lps.data)


def test_spacing_after_orientation_and_restore_to_the_input_shape():
  ras = _ras_volume((8, 10, 6), zooms=(1.0, 2.0, 4.0))
  t = np.array([[2, -1], [0, 1], [1, -1]], float)
  vol = _stored(ras, t)
  config = _grid_config(spacing=2.0)
  work = grid.to_working(vol, config, vol.data > 0.5)
  assert work.volume.data.shape == (4, 10, 12) == work.label.shape
  assert grid.working_shape(config, vol) == (4, 10, 12)
  zooms = np.sqrt((work.volume.affine[:3, :3] ** 2).sum(axis=0))
  np.testing.assert_allclose(zooms, 2.0)
  back = work.restore(work.volume.data)
  assert back.shape == vol.data.shape
  # Only an array on the working grid goes back (another was resized).
  with pytest.raises(ValueError, match=r"working grid, \(4, 10, 12\); "
                     r"got \(3, 10, 12\)"):
    work.restore(work.volume.data[:-1])
  # the same resampling done on the RAS volume, then stored like the input
  ras_work = grid.to_working(ras, config)
  np.testing.assert_allclose(ras_work.volume.data, work.volume.data,
                             atol=1e-6)


@pytest.mark.parametrize("codes", ["RRS", "XYZ", "RA", "RASL", "LRS"])
def test_bad_orientation_is_one_clear_error(codes):
  with pytest.raises(InputError, match="data.orientation"):
    grid.to_working(_ras_volume(), _grid_config(codes))


def test_mask_of_another_shape_is_an_input_error():
  with pytest.raises(InputError, match="mask: shape 5x6x6 differs"):
    grid.to_working(_ras_volume(), _grid_config(), np.zeros((5, 6, 6), bool))


def test_runs_saved_before_the_field_load_without_reorienting():
  new = configs.get_config("demo:smoke")
  assert new.data.orientation == "RAS"
  old = json.loads(new.to_json())
  del old["data"]["orientation"]
  loaded = state.config_from_json(json.dumps(old))
  assert loaded.data.orientation == ""
  assert not state.same_run(loaded, new)
  new.data.orientation = ""
  assert state.same_run(loaded, new)


def test_runs_saved_before_d_output_load_with_the_codes_discriminator():
  # Their discriminators' checkpoints are the code's form (no LR conv_out,
  # a stride-2 HR one): such a run must resume as it was trained.
  new = configs.get_config("demo:smoke")
  old = json.loads(new.to_json())
  del old["model"]["d_output"]
  loaded = state.config_from_json(json.dumps(old))
  assert loaded.model.d_output == "code"
  assert configs.get_config("default").model.d_output == "map"


def _save(path, vol):
  nib.save(nib.Nifti1Image(vol.data, vol.affine), str(path))
  return str(path)


def _blob(shape=(30, 37, 26), seed=0):
  # off-centre along y: a flip of the storage order changes the array
  return synthetic.blob(shape, seed, centre_shift=(0.0, -0.3, 0.0))


LPI_PERMUTED = np.array([[1, -1], [2, -1], [0, 1]], float)


def test_training_arrays_do_not_depend_on_the_storage_order(tmp_path):
  config = configs.get_config("demo:smoke")
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  ras = io.Volume(_blob(), affine)
  a = dataset.load_subject(_save(tmp_path / "ras.nii.gz", ras), config)
  b = dataset.load_subject(
      _save(tmp_path / "other.nii.gz", _stored(ras, LPI_PERMUTED)), config)
  for x, y in zip(a.images + a.edges, b.images + b.edges):
    np.testing.assert_array_equal(x, y)
  config.data.orientation = ""  # the control: the file's own voxel order
  c = dataset.load_subject(str(tmp_path / "other.nii.gz"), config)
  assert c.images[-1].shape != a.images[-1].shape


def test_training_label_follows_orientation_and_spacing(tmp_path):
  # 2 mm files with the run at 4 mm: the label is resampled with its volume
  # (it used to be compared with the resampled volume's shape and refused).
  config = configs.get_config("demo:smoke")
  config.data.label_suffix = "_seg"
  config.edges.use_label = True
  shape = (60, 74, 52)
  ras = io.Volume(_blob(shape), np.diag([2.0, 2.0, 2.0, 1.0]))
  z, y, x = np.indices(shape)
  lesion = ((z - 30) ** 2 + (y - 30) ** 2 + (x - 26) ** 2 < 10 ** 2)
  lab = io.Volume(lesion.astype(np.float32), ras.affine)
  subjects = []
  for name, t in (("ras", None), ("other", LPI_PERMUTED)):
    _save(tmp_path / f"{name}.nii.gz", ras if t is None else _stored(ras, t))
    _save(tmp_path / f"{name}_seg.nii.gz", lab if t is None else _stored(lab, t))
    subjects.append(dataset.load_subject(str(tmp_path / f"{name}.nii.gz"),
                                         config))
  a, b = subjects
  assert a.images[-1].shape == (30, 37, 26)
  for x, y in zip(a.edges, b.edges):
    np.testing.assert_array_equal(x, y)
  config.edges.use_label = False
  plain = dataset.load_subject(str(tmp_path / "ras.nii.gz"), config)
  assert not np.array_equal(plain.edges[-1], a.edges[-1])  # the label shows


def test_translation_is_the_same_whatever_the_storage_order(
    run_dir, tmp_path):
  from megan_jax import train
  config, states = train.restore(run_dir)
  params = {n: s.g_params for n, s in states.items()}
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  affine[:3, 3] = [-50, -60, -40]
  ras = io.Volume(_blob(), affine)
  other = _stored(ras, LPI_PERMUTED)
  lesion = np.zeros(ras.data.shape, bool)
  lesion[10:16, 12:20, 8:14] = True
  other_lesion = nio.apply_orientation(lesion, LPI_PERMUTED)
  t = infer.Translator(config, params, batch_size=4)
  y_ras = t.translate_volume(ras, lesion, progress=False)
  y_other = t.translate_volume(other, other_lesion, progress=False)
  assert y_other.shape == other.data.shape
  np.testing.assert_array_equal(
      y_other, nio.apply_orientation(y_ras, LPI_PERMUTED))
  # the control: without reorienting, the networks see another volume
  config.data.orientation = ""
  t0 = infer.Translator(config, params, batch_size=4)
  y0 = t0.translate_volume(other, other_lesion, progress=False)
  assert np.abs(y0 - y_other).max() > 1e-3


def test_translate_file_keeps_the_inputs_storage_order(run_dir, tmp_path):
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  other = _stored(io.Volume(_blob(), affine), LPI_PERMUTED)
  src = _save(tmp_path / "in.nii.gz", other)
  t = infer.load(run_dir, batch_size=4)
  out = infer.translate_file(t, src, str(tmp_path / "out.nii.gz"),
                             progress=False)
  img = nib.load(out)
  assert img.shape == other.data.shape
  np.testing.assert_allclose(img.affine, other.affine)
  assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(other.affine)
  assert grid.working_shape(t.config, other) == (30, 37, 26)


def test_resampled_label_keeps_its_volume():
  """A 4 mm thick slab label on a 1 mm grid, resampled to 2 mm, is the two
  2 mm slices it covers (trilinear > 0.5: 0.875 inside, 0.125 beside it),
  288 voxels of 8 mm³, the slab's own volume; not the slices beside it."""
  shape = (24, 24, 24)
  data = np.random.default_rng(0).random(shape).astype(np.float32)
  vol = io.Volume(data, np.diag([1.0, 1.0, 1.0, 1.0]))
  label = np.zeros(shape, bool)
  label[:, :, 10:14] = True
  work = grid.to_working(vol, _grid_config(spacing=2.0), label)
  assert work.label.shape == work.volume.data.shape == (12, 12, 12)
  expected = np.zeros((12, 12, 12), bool)
  expected[:, :, 5:7] = True
  np.testing.assert_array_equal(work.label, expected)
  assert work.label.sum() * 8 == label.sum()
