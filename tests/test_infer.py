"""Inference: the cascade keeps geometry, is batch- and device-independent,
resumes after a kill, and plans its memory before running."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import synthetic

import megan_jax
from megan_jax import cli, configs, infer
from megan_jax import state as state_lib
from megan_jax.errors import InputError

SHAPE = (30, 37, 26)  # non-cubic, odd: scales 8x10x7, 15x19x13, 30x37x26


def _config():
  return configs.get_config("demo:smoke")


def _volume(shape=SHAPE, seed=0):
  return synthetic.blob(shape, seed)


@pytest.fixture(scope="module")
def params(run_dir):
  from megan_jax import train
  _, states = train.restore(run_dir)
  return {n: s.g_params for n, s in states.items()}


def _nifti(path, data, zoom=4.0):
  affine = np.diag([zoom, zoom, zoom, 1.0])
  affine[:3, 3] = [-50, -60, -40]
  img = nib.Nifti1Image(data, affine)
  img.header["descrip"] = b"source scan"
  nib.save(img, str(path))
  return str(path)


def test_batch_size_does_not_change_the_output(params):
  config = _config()
  image = infer.Translator(config, params)._normalise_source(_volume())
  outs = [infer.Translator(config, params, batch_size=b).translate_normalised(
      image, progress=False) for b in (1, 3, 8)]
  assert outs[0].shape == SHAPE
  assert np.isfinite(outs[0]).all() and np.abs(outs[0]).max() <= 1.0
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-6)


def test_hr_residual_cascade_upsamples_where_the_generator_adds_nothing(
    params):
  # HR generators whose last conv outputs 0: with model.hr_residual every HR
  # scale is the scale below trilinearly upsampled (inside the volume; at
  # its faces the patches see background padding, upsample2 replicates).
  import jax
  from megan_jax import resample
  config = _config()
  config.model.hr_residual = True
  zero = {n: jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if "conv_out" in jax.tree_util.keystr(path)
      else x, p) if n != "lr" else p for n, p in params.items()}
  t = infer.Translator(config, zero, batch_size=4)
  t.keep_scales = True
  t.translate_normalised(t._normalise_source(_volume()), progress=False)
  scales = t.scale_outputs["scales"]
  for k in range(1, config.num_hr_scales + 1):
    below = scales["lr" if k == 1 else f"hr{k - 1}"]
    got = scales[f"hr{k}"]
    want = resample.upsample2(below)[tuple(slice(0, n) for n in got.shape)]
    inner = tuple(slice(1, n - 2) for n in got.shape)
    np.testing.assert_allclose(got[inner], np.clip(want[inner], -1, 1),
                               atol=1e-5)
    assert not np.allclose(got[inner], 0.0)


@pytest.mark.parametrize("shape", [SHAPE, (32, 40, 24)],
                         ids=["odd", "even"])
def test_each_hr_scale_is_fed_its_own_scales_sketch(params, monkeypatch,
                                                    shape):
  """Each HR scale k's generator gets scale k's edge sketch (``edges_k``,
  padded as the loop pads, where a scale is odd-sized; as it is where
  even), not another scale's: with an HR step that returns its edge patch,
  every HR scale's output is its own sketch exactly (patches cut and
  stitched back), and every cut is from that scale's padded sketch."""
  from megan_jax import dataset, resample, tiling
  config = _config()
  t = infer.Translator(config, params, batch_size=4)
  t._hr_fn = jax.jit(lambda params, prev, edges: edges)  # no plan: not compiled
  cut = []
  real = tiling.extract_batch

  def extract_batch(volume, *args, **kwargs):
    cut.append(np.array(volume))
    return real(volume, *args, **kwargs)
  monkeypatch.setattr(tiling, "extract_batch", extract_batch)
  t.keep_scales = True
  image = t._normalise_source(_volume(shape))
  t.translate_normalised(image, progress=False)
  arrays = dataset.preprocess(image, config, foreground=False)
  scales = t.scale_outputs["scales"]
  evens = [tuple(2 * n for n in arrays[f"image_{k - 1}"].shape)
           == arrays[f"image_{k}"].shape
           for k in range(1, config.num_hr_scales + 1)]
  assert all(evens) if shape != SHAPE else not any(evens)
  for k in range(1, config.num_hr_scales + 1):
    own = arrays[f"edges_{k}"]
    below = scales["lr" if k == 1 else f"hr{k - 1}"]
    even = tuple(2 * n for n in below.shape)
    padded = resample.pad_to(own, even, 0.0, low=(0, 0, 0))[0]
    other = resample.pad_to(arrays[f"edges_{k - 1}"], even, 0.0,
                            low=(0, 0, 0))[0]
    assert own.any() and not np.array_equal(padded, other)  # it can tell
    np.testing.assert_array_equal(scales[f"hr{k}"], own,
                                  err_msg=f"hr{k} got another sketch")
    mine = [v for v in cut if v.shape == even]
    assert mine, f"hr{k}: no patches cut from a {even} volume"
    for v in mine:
      np.testing.assert_array_equal(v, padded)


def test_sketches_made_meanwhile_change_nothing(params, monkeypatch):
  """infer.overlap_edges: scale 2's sketch is made on a host thread while
  the LR and HR1 scales are generated; the output is the same bit for bit,
  and an error in that thread comes out of the translation itself."""
  import threading

  from megan_jax import edges as edges_lib
  config = _config()
  assert config.num_hr_scales == 2 and config.infer.overlap_edges
  real = edges_lib.canny_3d
  threads = {}

  def canny(volume, *args, **kwargs):
    threads[np.shape(volume)] = threading.current_thread().name
    return real(volume, *args, **kwargs)
  monkeypatch.setattr(edges_lib, "canny_3d", canny)
  t = infer.Translator(config, params, batch_size=4)
  image = t._normalise_source(_volume())
  meanwhile = t.translate_normalised(image, progress=False)
  assert threads[SHAPE].startswith("megan-sketch")
  assert threads[(15, 19, 13)] == threading.main_thread().name
  config.infer.overlap_edges = False
  threads.clear()
  t = infer.Translator(config, params, batch_size=4)
  np.testing.assert_array_equal(
      t.translate_normalised(image, progress=False), meanwhile)
  assert threads[SHAPE] == threading.main_thread().name

  def broken(volume, *args, **kwargs):
    if np.shape(volume) == SHAPE:
      raise InputError("volume: the finest sketch failed")
    return real(volume, *args, **kwargs)
  monkeypatch.setattr(edges_lib, "canny_3d", broken)
  config.infer.overlap_edges = True
  t = infer.Translator(config, params, batch_size=4)
  with pytest.raises(InputError, match="finest sketch failed"):
    t.translate_normalised(image, progress=False)


def test_api_returns_the_kind_it_was_given(run_dir, tmp_path):
  t = megan_jax.load(run_dir, batch_size=4)
  vol = _volume()
  arr = t.translate(vol)
  assert isinstance(arr, np.ndarray) and arr.shape == SHAPE
  assert 0.0 <= arr.min() and arr.max() <= 255.0  # the target's intensity range
  src = _nifti(tmp_path / "src.nii.gz", vol)
  img = t.translate(nib.load(src))
  assert isinstance(img, nib.Nifti1Image)
  np.testing.assert_allclose(img.affine, nib.load(src).affine)
  np.testing.assert_allclose(np.asarray(img.dataobj), arr, atol=1e-4)
  from_path = t.translate(src)
  np.testing.assert_allclose(np.asarray(from_path.dataobj), arr, atol=1e-4)
  out = t.translate(src, out=str(tmp_path / "out.nii.gz"))
  assert out == str(tmp_path / "out.nii.gz") and os.path.exists(out)
  # A NIfTI-2 image comes back as one (as save_nifti writes it), its
  # header of NIfTI-2's kind, so nibabel takes it without a warning.
  two = nib.Nifti2Image(vol, nib.load(src).affine)
  two.header["descrip"] = b"kept"
  img2 = t.translate(two)
  assert type(img2) is nib.Nifti2Image
  assert isinstance(img2.header, nib.Nifti2Header)
  assert img2.header["descrip"] == b"kept"
  assert img2.get_data_dtype() == np.float32
  np.testing.assert_allclose(np.asarray(img2.dataobj), arr, atol=1e-4)


def test_a_resume_folder_half_removed_is_not_taken_as_done(run_dir, tmp_path,
                                                          monkeypatch):
  """The resume folder is removed once the output is written; a process
  killed while removing it left records saying "done" beside scale files
  already gone (the order the filesystem listed them in): every rerun
  failed on the missing file, or, where the last scale's went first,
  wrote a constant volume and exit 0. Now its records go first, and a
  record whose file is gone is redone."""
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  t = megan_jax.load(run_dir, batch_size=8)
  whole = np.asarray(nib.load(infer.translate_file(
      t, src, str(tmp_path / "whole.nii.gz"), progress=False)).dataobj)
  out = tmp_path / "out.nii.gz"
  partial = tmp_path / ".out.nii.gz.partial"
  kept = infer.discard_workspace
  monkeypatch.setattr(infer, "discard_workspace", lambda folder: None)
  infer.translate_file(t, src, str(out), progress=False)  # kept, all done
  monkeypatch.setattr(infer, "discard_workspace", kept)
  assert json.load(open(partial / "progress.json")) == {
      "0": "done", "1": "done", "2": "done"}
  backup = tmp_path / "backup"
  shutil.copytree(partial, backup)

  class Killed(Exception):
    pass
  # Killed after its first n removals, in the order it removes.
  for n in range(1, len(os.listdir(partial))):
    removed = []
    real_remove = os.remove

    def remove(path, *args, **kwargs):
      if len(removed) == n:
        raise Killed()
      removed.append(os.path.basename(path))
      return real_remove(path, *args, **kwargs)
    monkeypatch.setattr(os, "remove", remove)
    with pytest.raises(Killed):
      infer.discard_workspace(str(partial))
    monkeypatch.setattr(os, "remove", real_remove)
    assert removed[0] == "meta.json"
    os.remove(out)
    infer.translate_file(t, src, str(out), progress=False)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), whole)
    assert not partial.exists()
    shutil.copytree(backup, partial)
  # Records intact, the last scale's file gone (the old order could leave
  # it so): that scale is translated again, not passed on as zeros.
  os.remove(partial / "scale_2.npy")
  os.remove(out)
  infer.translate_file(t, src, str(out), progress=False)
  np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), whole)


def test_killed_translation_resumes_to_the_same_file(run_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(infer, "RECORD_EVERY_S", 0.0)
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  t = megan_jax.load(run_dir, batch_size=4)
  whole = infer.translate_file(t, src, str(tmp_path / "whole.nii.gz"), progress=False)

  class Killed(Exception):
    pass

  def kill(scale, done):
    if scale == 2 and done >= 12:
      raise Killed()
  out = str(tmp_path / "resumed.nii.gz")
  with pytest.raises(Killed):
    infer.translate_file(t, src, out, progress=False, on_batch=kill)
  assert not os.path.exists(out)  # nothing appears before the end
  partial = tmp_path / ".resumed.nii.gz.partial"
  progress = json.load(open(partial / "progress.json"))
  assert progress["1"] == "done" and 12 <= progress["2"] < 100
  seen, sketched = [], []
  real_edges = infer.Translator._edges

  def edges(self, arrays, k):
    sketched.append(k)
    return real_edges(self, arrays, k)
  monkeypatch.setattr(infer.Translator, "_edges", edges)
  infer.translate_file(t, src, out, progress=False,
                       on_batch=lambda s, d: seen.append((s, d)))
  assert seen[0][0] == 2 and seen[0][1] > 12  # it did not start over
  assert sketched == [2]  # no wait for a finished scale's sketch
  assert not partial.exists()
  a, b = nib.load(whole), nib.load(out)
  np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
  np.testing.assert_allclose(b.affine, nib.load(src).affine)
  assert b.header["descrip"].tobytes().startswith(b"source scan")


def test_cli_plan_and_translate(run_dir, tmp_path, capsys):
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  out = str(tmp_path / "out.nii.gz")
  assert cli.main(["translate", "-i", src, "-o", out, "--workdir", run_dir, "--plan"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [l.split()[0] for l in lines] == ["lr", "hr1", "hr2"]
  assert "30x37x26" in lines[2] and "MiB" in lines[2]
  assert not os.path.exists(out)  # --plan only plans
  assert cli.main(["translate", "-i", src, "-o", out, "--workdir", run_dir, "--quiet"]) == 0
  assert nib.load(out).shape == SHAPE
  capsys.readouterr()
  # A batch the device cannot hold: the plan says so, as the run would
  # (it printed the plan and exit 0, and the run then refused).
  code = cli.main(["translate", "-i", src, "-o", str(tmp_path / "b.nii.gz"),
                   "--workdir", run_dir, "--plan", "--batch-size", "4000000"])
  captured = capsys.readouterr()
  assert code == 2 and "per device" in captured.err, captured.err
  assert "use a smaller --batch-size" in captured.err
  assert [l.split()[0] for l in captured.out.strip().splitlines()] == [
      "lr", "hr1", "hr2"]


def test_cli_interrupted_translation_says_where_its_batches_are(
    run_dir, tmp_path, capsys, monkeypatch):
  # Ctrl-C printed only "interrupted"; the batches done are kept, and the
  # same command resumes from them.
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  out = str(tmp_path / "out.nii.gz")

  def killed(translator, inp, out, *a, **k):
    os.makedirs(infer.workspace_path(out), exist_ok=True)  # made first
    if batches:
      open(os.path.join(infer.workspace_path(out), "progress.json"),
           "w").close()
    raise KeyboardInterrupt
  monkeypatch.setattr(infer, "translate_file", killed)
  for batches in (False, True):  # interrupted before any batch: not said
    code = cli.main(["translate", "-i", src, "-o", out, "--workdir", run_dir,
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err
    said = (f"the batches done for {out} are kept in "
            f"{infer.workspace_path(out)}; the same command resumes") in err
    assert said == batches, err


CONFIG_EDITS = {  # a run's config.json, valid JSON, edited by hand
    "config_ngf_text": ("model", "ngf", "x"),
    "config_patch_negative": (None, "patch_size", -4),
    "config_spacing_text": ("data", "spacing", "x"),
    "config_no_model": (None, "model", None),
}


@pytest.mark.parametrize("case", ["no_checkpoint", "no_intensity",
                                  "bad_json", "damaged_checkpoint",
                                  "mask_shape", "same_file",
                                  *CONFIG_EDITS])
def test_cli_translate_errors(case, run_dir, tmp_path, capsys):
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  argv = ["translate", "-i", src, "-o", str(tmp_path / "o.nii.gz"), "--workdir", run_dir]
  if case == "no_checkpoint":
    empty = tmp_path / "empty_run"
    empty.mkdir()
    argv[-1] = str(empty)
    name = str(empty)
  elif case in ("no_intensity", "bad_json", "damaged_checkpoint",
                *CONFIG_EDITS):
    import shutil
    copy = tmp_path / "copied_run"
    shutil.copytree(run_dir, copy)
    argv[-1] = name = str(copy)
    if case == "no_intensity":  # else outputs would come out in [0, 1]
      os.remove(copy / "intensity.json")
    elif case == "bad_json":  # an editor's crash, say
      text = (copy / "config.json").read_text()
      (copy / "config.json").write_text(text[: len(text) // 2])
    elif case in CONFIG_EDITS:  # was a traceback of 34-71 lines
      section, key, value = CONFIG_EDITS[case]
      saved = json.loads((copy / "config.json").read_text())
      node = saved[section] if section else saved
      if value is None:
        del node[key]
      else:
        node[key] = value
      (copy / "config.json").write_text(json.dumps(saved))
    else:  # every file of one scale's checkpoint cut in half
      for root, _, files in os.walk(copy / "checkpoints" / "hr1"):
        for f in files:
          path = os.path.join(root, f)
          with open(path, "rb+") as fh:
            fh.truncate(os.path.getsize(path) // 2)
  elif case == "mask_shape":
    name = _nifti(tmp_path / "m.nii.gz", np.ones((5, 5, 5), np.float32))
    argv += ["--mask", name]
  else:
    argv[4] = src
    name = src
  before = sorted(os.listdir(tmp_path))
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and name in err[0]
  assert sorted(os.listdir(tmp_path)) == before


def test_plan_memory_is_independent_of_the_volume(params):
  t = infer.Translator(_config(), params, batch_size=4)
  small, large = t.plan((30, 37, 26)), t.plan((64, 64, 64))
  assert [r.device_bytes for r in small] == [r.device_bytes for r in large]
  assert large[-1].num_patches > small[-1].num_patches
  assert large[-1].host_bytes > small[-1].host_bytes


def test_the_devices_hold_one_scales_weights_at_a_time(params,
                                                      monkeypatch):
  # Every scale's generator resident at once would grow the device memory
  # by a generator per doubling of the output (the paper's HR generator:
  # 106 MB in fp32), beyond what each scale's compiled step counts.
  import gc
  import weakref
  from megan_jax import sharding
  t = infer.Translator(_config(), params, batch_size=4)
  assert all(isinstance(x, np.ndarray)
             for x in jax.tree.leaves(t.params))  # host copies
  put, earlier = [], []
  real = sharding.replicate

  def replicate(tree, mesh):
    gc.collect()  # whatever still refers to a scale's weights keeps them
    assert all(r() is None for r in earlier), "two scales on the device"
    out = real(tree, mesh)
    put.append(next(n for n, v in t.params.items() if v is tree))
    earlier.extend(weakref.ref(x) for x in jax.tree.leaves(out))
    return out
  monkeypatch.setattr(sharding, "replicate", replicate)
  t.translate_normalised(_volume(), progress=False)
  assert put == state_lib.scale_names(t.config)  # each once, in order
  # The last scale stays for the next call, which reuses it.
  assert t.scale_params(put[-1]) is t._resident[1] and len(put) == 3


@pytest.mark.slow
def test_eight_devices_equal_one(run_dir, tmp_path):
  """8 forced CPU devices give the same volume as 1, for a patch count that
  is not a multiple of 8."""
  script = textwrap.dedent(f"""
    import numpy as np, jax, megan_jax
    from megan_jax import infer
    from tests.synthetic import blob
    assert len(jax.devices()) == 8
    vol = blob((30, 37, 36))  # 36 patches at the last scale
    one = megan_jax.load({run_dir!r}, devices=jax.devices()[:1], batch_size=8)
    eight = megan_jax.load({run_dir!r}, batch_size=8)
    plan = eight.plan(vol.shape)
    assert plan[-1].num_patches % 8 != 0, plan[-1].num_patches
    a, b = one.translate(vol), eight.translate(vol)
    print("maxdiff", float(np.abs(a - b).max()))
    # The sketches' JAX engine runs on the Translator's devices (it ran on
    # JAX's first device, whichever devices were chosen).
    from megan_jax import edges
    seen, pick = set(), edges._device
    edges._device = lambda d=None: seen.add(pick(d)) or pick(d)
    c = megan_jax.load({run_dir!r}, devices=jax.devices()[2:4], batch_size=8)
    np.testing.assert_allclose(c.translate(vol), a, rtol=0, atol=1e-4)
    assert seen == {{jax.devices()[2]}}, seen
    edges._device = pick
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    # --batch-size auto on the CPU: the 8 devices share the host's RAM
    infer.memory_budget = lambda dev: (8 << 30, "host")
    auto = megan_jax.load({run_dir!r}, batch_size="auto")
    assert auto.batch_info["budget_bytes"] == 1 << 30, auto.batch_info
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "maxdiff" in r.stdout


def test_real_head_mri_never_seen_keeps_shape_and_affine(run_dir, tmp_path, capsys):
  """A real T1 crop that ships with nibabel's tests (33x41x25 at 2 mm, x
  flipped): non-cubic, not 1 mm, never seen in training."""
  import nibabel.testing
  src = os.path.join(nibabel.testing.data_path, "anatomical.nii")
  out = str(tmp_path / "anat_t1.nii.gz")
  assert cli.main(["translate", "-i", src, "-o", out, "--workdir", run_dir, "--quiet"]) == 0
  a, b = nib.load(src), nib.load(out)
  assert b.shape == a.shape == (33, 41, 25)
  np.testing.assert_allclose(b.affine, a.affine)
  assert np.isfinite(np.asarray(b.dataobj)).all()


def test_mask_is_written_and_augmented(run_dir, tmp_path):
  vol = _volume()
  src = _nifti(tmp_path / "src.nii.gz", vol)
  mask = np.zeros(SHAPE, np.float32)
  mask[4:12, 5:14, 4:10] = 1  # off-centre, so a mirror moves it
  m = _nifti(tmp_path / "m.nii.gz", mask)
  t = megan_jax.load(run_dir, batch_size=8)
  plain = nib.load(infer.translate_file(t, src, str(tmp_path / "a.nii.gz"), progress=False)).get_fdata()
  masked = nib.load(infer.translate_file(t, src, str(tmp_path / "b.nii.gz"), m, progress=False)).get_fdata()
  outs = [nib.load(infer.translate_file(t, src, str(tmp_path / f"c{s}.nii.gz"), m, progress=False,
                                        mask_augment_seed=s)).get_fdata() for s in (1, 1, 2)]
  assert np.abs(masked - plain).max() > 1e-3  # the mask reaches the generators
  np.testing.assert_array_equal(outs[0], outs[1])  # a seed is reproducible
  assert np.abs(outs[2] - outs[0]).max() > 1e-3 or np.abs(outs[0] - masked).max() > 1e-3


def test_mask_mirror_is_left_right_whatever_the_voxel_order(run_dir,
                                                            tmp_path):
  """--mask-augment mirrors a lesion left-right in the world: the same scan
  and mask stored in another voxel order (I, A, L: axes permuted and
  flipped) give the same translation, voxel for voxel once reoriented.
  The mirror once flipped the file's first axis, head-foot there."""
  seed = next(s for s in range(100) if _draws_a_flip(s))
  vol = _volume()
  mask = np.zeros(SHAPE, np.float32)
  mask[4:12, 5:14, 4:10] = 1  # off-centre on every axis
  t = megan_jax.load(run_dir, batch_size=8)
  outs = []
  for name, codes in (("ras", "RAS"), ("ial", "IAL")):
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"),
        nib.orientations.axcodes2ornt(codes))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-50, -60, -40]
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, SHAPE)
    files = []
    for what, data in (("src", vol), ("mask", mask)):
      path = str(tmp_path / f"{what}_{name}.nii.gz")
      nib.save(nib.Nifti1Image(
          nib.orientations.apply_orientation(data, ornt), affine), path)
      files.append(path)
    assert "".join(nib.aff2axcodes(affine)) == codes
    out = infer.translate_file(t, files[0], str(tmp_path / f"{name}.nii.gz"),
                               files[1], progress=False,
                               mask_augment_seed=seed)
    outs.append(np.asarray(nib.as_closest_canonical(nib.load(out)).dataobj))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def _draws_a_flip(seed):
  """Whether ``augment_label``'s draws for this seed mirror the label."""
  rng = np.random.default_rng(seed)
  rng.uniform()
  return rng.random() < 0.5


def test_bf16_residual_base_is_the_previous_scale_unrounded(params):
  """With model.hr_residual the HR output is the previous patch's centre
  upsampled plus the generator's output; in bfloat16 that base stays
  float32 (it was rounded to bf16: errors up to ~0.004 near ±1). With the
  last layer zeroed the output is the float32 base itself."""
  config = _config()
  assert config.model.hr_residual
  zeroed = dict(params)
  zeroed["hr1"] = {"params": dict(params["hr1"]["params"])}
  zeroed["hr1"]["params"]["conv_out"] = jax.tree.map(
      np.zeros_like, params["hr1"]["params"]["conv_out"])
  t = infer.Translator(config, zeroed, batch_size=8, dtype="bfloat16")
  p = config.patch_size
  rng = np.random.default_rng(0)
  prev = rng.uniform(-0.99, 0.99, (8, p, p, p, 1)).astype(np.float32)
  edges = rng.uniform(0, 1, (8, p, p, p, 1)).astype(np.float32)
  got = np.asarray(t._hr_fn(t.params["hr1"], prev, edges))
  want = np.clip(np.asarray(state_lib.linear_upsampled_centre(prev, p)),
                 -1, 1)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_large_outputs_are_memory_mapped(params):
  config = _config()
  config.unlock()
  config.infer.memmap_bytes = 1000  # every scale counts as "large" here
  t = infer.Translator(config, params, batch_size=8)
  ref = infer.Translator(_config(), params, batch_size=8)
  assert isinstance(t._host_array((20, 20, 20)), np.memmap)
  assert not isinstance(ref._host_array((20, 20, 20)), np.memmap)
  image = ref._normalise_source(_volume())
  np.testing.assert_array_equal(t.translate_normalised(image, progress=False),
                                ref.translate_normalised(image, progress=False))


def test_pick_batch_size_takes_the_largest_fitting_power_of_two():
  calls = []

  def bytes_at(b):  # affine in the batch, like a compiled step
    calls.append(b)
    return 1000 + 300 * b

  # budget 10_000: 1000 + 300 b <= 10_000 -> b <= 30, so 16 (steps of 2).
  assert infer.pick_batch_size(bytes_at, 10_000, step=2, max_batch=512) == 16
  assert calls[:2] == [2, 4] and calls[-1] == 16  # the pick is compiled too
  assert infer.pick_batch_size(bytes_at, 10_000, step=2, max_batch=8) == 8
  assert infer.pick_batch_size(bytes_at, 1_500, step=1) == 1  # only 1 fits
  assert infer.pick_batch_size(bytes_at, 100, step=4) == 4  # none: the step
  assert infer.pick_batch_size(bytes_at, None, step=4) == 4  # nothing known
  # A prediction the compile contradicts is halved until it fits.
  real = lambda b: 1000 + 300 * b + (5000 if b >= 16 else 0)
  assert infer.pick_batch_size(real, 10_000, step=2) == 8


def test_auto_batch_size_fits_the_device_budget(params, monkeypatch):
  fixed = infer.Translator(_config(), params, batch_size=4)
  fixed.plan(SHAPE)
  at4 = fixed.plan(SHAPE)[-1].device_bytes
  at8 = infer.Translator(_config(), params, batch_size=8).plan(SHAPE)[-1].device_bytes
  assert at8 > at4
  budget = (at4 + at8) // 2  # 4 fits, 8 does not
  monkeypatch.setattr(infer, "memory_budget", lambda dev: (budget, "device"))
  t = infer.Translator(_config(), params, batch_size="auto")
  assert t.batch_size == 4
  assert t.batch_info["budget_bytes"] == budget
  assert t.batch_info["compiled_bytes"]["4"] == at4
  assert t.plan(SHAPE)[-1].batch_shape[0] == 4
  with pytest.raises(InputError, match="integer or 'auto'"):
    infer.Translator(_config(), params, batch_size="many")


def test_plan_compiles_the_edge_kernels_a_run_uses(params, monkeypatch):
  from megan_jax import edges
  monkeypatch.setattr(edges, "_EXECUTABLES", {})
  monkeypatch.setattr(edges, "_JAX_BUCKET", 1)  # one kernel per scale shape
  t = infer.Translator(_config(), params, batch_size=4)
  t.plan(SHAPE)
  planned = dict(edges._EXECUTABLES)
  assert len(planned) == _config().num_hr_scales + 1
  t.translate_normalised(t._normalise_source(_volume()), progress=False)
  assert edges._EXECUTABLES == planned  # nothing compiled during the run


def test_api_out_and_masks_of_every_kind(run_dir, tmp_path):
  # out= writes for every kind of input, and a mask given as an array or an
  # image reaches the generators whatever the input is.
  t = megan_jax.load(run_dir, batch_size=8)
  vol = _volume()
  src = _nifti(tmp_path / "src.nii.gz", vol)
  mask = np.zeros(SHAPE, np.float32)
  mask[4:12, 5:14, 4:10] = 1
  m = _nifti(tmp_path / "m.nii.gz", mask)
  want = np.asarray(t.translate(src, m).dataobj)
  plain = t.translate(vol)
  assert np.abs(want - plain).max() > 1e-3
  for i, (x, mk) in enumerate([(src, mask), (src, nib.load(m)),
                               (nib.load(src), m), (vol, mask)]):
    out = str(tmp_path / f"out{i}.nii.gz")
    assert t.translate(x, mk, out=out) == out
    img = nib.load(out)
    assert img.shape == SHAPE
    np.testing.assert_allclose(np.asarray(img.dataobj), want, atol=1e-4)
    if not isinstance(x, np.ndarray):
      np.testing.assert_allclose(img.affine, nib.load(src).affine)
  with pytest.raises(InputError, match="mask: shape 30x37x25 differs"):
    t.translate(src, mask[..., :-1], out=str(tmp_path / "bad.nii.gz"))
  assert not os.path.exists(tmp_path / "bad.nii.gz")
  # A mask of another space (here 2 mm voxels against the input's 4 mm) is
  # refused whichever way it comes, not applied in the wrong place.
  other = _nifti(tmp_path / "m2.nii.gz", mask, zoom=2.0)
  for x, mk in [(src, other), (src, nib.load(other)),
                (nib.load(src), other)]:
    for out in (None, str(tmp_path / "bad.nii.gz")):
      with pytest.raises(InputError, match="affine differs from the input"):
        t.translate(x, mk, out=out)
  assert not os.path.exists(tmp_path / "bad.nii.gz")
  assert t.translate(vol, nib.load(other)).shape == SHAPE  # arrays: no grid


def test_api_checks_in_memory_images_as_files(run_dir, tmp_path):
  t = megan_jax.load(run_dir, batch_size=8)
  vol = _volume()
  img4 = nib.Nifti1Image(vol[..., None], np.diag([4.0, 4.0, 4.0, 1.0]))
  y = t.translate(img4)  # one volume in a 4D image, as load_nifti squeezes
  assert y.shape == SHAPE + (1,)  # and the result keeps the input's shape
  np.testing.assert_allclose(np.asarray(y.dataobj)[..., 0], t.translate(vol),
                             atol=1e-4)
  bad = vol.copy()
  bad[3, 4, 5] = np.nan
  with pytest.raises(InputError, match="^image: 1 non-finite voxel"):
    t.translate(nib.Nifti1Image(bad, np.eye(4)))
  with pytest.raises(InputError, match="^array: 1 non-finite voxel"):
    t.translate(bad)
  with pytest.raises(InputError, match="^array: constant image"):
    t.translate(np.zeros(SHAPE, np.float32))
  with pytest.raises(InputError, match="^array 2x37x26: its working grid"):
    t.translate(vol[:2])
  with pytest.raises(InputError, match="expected a 3D image, got shape"):
    t.translate(nib.Nifti1Image(np.stack([vol, vol], -1), np.eye(4)))


def test_resume_is_refused_when_the_mask_file_changed(run_dir, tmp_path,
                                                      monkeypatch):
  monkeypatch.setattr(infer, "RECORD_EVERY_S", 0.0)
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  a = np.zeros(SHAPE, np.float32)
  a[4:12, 5:14, 4:10] = 1
  b = np.zeros(SHAPE, np.float32)
  b[16:26, 20:30, 12:20] = 1
  t = megan_jax.load(run_dir, batch_size=4)
  m = str(tmp_path / "m.nii.gz")
  fresh_b = nib.load(infer.translate_file(
      t, src, str(tmp_path / "fresh.nii.gz"), _nifti(m, b),
      progress=False)).get_fdata()

  class Killed(Exception):
    pass

  def kill(scale, done):
    if scale == 2 and done >= 8:
      raise Killed()
  out = str(tmp_path / "out.nii.gz")
  _nifti(m, a)
  with pytest.raises(Killed):
    infer.translate_file(t, src, out, m, progress=False, on_batch=kill)
  _nifti(m, b)  # the same path, another mask: the partial scales are stale
  seen = []
  got = nib.load(infer.translate_file(
      t, src, out, m, progress=False,
      on_batch=lambda s, d: seen.append((s, d)))).get_fdata()
  assert seen[0][0] == 1  # started over at scale 1
  np.testing.assert_array_equal(got, fresh_b)


def test_cli_translates_many_inputs_into_a_folder(run_dir, tmp_path, capsys):
  ins = tmp_path / "in"
  ins.mkdir()
  srcs = [_nifti(ins / f"s{i}.nii.gz", _volume(seed=i)) for i in range(2)]
  odd = _nifti(ins / "odd.nii", _volume((24, 30, 22), seed=5))
  bad_data = _volume()
  bad_data[1, 2, 3] = np.nan
  bad = _nifti(ins / "bad.nii.gz", bad_data)
  out = tmp_path / "out"  # made by the command
  base = ["translate", "--workdir", run_dir, "--quiet", "--batch-size", "4"]
  assert cli.main(base + ["-i", *srcs, odd, "-o", str(out), "--plan"]) == 0
  text = capsys.readouterr().out
  assert f"{odd}:" in text and "24x30x22" in text and not out.exists()
  assert cli.main(base + ["-i", *srcs, bad, odd, "-o", str(out)]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 2 and bad in err[0] and "non-finite" in err[0]
  assert "1 of 4 inputs failed" in err[1]
  assert sorted(os.listdir(out)) == ["odd.nii", "s0.nii.gz", "s1.nii.gz"]
  assert "[4/4] wrote" in captured.out
  t = megan_jax.load(run_dir, batch_size=4)
  for src in srcs + [odd]:  # what one input at a time writes
    got = nib.load(str(out / os.path.basename(src)))
    np.testing.assert_allclose(np.asarray(got.dataobj),
                               np.asarray(t.translate(src).dataobj),
                               atol=1e-4)
    np.testing.assert_allclose(got.affine, nib.load(src).affine)
  mtime = os.stat(out / "s0.nii.gz").st_mtime_ns
  assert cli.main(base + ["-i", *srcs, "-o", str(out), "--skip-existing"]) == 0
  assert capsys.readouterr().out.count("skipped") == 2
  assert os.stat(out / "s0.nii.gz").st_mtime_ns == mtime
  one = tmp_path / "one"  # one input into an existing folder
  one.mkdir()
  assert cli.main(base + ["-i", srcs[0], "-o", f"{one}/"]) == 0
  assert os.listdir(one) == ["s0.nii.gz"]


@pytest.mark.parametrize("case", ["mask_count", "same_name", "not_a_folder",
                                  "into_the_inputs", "missing_input"])
def test_cli_many_inputs_are_checked_before_any_work(case, run_dir, tmp_path,
                                                     capsys):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  srcs = [_nifti(tmp_path / d / "s.nii.gz", _volume()) for d in "ab"]
  other = _nifti(tmp_path / "a" / "t.nii.gz", _volume(seed=1))
  out = str(tmp_path / "out")
  argv = ["translate", "--workdir", run_dir, "-o", out, "-i", srcs[0], other]
  if case == "mask_count":
    argv += ["--mask", srcs[0]]
    name = "--mask"
  elif case == "same_name":
    argv[-1] = srcs[1]
    name = srcs[1]
  elif case == "not_a_folder":
    out = argv[4] = str(tmp_path / "file.nii.gz")
    open(out, "w").close()
    name = out
  elif case == "into_the_inputs":
    argv[4] = str(tmp_path / "a")
    name = srcs[0]
  else:
    argv[-1] = name = str(tmp_path / "a" / "nope.nii.gz")
  before = sorted(os.walk(tmp_path))
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and name in err[0], err
  assert sorted(os.walk(tmp_path)) == before


def test_load_reads_each_scales_best_generator_else_its_latest(tmp_path):
  # Per scale the best checkpoint where there is one, else the latest; only
  # the generator's parameters are read, equal to the whole state's.
  import jax
  from conftest import make_random_run
  from megan_jax import state as state_lib
  from megan_jax import train
  run = make_random_run(str(tmp_path / "run"))
  config = state_lib.load_config(run)
  best = state_lib.create_state(jax.random.key(99), config, "hr")
  best = best.replace(step=jax.numpy.asarray(7, jax.numpy.int32))
  ck = state_lib.Checkpoints(run, "hr1")
  ck.save_best(7, best, 0.25)
  ck.wait()
  ck.close()
  _, latest = train.restore(run, "latest")
  _, gens = state_lib.restore_generators(run, "best")
  assert sorted(gens) == sorted(latest)
  assert gens["hr1"][0] == 7 and gens["lr"][0] == 0

  def same(a, b):
    return jax.tree.all(jax.tree.map(
        lambda x, y: bool(np.array_equal(x, y)), a, b))
  assert same(gens["hr1"][1], best.g_params)
  assert not same(gens["hr1"][1], latest["hr1"].g_params)
  for name in set(gens) - {"hr1"}:
    assert same(gens[name][1], latest[name].g_params)
  _, only_latest = state_lib.restore_generators(run, "latest")
  assert same(only_latest["hr1"][1], latest["hr1"].g_params)
  # The translator of each: best by default, and the fingerprints differ.
  t_best, t_latest = infer.load(run), infer.load(run, which="latest")
  assert same(t_best.params["hr1"], best.g_params)
  assert t_best.fingerprint != t_latest.fingerprint


def test_an_input_too_small_for_the_cascade_leaves_nothing(run_dir, tmp_path):
  # demo:smoke has 2 HR scales: 5 voxels per axis at the least. The error
  # names the input and the working grid; no resume folder is left.
  t = infer.load(run_dir)
  thin = _nifti(tmp_path / "thin.nii.gz", _volume((30, 37, 4)))
  out = tmp_path / "o" / "thin.nii.gz"
  out.parent.mkdir()
  with pytest.raises(InputError, match=r"input .*thin.nii.gz: its working "
                     r"grid at 4 mm is 30x37x4 voxels; 2 HR scale\(s\) need "
                     r"at least 5"):
    infer.translate_file(t, thin, str(out), progress=False)
  assert os.listdir(out.parent) == []
  assert t.translate(_volume((30, 37, 5))).shape == (30, 37, 5)  # enough


def test_a_full_disk_is_an_error_naming_the_file_not_a_crash(tmp_path,
                                                             monkeypatch):
  # The resume files are reserved on disk when made: no room is an OSError
  # naming the file (megan translate prints it in one line), not a SIGBUS
  # when the memory map is first written; the file is not left.
  import errno

  def full(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "posix_fallocate", full)
  path = str(tmp_path / "scale_2.npy")
  with pytest.raises(OSError, match="No space left") as e:
    infer.open_memmap(path, (40, 50, 60))
  assert e.value.filename == path and not os.path.exists(path)
  monkeypatch.undo()
  arr = infer.open_memmap(path, (40, 50, 60))
  arr[:] = 1.0
  arr.flush()
  assert os.stat(path).st_blocks * 512 >= arr.nbytes  # reserved, not sparse


def test_a_full_disk_while_making_the_resume_files_names_them(tmp_path,
                                                              monkeypatch):
  # Where the disk is full before the space is reserved (writing the .npy
  # header; the resume folder's meta.json), the write's OSError named no
  # file: `megan translate` printed "No space left on device" alone.
  import errno
  path = tmp_path / "scale_2.npy"
  path.symlink_to("/dev/full")  # every write: ENOSPC
  with pytest.raises(OSError, match="No space left") as e:
    infer.open_memmap(str(path), (40, 50, 60))
  assert e.value.filename == str(path) and not os.path.lexists(path)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(infer.json, "dump", full)
  folder = str(tmp_path / ".out.nii.gz.partial")
  with pytest.raises(OSError, match="No space left") as e:
    infer.claim_workspace(folder, "abc")
  assert e.value.filename == folder and os.listdir(folder) == []


def test_a_batch_beyond_the_hosts_ram_stops_before_any_work(run_dir):
  # The CPU reports no memory limit: its devices share the host's RAM.
  t = infer.load(run_dir, batch_size=10**6)
  with pytest.raises(InputError, match=r"scale hr1: needs .* GiB per device,"
                     r" for 1 CPU device\(s\), the host has in all .* GiB; "
                     r"use a smaller --batch-size"):
    t.check_device_memory(t.plan(SHAPE))
  small = infer.load(run_dir, batch_size=4)
  small.check_device_memory(small.plan(SHAPE))  # fits


def test_cli_names_the_input_too_large_for_the_runs_lr_scale(run_dir,
                                                            tmp_path, capsys):
  # 40 mm voxels: 10x the run's 4 mm spacing on every axis, far beyond its
  # LR scale. The line says which input and its voxel size.
  big = _nifti(tmp_path / "big.nii.gz", _volume(), zoom=40.0)
  code = cli.main(["translate", "-i", big, "-o", str(tmp_path / "o") + "/",
                   "--workdir", run_dir])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert f"input {big} (30x37x26 voxels of 40x40x40 mm)" in err
  assert "does not fit lr_size" in err


def test_a_second_translation_into_the_same_output_is_refused(run_dir,
                                                             tmp_path):
  # While one translation holds OUT's resume folder, another into OUT is
  # one line (it would clear or share the first one's resume state); once
  # freed, the output is written and the folder is gone.
  t = infer.load(run_dir, batch_size=8)
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  out = str(tmp_path / "o.nii.gz")
  held = infer.lock_workspace(out)
  assert held is not None and infer.lock_workspace(out) is None
  with pytest.raises(InputError, match="another megan translate is writing"):
    infer.translate_file(t, src, out, progress=False)
  assert not os.path.exists(out)
  os.close(held)
  assert infer.translate_file(t, src, out, progress=False) == out
  assert sorted(os.listdir(tmp_path)) == ["o.nii.gz", "src.nii.gz"]


def test_translator_arguments_are_checked(run_dir, params):
  import jax
  config = _config()
  for bad in (0, 2.7, True, "lots"):
    with pytest.raises(InputError, match="batch size"):
      infer.Translator(config, params, batch_size=bad)
  with pytest.raises(InputError, match="devices: an empty list"):
    infer.Translator(config, params, devices=[])
  one = infer.Translator(config, params, devices=jax.devices()[0])
  assert one.mesh.devices.size == 1
  # A device twice made a mesh [d0, d0] that failed in JAX's device_put.
  with pytest.raises(InputError, match="devices: .* is listed twice"):
    infer.Translator(config, params, devices=[jax.devices()[0]] * 2)
  # Device names, an int: one line each (were deep AttributeErrors).
  for bad, what in (("cpu", "got str 'cpu'"), (["cpu"], "got str 'cpu' in"),
                    (0, "got int 0")):
    with pytest.raises(InputError, match=f"devices: a list of jax.Device.*"
                       f"{what}"):
      infer.Translator(config, params, devices=bad)
    with pytest.raises(InputError, match="devices: a list"):
      infer.load(run_dir, devices=bad)
  # dtypes as numpy/jax objects too (only strings were taken).
  for d, want in ((np.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                  (np.dtype("float32"), jnp.float32)):
    assert infer.Translator(config, params, dtype=d).dtype == want
  for d in (np.float16, "x", 3):
    with pytest.raises(InputError, match="choose float32 or bfloat16"):
      infer.Translator(config, params, dtype=d)
  # An iterator is read once (load used to use it up before the Translator).
  t = infer.load(run_dir, devices=iter(jax.devices()[:1]))
  assert t.mesh.devices.size == 1
  with pytest.raises(InputError, match="which='foo'"):
    infer.load(run_dir, which="foo")
  # A JAX array is a volume like a numpy one; [D, H, W, 1] as [D, H, W].
  vol = _volume()
  y = one.translate(vol)
  np.testing.assert_array_equal(one.translate(jax.numpy.asarray(vol)), y)
  y4 = one.translate(vol[..., None])
  assert y4.shape == SHAPE + (1,)
  np.testing.assert_array_equal(y4[..., 0], y)
  mask = np.zeros(SHAPE, np.float32)
  mask[10:20, 10:20, 10:16] = 1
  np.testing.assert_array_equal(one.translate(vol[..., None], mask[..., None]),
                                one.translate(vol, mask)[..., None])
  with pytest.raises(InputError, match=r"expected 3D .*\(30, 37, 26, 2\)"):
    one.translate(np.stack([vol, vol], -1))
  # megan_jax.load: one device as Translator takes it, and which=.
  t = megan_jax.load(run_dir, devices=jax.devices()[0], which="latest")
  assert t.mesh.devices.size == 1
  # train.restore's states stand for their generators; anything else is
  # refused at once, not inside Flax.
  from megan_jax import train
  _, states = train.restore(run_dir)
  np.testing.assert_array_equal(
      infer.Translator(config, states, devices=jax.devices()[0]
                       ).translate(vol), y)
  with pytest.raises(InputError, match="generator of scale lr: .* got int"):
    infer.Translator(config, {n: 1 for n in states})


def test_a_failed_translate_leaves_no_empty_output_folder(run_dir, tmp_path,
                                                          capsys):
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  bad = np.full(SHAPE, np.nan, np.float32)
  bad1 = _nifti(tmp_path / "bad1.nii.gz", bad)
  bad2 = _nifti(tmp_path / "bad2.nii.gz", bad)
  not_a_run = tmp_path / "not_a_run"
  not_a_run.mkdir()
  out = tmp_path / "out"
  for argv in ([src, "-o", f"{out}/", "--workdir", str(not_a_run)],
               [bad1, bad2, "-o", f"{out}/a/b/", "--workdir", run_dir]):
    assert cli.main(["translate", "-i", *argv, "--quiet"]) == 2
    assert not out.exists()  # nor the folders made above the output's
  capsys.readouterr()
  out.mkdir()  # a folder that was there stays, even empty
  assert cli.main(["translate", "-i", bad1, bad2, "-o", f"{out}/",
                   "--workdir", run_dir, "--quiet"]) == 2
  assert out.is_dir()


def test_load_names_what_is_wrong_with_the_run_folder(tmp_path):
  import megan_jax
  with pytest.raises(InputError, match="nope: no such folder"):
    megan_jax.load(str(tmp_path / "nope"))
  with pytest.raises(InputError, match="no config.json"):
    megan_jax.load(str(tmp_path))


def test_content_digest_follows_voxels_grid_and_mask():
  # What the processes of a job compare before translating an input.
  from megan_jax import io as mio
  vol = _volume()
  base = mio.Volume(vol, np.diag([4.0, 4.0, 4.0, 1.0]))
  mask = vol > vol.mean()
  d = infer._content_digest(base, mask)
  assert d.dtype == np.int32
  np.testing.assert_array_equal(d, infer._content_digest(
      mio.Volume(vol.copy(), base.affine.copy()), mask.copy()))
  changed = vol.copy()
  changed[1, 2, 3] += 1
  shifted = base.affine.copy()
  shifted[0, 3] = 1.0
  other_mask = mask.copy()
  other_mask[0, 0, 0] = ~other_mask[0, 0, 0]
  for other in (infer._content_digest(mio.Volume(changed, base.affine), mask),
                infer._content_digest(mio.Volume(vol, shifted), mask),
                infer._content_digest(base, other_mask),
                infer._content_digest(base, None)):
    assert (other != d).any()


def test_load_names_a_scale_without_a_generator(run_dir, tmp_path):
  # Raised inside load's checks, so every process of a job hears of it
  # (from the Translator, one process left the others in a collective).
  import shutil
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  shutil.rmtree(copy / "checkpoints" / "hr2")
  with pytest.raises(InputError, match=f"workdir {copy}: no generator for "
                     "scale.s. hr2; train them first"):
    infer.load(str(copy))


def test_a_resume_folder_that_cannot_be_made_names_the_output(tmp_path,
                                                              monkeypatch):
  # Was the internal ".o.nii.gz.partial: Operation not permitted".
  import errno

  def refuse(path, exist_ok=False):
    raise PermissionError(errno.EPERM, "Operation not permitted", path)
  monkeypatch.setattr(infer.os, "makedirs", refuse)
  out = str(tmp_path / "o.nii.gz")
  with pytest.raises(OSError) as e:
    infer.lock_workspace(out)
  assert e.value.filename == out and e.value.errno == errno.EPERM
  assert e.value.strerror == ("Operation not permitted (making its resume "
                              "folder .o.nii.gz.partial)")


def test_an_output_that_cannot_be_written_keeps_the_work_and_says_so(
    run_dir, tmp_path, monkeypatch):
  # A full disk at the very end: the message names the output and the
  # resume folder kept, and the same command then finishes from it.
  import errno
  t = infer.load(run_dir, batch_size=8)
  src = _nifti(tmp_path / "src.nii.gz", _volume())
  out = str(tmp_path / "o.nii.gz")
  real = infer.io.save_nifti

  def full(path, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", path)
  monkeypatch.setattr(infer.io, "save_nifti", full)
  with pytest.raises(OSError) as e:
    infer.translate_file(t, src, out, progress=False)
  assert e.value.filename == out and e.value.errno == errno.ENOSPC
  kept = infer.workspace_path(out)
  assert f"kept in {kept}: the same command resumes" in e.value.strerror
  assert os.path.isdir(kept) and not os.path.exists(out)
  monkeypatch.setattr(infer.io, "save_nifti", real)
  seen = []
  infer.translate_file(t, src, out, progress=False,
                       on_batch=lambda s, d: seen.append(s))
  assert seen == [] and os.path.exists(out) and not os.path.exists(kept)


def test_a_workspace_never_returns_another_inputs_translation(
    run_dir, tmp_path, monkeypatch):
  # translate_normalised's workspace held no record of its input: a second
  # volume of the same shape got the first one's output back.
  monkeypatch.setattr(infer, "RECORD_EVERY_S", 0.0)
  t = megan_jax.load(run_dir, batch_size=4)
  a = np.clip(_volume() / 100.0 - 1.0, -1, 1).astype(np.float32)
  b = np.ascontiguousarray(a[::-1])
  ws = str(tmp_path / "ws")
  ya = t.translate_normalised(a, progress=False, workspace=ws)
  yb = t.translate_normalised(b, progress=False, workspace=ws)
  np.testing.assert_allclose(yb, t.translate_normalised(b, progress=False),
                             atol=1e-5)
  assert not np.allclose(ya, yb)

  # The same input still resumes where it was stopped.
  class Killed(Exception):
    pass

  def kill(scale, done):
    if scale == 2 and done >= 12:
      raise Killed()
  with pytest.raises(Killed):
    t.translate_normalised(a, progress=False, workspace=ws, on_batch=kill)
  seen = []
  again = t.translate_normalised(a, progress=False, workspace=ws,
                                 on_batch=lambda s, d: seen.append((s, d)))
  assert seen[0][0] == 2 and seen[0][1] > 12
  np.testing.assert_allclose(again, ya, atol=1e-5)
  # Another edge engine (sketches that differ by rounding near ties)
  # starts afresh rather than mixing the two.
  ws = str(tmp_path / "ws2")
  with pytest.raises(Killed):
    t.translate_normalised(a, progress=False, workspace=ws, on_batch=kill)
  other = "numpy" if infer.edges_lib.ENGINE == "jax" else "jax"
  monkeypatch.setattr(infer.edges_lib, "ENGINE", other)
  seen.clear()
  t.translate_normalised(a, progress=False, workspace=ws,
                         on_batch=lambda s, d: seen.append((s, d)))
  assert seen[0][0] == 1


def test_plan_and_translate_refuse_what_a_translation_cannot_take(params):
  # plan((4, 4, 4)) returned a plan that translate then refused; fractional
  # sizes were truncated; a complex array lost its imaginary part silently.
  t = infer.Translator(_config(), params, batch_size=4)
  for shape, why in (((4, 4, 4), "need at least"),
                     ((30.5, 37, 26), "whole sizes"),
                     ("30x37x26", "whole sizes")):
    with pytest.raises(InputError, match=why) as e:
      t.plan(shape)
    assert str(e.value).startswith("plan: shape ") and "\n" not in str(e.value)
  assert [r.shape for r in t.plan(np.array(SHAPE))][-1] == SHAPE
  x = _volume().astype(np.complex64)
  with pytest.raises(InputError, match="expected real numbers, got dtype "
                     "complex64 \\(e.g. the magnitude image\\)"):
    t.translate(x)
  with pytest.raises(InputError, match="got dtype <U1"):
    t.translate(np.full(SHAPE, "a"))
  with pytest.raises(InputError, match=r"empty \(shape \(0, 10, 10\)\)"):
    t.translate(np.zeros((0, 10, 10), np.float32))
  with pytest.raises(InputError, match="expected an io.Volume.*ndarray"):
    t.translate_volume(_volume())
  # Masks: a scalar said "shape  differs"; NaN voxels were read as outside.
  with pytest.raises(InputError, match="mask: expected a 3D array of "
                     r"numbers.*got ndarray of shape \(\), dtype bool"):
    t.translate(_volume(), True)
  nan_mask = np.zeros(SHAPE, np.float32)
  nan_mask[3, 4, 5] = np.nan
  with pytest.raises(InputError, match="mask: non-finite"):
    t.translate(_volume(), nan_mask)
