"""Tests of the throughput benchmark (``benchmarks/throughput.py``).

One ``--quick`` run (tiny networks, 16³ patches) without torch, simulated by
replacing the benchmark's import helper, is shared by most tests; they check
the files' schema and the benchmark's own correctness checks, never a
timing's size. The PyTorch and MONAI comparisons run where torch is
installed.
"""
import glob
import itertools
import json
import os
import sys

import numpy as np
import pytest

# ``benchmarks`` lives beside the package, at the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks import throughput  # noqa: E402
from megan_jax import infer, tiling  # noqa: E402

META_KEYS = {"jax_version", "jaxlib_version", "backend", "device_kind",
             "device_count", "threads", "torch_threads", "torch_version",
             "monai_version", "command", "date", "repeats", "notes",
             "ratio_missing", "total_s"}


def _without_torch(mp):
  real = throughput._import_optional
  mp.setattr(throughput, "_import_optional",
             lambda name: None if name.split(".")[0] in ("torch", "monai")
             else real(name))


def _load(out) -> dict:
  (path,) = glob.glob(os.path.join(out, "throughput-*.json"))
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def no_torch_run(tmp_path_factory):
  """``(out_dir, data)`` of a quick run of hr_forward (batch 1, both
  dtypes, plain fp32), stitch, cascade and flops, with torch "missing"."""
  out = str(tmp_path_factory.mktemp("quick"))
  with pytest.MonkeyPatch.context() as mp:
    _without_torch(mp)
    rc = throughput.main(["--quick", "--out", out, "--only", "hr_forward",
                          "stitch", "cascade", "paired", "edges",
                          "--batches", "1",
                          "--flops"])
  assert rc == 0
  return out, _load(out)


def _rows(data, section, **match):
  return [r for r in data["results"][section]
          if all(r.get(k) == v for k, v in match.items())]


def test_schema_meta_and_ratios(no_torch_run):
  _, data = no_torch_run
  assert set(data) == {"meta", "results", "ratios"}
  meta = data["meta"]
  assert META_KEYS <= set(meta)
  assert meta["backend"] == "cpu" and meta["torch_version"] is None
  assert meta["threads"] == throughput.xla_threads()
  assert set(data["ratios"]) == set(throughput.RATIO_KEYS)
  assert set(data["results"]) == set(throughput.SECTIONS) | {"flops"}
  assert data["results"]["train_step"] is None  # not selected
  ratios, why = data["ratios"], meta["ratio_missing"]
  for key in ("jax_over_torch_per_patch", "jax_over_torch_per_patch_bf16"):
    assert ratios[key] is None and throughput.NO_TORCH in why[key]
  assert ratios["stitch_speedup_vs_monai"] is None
  assert throughput.NO_TORCH in why["stitch_speedup_vs_monai"]
  assert "train_step not run" in why["jax_over_torch_train_step_hr"]
  assert ratios["fast_over_plain_forward"] > 0  # both sides measured
  # The paired section is all PyTorch comparisons: one row per case, each
  # saying why it is missing.
  assert [r["case"] for r in data["results"]["paired"]] == list(
      throughput.PAIRED_CASES)
  assert all(r["error"] == throughput.NO_TORCH
             for r in data["results"]["paired"])
  assert ratios["paired_jax_over_torch_train_step_lr"] is None
  assert set(why) == {k for k, v in ratios.items() if v is None}
  # Each section run says when it was measured (kept on --merge).
  assert set(meta["section_dates"]) == {"hr_forward", "stitch", "cascade",
                                        "paired", "edges"}


def test_hr_forward_rows(no_torch_run):
  _, data = no_torch_run
  jax_rows = _rows(data, "hr_forward", framework="jax")
  assert {(r["impl"], r["dtype"], r["batch"]) for r in jax_rows} == {
      ("fast", "fp32", 1), ("fast", "bf16", 1), ("plain", "fp32", 1)}
  for r in jax_rows:
    assert r["error"] is None, r
    assert r["s_per_patch"] > 0 and r["compile_s"] > 0
    assert r["patches_per_s"] == pytest.approx(1 / r["s_per_patch"],
                                               rel=1e-3)
    assert len(r["times_s"]) == data["meta"]["repeats"] == 1
  # The straight port computes what the fast forms do.
  (plain,) = _rows(data, "hr_forward", impl="plain")
  assert plain["max_abs_diff_vs_fast"] < 1e-4
  torch_rows = _rows(data, "hr_forward", framework="torch")
  assert {(r["dtype"], r["batch"]) for r in torch_rows} == {("fp32", 1),
                                                           ("bf16", 1)}
  assert all(r["error"] == throughput.NO_TORCH for r in torch_rows)


def test_flops_rows(no_torch_run):
  _, data = no_torch_run
  rows = data["results"]["flops"]
  assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
  q = throughput.QUICK
  for r in rows:
    assert r["error"] is None, r
    assert r["flops_per_patch"] == throughput.hr_forward_flops(
        q.ngf, q.n_blocks, q.patch)
    assert r["achieved_flops"] > 0 and r["xla_flops_per_patch"] > 0
    assert r["peak_flops"] is None and r["fraction_of_peak"] is None  # CPU


def test_stitch_round_trip_is_exact(no_torch_run):
  _, data = no_torch_run
  (ours,) = _rows(data, "stitch", framework="ours")
  q = throughput.QUICK
  assert ours["error"] is None and ours["exact"] is True
  assert ours["max_abs_diff"] == 0 and ours["median_s"] > 0
  assert ours["patches"] == tiling.make_plan((48,) * 3, q.patch,
                                             q.border).num_patches
  (monai,) = _rows(data, "stitch", framework="monai")
  assert monai["error"] == throughput.NO_TORCH


def test_edges_rows_compare_the_two_engines(no_torch_run):
  _, data = no_torch_run
  rows = {r["impl"]: r for r in data["results"]["edges"]}
  assert set(rows) == {"numpy", "jax"}
  for r in rows.values():
    assert r["error"] is None, r
    assert r["size"] == 48 and r["alternated"] is True
    assert r["median_s"] > 0 and len(r["times_s"]) == data["meta"]["repeats"]
    assert r["edge_voxels"] > 100  # the blobs have edges
  # The engines agree but for rounding near ties.
  assert rows["jax"]["differ_voxels"] <= 1e-3 * rows["numpy"]["edge_voxels"]
  assert rows["jax"]["compile_s"] > 0
  assert data["ratios"]["edges_jax_over_numpy"] == pytest.approx(
      rows["jax"]["median_s"] / rows["numpy"]["median_s"], rel=1e-3)


def test_cascade_row(no_torch_run):
  _, data = no_torch_run
  (row,) = data["results"]["cascade"]
  assert row["error"] is None, row
  assert row["size"] == 64 and row["widths"] == "demo"
  assert row["dtype"] == "fp32"  # the CPU default
  assert row["num_hr_scales"] == 1  # 64³ from the demo's 32³ LR volume
  assert list(row["stages_s"]) == ["edges", "edges_lr", "lr", "hr1"]
  assert all(t > 0 for t in row["stages_s"].values())
  # One HR scale: no sketch is left to a thread, so all edge time is the
  # LR scale's; the table's stage columns leave the part out.
  assert row["stages_s"]["edges_lr"] == row["stages_s"]["edges"]
  header = [line for line in throughput.markdown(data).splitlines()
            if line.startswith("| output | widths |")]
  assert header and "edges_lr" not in header[0] and "| edges |" in header[0]
  assert row["total_s"] > 0 and row["compile_s"] > 0
  assert row["setup_s"] > 0 and row["input_s"] > 0  # outside the runs
  assert row["patches"] == {
      "lr": 1, "hr1": tiling.make_plan((64,) * 3, row["patch"],
                                       row["border"]).num_patches}


def test_a_run_cut_short_keeps_the_cascade_sizes_it_finished(
    tmp_path, monkeypatch):
  # The second size fails hard (as a GPU run killed by its time limit
  # would stop there): the first size's row is on disk already.
  real = throughput.cascade_config

  def config(args, size):
    if size == 96:
      raise KeyboardInterrupt  # not recorded as a row: the run stops
    return real(args, size)
  monkeypatch.setattr(throughput, "cascade_config", config)
  _without_torch(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    throughput.main(["--quick", "--out", str(tmp_path), "--only", "cascade",
                     "--cascade-sizes", "64", "96"])
  data = _load(str(tmp_path))
  (row,) = data["results"]["cascade"]
  assert row["size"] == 64 and row["error"] is None
  assert "cascade" in data["meta"]["section_dates"]


def test_cascade_variant_sizes_must_be_cascade_sizes(capsys):
  # They add runs of sizes the cascade runs; others would be ignored.
  with pytest.raises(SystemExit) as e:
    throughput.parse_args(["--quick", "--cascade-sizes", "64",
                           "--cascade-blocked-sizes", "64", "128"],
                          backend="cpu")
  assert e.value.code == 2
  assert "--cascade-blocked-sizes [128]: not in --cascade-sizes [64]" in (
      capsys.readouterr().err)
  args = throughput.parse_args(["--quick", "--only", "edges",
                                "--cascade-sparse-edges-sizes", "128"],
                               backend="cpu")  # no cascade run: no matter
  assert args.cascade_sparse_edges_sizes == [128]


def test_merge_keeps_the_cascade_rows_not_run_again(tmp_path, monkeypatch):
  """--merge: a cascade row of the same size, widths, dtype, impl and edges
  engine is replaced; the others stay, marked with the run that measured
  them (a GPU step cut short must not drop the rows it did not reach)."""
  _without_torch(monkeypatch)
  argv = ["--quick", "--out", str(tmp_path), "--only", "cascade",
          "--cascade-sizes", "64", "--merge"]
  assert throughput.main(argv) == 0
  path = tmp_path / "throughput-cpu.json"
  data = json.loads(path.read_text())
  (first,) = data["results"]["cascade"]
  other = dict(first, impl="fast-blocked", total_s=123.0)
  stale = dict(first, total_s=456.0)
  data["results"]["cascade"] = [stale, other]
  data["meta"]["section_dates"]["cascade"] = "2000-01-02T00:00:00+00:00"
  path.write_text(json.dumps(data))
  assert throughput.main(argv) == 0
  data = json.loads(path.read_text())
  rows = data["results"]["cascade"]
  assert [(r["impl"], r.get("kept_from") is not None) for r in rows] == [
      ("fast", False), ("fast-blocked", True)]
  assert rows[0]["total_s"] != 456.0 and rows[1]["total_s"] == 123.0
  assert rows[1]["kept_from"]["date"].startswith("2000-01-02")
  text = (tmp_path / "throughput-cpu.md").read_text()
  assert "Cascade rows kept from earlier runs" in text
  assert "64³ fast-blocked jax (2000-01-02)" in text


@pytest.mark.slow
def test_cascade_variant_sizes_add_rows(monkeypatch):
  """--cascade-skinny-sizes: those sizes run again with impl fast-skinny,
  traced with `layers.SKINNY_DOTS` on; --cascade-blocked-sizes: with
  fast-blocked (`layers.OUT_CONV_BLOCK` 4); --cascade-sparse-edges-sizes: again
  with `edges.JAX_SPARSE_TRANSFER` on (each off again after); the table
  gets impl and edges engine columns."""
  from megan_jax import edges, infer
  from megan_jax.models import layers
  seen = []
  plan = infer.Translator.plan

  def spy(self, shape):
    seen.append((layers.SKINNY_DOTS, layers.OUT_CONV_BLOCK,
                 edges.JAX_SPARSE_TRANSFER))
    return plan(self, shape)
  monkeypatch.setattr(infer.Translator, "plan", spy)
  sparse_calls = []
  real_sparse = edges._canny_jax_sparse

  def sparse_spy(*a, **k):
    sparse_calls.append(1)
    return real_sparse(*a, **k)
  monkeypatch.setattr(edges, "_canny_jax_sparse", sparse_spy)
  args = throughput.parse_args(["--quick", "--cascade-skinny-sizes", "64",
                                "--cascade-blocked-sizes", "64",
                                "--cascade-sparse-edges-sizes", "64"],
                               backend="cpu")
  rows = throughput.bench_cascade(args)
  assert [(r["size"], r["impl"], r["edges"], r["error"]) for r in rows] == [
      (64, "fast", "jax", None), (64, "fast-skinny", "jax", None),
      (64, "fast-blocked", "jax", None), (64, "fast", "jax-sparse", None)]
  assert seen == [(None, None, False), (True, None, False),
                  (None, 4, False), (None, None, True)]
  assert layers.SKINNY_DOTS is None and layers.OUT_CONV_BLOCK is None
  assert edges.JAX_SPARSE_TRANSFER is False
  assert sparse_calls  # the sparse row's sketches went the sparse way
  text = throughput.markdown({
      "meta": {"backend": "cpu", "device_kind": "cpu", "threads": 2,
               "jax_version": "x", "command": "c", "repeats": 1},
      "results": {"cascade": rows}, "ratios": {}})
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert "| impl | edges engine |" in lines[0]
  assert len({line.count("|") for line in lines}) == 1
  assert any("| fast-skinny | jax |" in line for line in lines)
  assert any("| fast | jax-sparse |" in line for line in lines)


def test_cascade_auto_batch_uses_the_translators_pick(monkeypatch):
  # The Translator's auto pick is stubbed to a batch no config uses (3), so
  # the row shows whether the benchmark asked for it and ran with it.
  calls = []

  def pick(bytes_at, budget, n_dev, cap):
    calls.append(cap)
    return 3
  monkeypatch.setattr(infer, "pick_batch_size", pick)
  args = throughput.parse_args(["--quick", "--cascade-batch", "auto"],
                               backend="cpu")
  (row,) = throughput.bench_cascade(args)
  assert row["error"] is None, row
  assert calls == [infer.AUTO_MAX_BATCH["cpu"]]
  assert row["batch_source"] == "auto" and row["batch"] == 3
  given = throughput.parse_args(["--quick", "--cascade-batch", "3"],
                                backend="cpu")
  assert throughput.cascade_config(given, 64).infer.batch_size == 3


def test_markdown_tables(no_torch_run):
  out, data = no_torch_run
  with open(os.path.join(out, "throughput-cpu.md")) as f:
    text = f.read()
  assert text == throughput.markdown(data)
  assert "**HR generator forward**" in text and "| 48³ | ours |" in text
  assert "**Whole cascade**" in text
  assert "**Edge sketch**" in text and "| 48³ | jax |" in text
  assert (f"- stitch monai sliding_window_inference 48³: "
          f"{throughput.NO_TORCH}") in text.splitlines()


@pytest.mark.parametrize("threads", [1, 3])
def test_tile_round_trip_with_a_network(threads):
  """The stitch benchmark's loop keeps each patch's centre: a network that
  marks every voxel with its patch number (read off the patch's corner,
  since batches may run in any order) gives the plan's own layout."""
  shape = (30, 27, 41)
  z, y, x = np.meshgrid(*map(np.arange, shape), indexing="ij")
  vol = (z * 10000 + y * 100 + x).astype(np.float32)  # exact in float32
  plan = tiling.make_plan(vol.shape, 16, 3)
  number_of = {(s0, s1, s2): i for i, (s0, s1, s2) in enumerate(
      itertools.product(*plan.starts))}
  calls = []

  def number(patches):
    calls.append(len(patches))
    corner = patches[:, 0, 0, 0].astype(int)
    ids = np.array([number_of[(c // 10000, c // 100 % 100, c % 100)]
                    for c in corner], np.float32)
    return np.broadcast_to(ids[:, None, None, None], patches.shape)
  out = throughput.tile_round_trip(vol, 16, 3, 5, number, threads=threads)
  assert sum(calls) == plan.num_patches and max(calls) == 5
  for i in range(plan.num_patches):
    v, _ = plan.kept_slices(i)
    assert np.all(out[v] == i)


def test_blobs_are_smooth_and_in_range():
  v = throughput.blobs(40, seed=3)
  assert v.shape == (40,) * 3 and v.dtype == np.float32
  assert -1.0 <= v.min() < -0.99 and 0.0 < v.max() <= 1.0
  assert 0.1 < np.mean(v > -0.95) < 0.9  # blobs and background
  assert np.abs(np.diff(v, axis=0)).max() < 0.5  # no jumps
  assert np.array_equal(v, throughput.blobs(40, seed=3))


def test_hr_forward_flops_is_the_documented_count():
  # models/hr.py: 36.3 GFLOP per 32³ patch at ngf 64, 6 blocks, 2 channels.
  assert round(throughput.hr_forward_flops(64, 6, 32) / 1e9, 1) == 36.3
  # Twice the side: 8x the work.
  assert throughput.hr_forward_flops(8, 2, 32) == 8 * \
      throughput.hr_forward_flops(8, 2, 16)


@pytest.mark.parametrize("kind,match,bf16", [
    ("NVIDIA H100 80GB HBM3", "H100", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", "A100", 312e12),
])
def test_peak_lookup(kind, match, bf16):
  peak = throughput.peak_flops(kind)
  assert peak["match"] == match and peak["bf16"] == bf16
  assert peak["fp32"] < peak["tf32"] < peak["bf16"]


def test_peak_lookup_unknown():
  assert throughput.peak_flops("cpu") is None


def _fwd(framework, dtype, batch, s, impl=None, error=None):
  return {"section": "hr_forward", "framework": framework,
          "impl": impl or ("fast" if framework == "jax" else "torch_port"),
          "dtype": dtype, "batch": batch, "s_per_patch": s, "error": error}


def test_ratios_take_each_sides_best_batch():
  results = {"hr_forward": [
      _fwd("jax", "fp32", 1, 0.5), _fwd("jax", "fp32", 4, 0.3),
      _fwd("jax", "fp32", 8, None, error="out of memory"),
      _fwd("torch", "fp32", 1, 0.4), _fwd("torch", "fp32", 4, 0.6),
      _fwd("jax", "fp32", 1, 5.0, impl="plain"),
      _fwd("jax", "bf16", 1, 0.2),
      _fwd("torch", "bf16", 1, None, error="boom")],
      "train_step": None,
      "stitch": [{"framework": "ours", "size": 64, "median_s": 1.0,
                  "error": None},
                 {"framework": "ours", "size": 128, "median_s": 2.0,
                  "error": None},
                 {"framework": "monai", "size": 64, "median_s": 9.0,
                  "error": None},
                 {"framework": "monai", "size": 128, "median_s": 5.0,
                  "error": None}]}
  ratios, why = throughput.compute_ratios(results)
  assert ratios["jax_over_torch_per_patch"] == pytest.approx(0.3 / 0.4)
  assert ratios["fast_over_plain_forward"] == pytest.approx(0.5 / 5.0)
  assert ratios["stitch_speedup_vs_monai"] == pytest.approx(5.0 / 2.0)
  assert ratios["jax_over_torch_per_patch_bf16"] is None
  assert "boom" in why["jax_over_torch_per_patch_bf16"]
  assert ratios["jax_over_torch_train_step_lr"] is None
  assert "train_step not run" in why["jax_over_torch_train_step_lr"]



def _step(framework, impl, kind, batch, s):
  return {"section": "train_step", "framework": framework, "impl": impl,
          "kind": kind, "batch": batch, "s_per_step": s, "error": None}


def _edge(impl, size, s):
  return {"section": "edges", "impl": impl, "size": size, "median_s": s,
          "error": None}


def test_ratios_of_the_fast_variants_and_the_edges():
  """``fast_over_{im2col,plain}_train_step_*`` are the fast step's seconds
  over the other's (batch 1, each kind on its own); ``fast_over_im2col_
  forward`` compares the fast forward at the batch im2col ran at, not the
  fast form's best batch; ``edges_jax_over_numpy`` is taken at the largest
  size measured."""
  step = [_step("jax", "fast", "hr", 1, 1.0),
          _step("jax", "fast", "hr", 4, 0.1),  # another batch: not compared
          _step("jax", "fast-im2col", "hr", 1, 4.0),
          _step("jax", "plain", "hr", 1, 8.0),
          _step("torch", "torch_port", "hr", 1, 2.0),
          _step("jax", "fast", "lr", 1, 3.0),
          _step("jax", "fast-im2col", "lr", 1, 6.0),
          _step("jax", "plain", "lr", 1, 30.0)]
  fwd = [_fwd("jax", "fp32", 2, 0.2), _fwd("jax", "fp32", 8, 0.1),
         _fwd("jax", "fp32", 2, 0.4, impl="fast-im2col"),
         # im2col at another batch too, faster: not what is compared
         _fwd("jax", "fp32", 8, 0.3, impl="fast-im2col")]
  edges = [_edge("jax", 64, 1.0), _edge("numpy", 64, 2.0),
           _edge("jax", 128, 3.0), _edge("numpy", 128, 12.0)]
  ratios, why = throughput.compute_ratios(
      {"hr_forward": fwd, "train_step": step, "edges": edges})
  assert set(ratios) == set(throughput.RATIO_KEYS)
  assert ratios["fast_over_im2col_train_step_hr"] == pytest.approx(0.25)
  assert ratios["fast_over_plain_train_step_hr"] == pytest.approx(0.125)
  assert ratios["fast_over_im2col_train_step_lr"] == pytest.approx(0.5)
  assert ratios["fast_over_plain_train_step_lr"] == pytest.approx(0.1)
  assert ratios["jax_over_torch_train_step_hr"] == pytest.approx(0.5)
  assert ratios["fast_over_im2col_forward"] == pytest.approx(0.2 / 0.4)
  assert ratios["edges_jax_over_numpy"] == pytest.approx(3.0 / 12.0)
  assert ratios["jax_over_torch_train_step_lr"] is None
  assert "not measured" in why["jax_over_torch_train_step_lr"]

def test_defaults_follow_quick_and_the_backend(capsys):
  q = throughput.parse_args(["--quick"], backend="cpu")
  assert (q.batches, q.plain_batches, q.plain_dtypes) == ([1, 2], [1],
                                                           ["fp32"])
  assert (q.stitch_sizes, q.cascade_sizes, q.repeats) == ([48], [64], 1)
  assert q.cascade_widths == "demo"
  cpu = throughput.parse_args([], backend="cpu")
  assert cpu.cascade_sizes == [128, 256] and cpu.repeats == 3
  assert cpu.batches == [1, 4, 8, 16, 32] and cpu.plain_batches == [1]
  assert cpu.train_batches == [1, 4] and cpu.cascade_widths == "paper"
  assert cpu.lr_train_batches == [1, 2] and q.lr_train_batches == [1]
  assert cpu.plain_repeats is None  # the plain steps time --repeats runs
  with pytest.raises(SystemExit):
    throughput.parse_args(["--plain-repeats", "0"], backend="cpu")
  for flag in ("--cascade-repeats", "--torch-threads"):
    with pytest.raises(SystemExit):
      throughput.parse_args([flag, "0"], backend="cpu")
  # A negative seed was a traceback once the benchmark ran; an edge size
  # of 1 was reported as "[0]".
  for argv, said in ((["--seed", "-1"], "--seed -1: must be >= 0"),
                     (["--edge-sizes", "1"], "--edge-sizes [1]: must be >= 2")):
    with pytest.raises(SystemExit):
      throughput.parse_args(argv, backend="cpu")
    assert said in capsys.readouterr().err
  assert cpu.cascade_dtype == "fp32"
  gpu = throughput.parse_args([], backend="gpu")
  assert gpu.cascade_sizes == [128, 256, 512, 1024]
  assert gpu.cascade_dtype == "bf16"  # the 512³ goal's dtype
  assert throughput.parse_args(["--cascade-dtype", "fp32"],
                               backend="gpu").cascade_dtype == "fp32"
  # A GPU picks the cascade's patch batch from its memory; elsewhere the
  # config's (as the committed CPU results).
  assert gpu.cascade_batch == "auto" and cpu.cascade_batch is None
  assert throughput.parse_args(["--cascade-batch", "16"],
                               backend="gpu").cascade_batch == 16
  assert throughput.parse_args(["--cascade-batch", "auto"],
                               backend="cpu").cascade_batch == "auto"
  for bad in ("0", "x"):
    with pytest.raises(SystemExit):
      throughput.parse_args(["--cascade-batch", bad], backend="cpu")
  assert gpu.plain_batches == gpu.batches
  assert gpu.plain_dtypes == ["fp32", "bf16"]
  none = throughput.parse_args(["--plain-batches", "--plain-train-batches"],
                               backend="cpu")
  assert none.plain_batches == [] and none.plain_train_batches == []
  with pytest.raises(SystemExit):
    throughput.parse_args(["--batches", "0"], backend="cpu")


def test_torch_comparisons(tmp_path):
  """Where torch and MONAI are installed: the port computes our forward
  (fp32, the same weights) and MONAI runs the same tiling."""
  pytest.importorskip("torch", exc_type=ImportError)
  pytest.importorskip("monai", exc_type=ImportError)
  rc = throughput.main(["--quick", "--out", str(tmp_path), "--only",
                        "hr_forward", "stitch", "--dtypes", "fp32",
                        "--batches", "1", "--plain-batches"])
  assert rc == 0
  data = _load(str(tmp_path))
  assert data["meta"]["torch_threads"] == data["meta"]["threads"]
  (row,) = _rows(data, "hr_forward", framework="torch")
  assert row["error"] is None, row
  assert row["agrees"] is True and row["max_abs_diff"] < 1e-4
  (monai,) = _rows(data, "stitch", framework="monai")
  (ours,) = _rows(data, "stitch", framework="ours")
  assert monai["error"] is None and monai["max_abs_diff"] < 1e-5
  assert monai["patches"] == ours["patches"]  # the same window grid
  ratios = data["ratios"]
  assert ratios["jax_over_torch_per_patch"] > 0
  assert ratios["stitch_speedup_vs_monai"] > 0
  assert ratios["fast_over_plain_forward"] is None  # no plain asked for
  assert "not measured" in data["meta"]["ratio_missing"][
      "fast_over_plain_forward"]


def test_paired_alternates_jax_and_torch(tmp_path):
  pytest.importorskip("torch", exc_type=ImportError)
  rc = throughput.main(["--quick", "--out", str(tmp_path), "--only",
                        "paired", "--paired-cases", "hr_forward",
                        "train_step_hr", "--paired-rounds", "2"])
  assert rc == 0
  data = _load(str(tmp_path))
  rows = data["results"]["paired"]
  assert [r["case"] for r in rows] == ["hr_forward", "train_step_hr"]
  for r in rows:
    assert r["error"] is None, r
    assert len(r["jax_times_s"]) == len(r["torch_times_s"]) == 2
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
  ratios = data["ratios"]
  assert ratios["paired_jax_over_torch_per_patch"] == rows[0]["ratio_median"]
  assert ratios["paired_jax_over_torch_train_step_hr"] > 0
  assert ratios["paired_jax_over_torch_train_step_lr"] is None


@pytest.mark.parametrize("kind", ["hr", "lr"])
def test_torch_train_step_takes_our_batches(kind):
  """The PyTorch step runs on the benchmark's batches, with weights of our
  state's shapes copied in (no JAX compile: zeros of the abstract state)."""
  pytest.importorskip("torch", exc_type=ImportError)
  import jax
  from megan_jax import state as state_lib
  tc = throughput.load_torch(throughput.xla_threads(), "cpu")
  assert tc.error is None, tc.error
  config = throughput.train_config(throughput.QUICK, kind, "fast", 1)
  abstract = state_lib.abstract_state(config, kind)
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                    tree)
  g, d = throughput.torch_gan(tc.port, config, kind,
                              zeros(abstract.g_params),
                              zeros(abstract.d_params))
  assert tc.port.count_params(g) == state_lib.count_params(abstract.g_params)
  assert tc.port.count_params(d) == state_lib.count_params(abstract.d_params)
  step = tc.port.make_train_step(g, d, kind=kind)
  batch = throughput.train_batch(config, kind, 1, seed=0)
  metrics = step({k: tc.tensor(v) for k, v in batch.items()})
  assert np.isfinite(metrics["g_loss"]) and np.isfinite(metrics["d_loss"])


def test_im2col_variant_traces_the_fast_form_without_taps_or_winograd():
  import jax
  import jax.numpy as jnp
  from megan_jax.models import layers

  def dots(fn, *shapes):
    """The dot_generals' dimension numbers, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
      for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
          found.append(e.params["dimension_numbers"])
        for value in e.params.values():
          sub = getattr(value, "jaxpr", value)
          if hasattr(sub, "eqns"):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*[jnp.zeros(s) for s in shapes]).jaxpr)
    return found

  many_tiles = ((2, 16, 16, 16, 32), (3, 3, 3, 32, 32))  # Winograd F(2, 3)
  many_tiles_k2 = ((1, 17, 17, 17, 32), (2, 2, 2, 32, 32))  # F(2, 2)
  wide_in = ((1, 17, 17, 17, 64), (2, 2, 2, 64, 8))  # taps
  fast = lambda x, k: layers.conv3d_fast(x, k, 1)
  fast0 = lambda x, k: layers.conv3d_fast(x, k, 0)
  one = (((4,), (0,)), ((), ()))  # [..., C_in] @ [C_in, C_out]
  assert dots(fast, *many_tiles) == [one] * 64  # one per tile position
  assert dots(fast0, *many_tiles_k2) == [one] * 27
  assert any(d[0] == ((1,), (4,)) for d in dots(fast0, *wide_in))  # taps
  with throughput.conv_form("fast-im2col"):  # fresh functions: no cached trace
    for pad, shapes in ((1, many_tiles), (0, many_tiles_k2), (0, wide_in)):
      fn = lambda x, k, pad=pad: layers.conv3d_fast(x, k, pad)
      # one dot: im2col columns · kernel
      assert dots(fn, *shapes) == [one]
  narrow = ((1, 10, 10, 10, 1), (3, 3, 3, 1, 16))
  assert layers.NARROW_CHANNELS >= 1
  assert jax.make_jaxpr(fast)(*[jnp.zeros(s) for s in narrow]).eqns[
      0].primitive.name.startswith("custom_vjp")
  with throughput.conv_form("fast-im2col"):
    fn = lambda x, k: layers.conv3d_fast(x, k, 1)
    assert dots(fn, *narrow) == [one]
    assert jax.make_jaxpr(fn)(*[jnp.zeros(s) for s in narrow]).eqns[
        0].primitive.name != "custom_vjp_call"
  assert (layers.TAPS_RATIO, layers.WINOGRAD_MIN_TILES,
          layers.NARROW_CHANNELS) == (4, 256, 4)


def test_time_alternating_takes_turns_and_keeps_a_failing_call_out():
  order = []

  def bad():
    order.append("bad")
    raise RuntimeError("no such window")

  got = throughput.time_alternating(
      {"a": lambda: order.append("a"), "b": lambda: order.append("b"),
       "bad": bad}, repeats=3)
  assert order == ["a", "b", "bad"] + ["a", "b"] * 3
  assert isinstance(got["bad"], RuntimeError)
  for name in ("a", "b"):
    first, times = got[name]
    assert first >= 0 and len(times) == 3


def test_fp32_flops_row_gives_the_tf32_fraction_too(no_torch_run):
  # On a Hopper GPU XLA runs fp32 convolutions as TF32 (JAX's default
  # precision): session 15's H200 fp32 forward beat the plain fp32 peak
  # (fraction 1.11), so the table also holds it to the TF32 one.
  _, data = no_torch_run
  data = json.loads(json.dumps(data))
  row = dict(data["results"]["flops"][0], dtype="fp32", batch=32,
             achieved_flops=74.3e12, peak_flops=67e12,
             peak_tf32_flops=494e12, peak_assumed="H200 datasheet, dense",
             fraction_of_peak=74.3 / 67, error=None)
  data["results"]["flops"] = [row, dict(row, dtype="bf16",
                                        peak_tf32_flops=None)]
  lines = [line for line in throughput.markdown(data).splitlines()
           if line.startswith(("| fp32 | 32 |", "| bf16 | 32 |"))]
  assert lines[0].endswith(f"| 1.11 | {74.3 / 494:.3g} |")
  assert lines[1].endswith("| – |")


def test_a_failed_cascade_rerun_keeps_the_measured_row():
  """--merge: a case that ran before and fails now (out of memory) keeps
  its earlier row, the error noted; new cases and new failures of cases
  never measured are this run's."""
  def row(size, total, error=None):
    return {"size": size, "widths": "paper", "dtype": "bf16", "impl": "fast",
            "edges": "jax", "total_s": total, "error": error}
  old = [row(512, 8.85), row(1024, None, "old failure")]
  new = [row(512, None, "out of memory"), row(1024, None, "again"),
         row(256, 2.0)]
  got = {r["size"]: r for r in throughput.merge_cascade(new, old)}
  assert got[512]["total_s"] == 8.85
  assert got[512]["rerun_error"] == "out of memory"
  assert got[1024]["error"] == "again" and got[256]["total_s"] == 2.0
  assert len(throughput.merge_cascade(new, old)) == 3
  assert throughput.merge_cascade([row(512, 9.0)], old)[0]["total_s"] == 9.0


def test_merge_keeps_sections_of_the_same_device_only(tmp_path, monkeypatch,
                                                     capsys):
  _without_torch(monkeypatch)
  out = str(tmp_path)
  quick = ["--quick", "--out", out, "--edge-sizes", "24"]
  assert throughput.main(quick + ["--only", "edges"]) == 0
  assert throughput.main(quick + ["--only", "stitch", "--merge"]) == 0
  data = _load(out)
  assert data["results"].get("edges") and data["results"].get("stitch")
  # The file says another device measured it: refused, the file kept (its
  # sections were dropped and the file rewritten: another card's committed
  # results lost).
  path = os.path.join(out, f"throughput-{data['meta']['backend']}.json")
  data["meta"]["device_kind"] = "Some Other GPU"
  with open(path, "w") as f:
    json.dump(data, f)
  before = open(path).read()
  assert throughput.main(quick + ["--only", "stitch", "--merge"]) == 2
  assert "measured on Some Other GPU" in capsys.readouterr().err
  assert open(path).read() == before
  assert throughput.main(quick + ["--only", "stitch"]) == 0  # afresh
  assert set(_load(out)["meta"]["sections"]) == {"stitch"}


@pytest.mark.slow
def test_cascade_budget_stops_the_timed_runs(monkeypatch):
  # The 1024³ cascade on a GPU takes over a minute a run: under a step's
  # time limit, one timed run is taken instead of --cascade-repeats.
  runs = []
  real = infer.Translator.translate_normalised

  def counted(self, *a, **k):
    runs.append(1)
    return real(self, *a, **k)
  monkeypatch.setattr(infer.Translator, "translate_normalised", counted)
  args = throughput.parse_args(["--quick", "--cascade-repeats", "3",
                                "--cascade-budget-s", "1e-9"], backend="cpu")
  (row,) = throughput.bench_cascade(args)
  assert row["error"] is None, row
  assert len(runs) == len(row["times_s"]) == 1
  table = throughput.markdown({
      "meta": {"backend": "cpu", "device_kind": "cpu", "threads": 2,
               "jax_version": "x", "command": "c", "repeats": 3},
      "results": {"cascade": [row]}, "ratios": {}})
  (line,) = [s for s in table.splitlines() if s.startswith("| 64³ |")]
  assert line.split("|")[-3].strip() == "1"  # the runs column
  with pytest.raises(SystemExit):
    throughput.parse_args(["--cascade-budget-s", "0"], backend="cpu")


def test_zero_counts_and_unusable_files_are_refused(tmp_path, monkeypatch,
                                                    capsys):
  # A 0 used to read as "the default" (`x or default`): --repeats 0 ran
  # the whole benchmark.
  for flag in ("--repeats", "--paired-batch", "--paired-rounds"):
    with pytest.raises(SystemExit) as e:
      throughput.parse_args([flag, "0"], backend="cpu")
    assert e.value.code == 2 and f"{flag} [0]" in capsys.readouterr().err
  _without_torch(monkeypatch)
  a_file = tmp_path / "f"
  a_file.write_text("")
  assert throughput.main(["--quick", "--only", "stitch", "--out",
                          str(a_file)]) == 2
  assert "exists and is not a folder" in capsys.readouterr().err
  out = tmp_path / "results"
  out.mkdir()
  for damaged in ('{"meta": 1', '{"meta": {}}'):  # not JSON; no results
    (out / "throughput-cpu.json").write_text(damaged)
    assert throughput.main(["--quick", "--only", "stitch", "--merge",
                            "--out", str(out)]) == 2
    assert "not a results file" in capsys.readouterr().err
    assert (out / "throughput-cpu.json").read_text() == damaged


def test_the_cascade_table_counts_the_timed_runs():
  row = {"size": 64, "widths": "paper", "dtype": "fp32", "patches": {},
         "stages_s": {"lr": 1.0}, "total_s": 1.0, "compile_s": 1.0,
         "times_s": [1.0, 1.1], "error": None}
  table = throughput.markdown({
      "meta": {"backend": "cpu", "device_kind": "cpu", "threads": 2,
               "jax_version": "x", "command": "c", "repeats": 3},
      "results": {"cascade": [row]}, "ratios": {}})
  header = [s for s in table.splitlines() if s.startswith("| output |")]
  (line,) = [s for s in table.splitlines() if s.startswith("| 64³ |")]
  runs = [c.strip() for c in header[0].split("|")].index("runs")
  assert line.split("|")[runs].strip() == "2"


def test_random_generators_are_reused_by_scale_and_seed():
  """The cascade's cases share their scales' random parameters (the
  initialisers' compiles were set-up time inside the GPU step's limit),
  but never across seeds or widths."""
  import jax
  args = throughput.parse_args(["--quick"], backend="cpu")
  small, large = (throughput.cascade_config(args, n) for n in (64, 128))
  a = throughput.random_generators(small, 0)
  b = throughput.random_generators(large, 0)
  assert list(a) == ["lr", "hr1"] and list(b) == ["lr", "hr1", "hr2"]
  assert a["lr"] is b["lr"] and a["hr1"] is b["hr1"]
  other = throughput.random_generators(small, 1)
  assert not all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(other["hr1"]), jax.tree.leaves(a["hr1"])))
  shapes = lambda p: [x.shape for x in jax.tree.leaves(p)]
  narrow = throughput.cascade_config(args, 64)
  narrow.unlock()
  narrow.model.ngf //= 2
  assert (shapes(throughput.random_generators(narrow, 0)["hr1"])
          != shapes(a["hr1"]))
  alone = throughput.cascade_config(args, 64)  # HR input: its sketch only
  alone.unlock()
  alone.hr_condition = "none"
  assert (shapes(throughput.random_generators(alone, 0)["hr1"])
          != shapes(a["hr1"]))


def test_blobs_are_the_outer_products_summed_in_order():
  """The benchmark volume, built slab by slab, is the same to the bit as
  the whole-volume sum of its blobs (the committed timings' input), also
  across several slabs with a short last one (130³: slabs of 62 planes)."""
  import numpy as np

  def whole(size, seed, count=6):
    rng = np.random.default_rng([seed, size])
    ax = np.arange(size, dtype=np.float32)
    vol = np.zeros((size,) * 3, np.float32)
    for _ in range(count):
      centre = rng.uniform(0.25, 0.75, 3) * size
      sigma = rng.uniform(0.08, 0.2) * size
      g = [np.exp(-0.5 * ((ax - c) / sigma) ** 2).astype(np.float32)
           for c in centre]
      g[0] *= np.float32(rng.uniform(0.4, 1.0))
      vol += np.multiply.outer(np.multiply.outer(g[0], g[1]), g[2])
    return np.clip(vol, 0.0, 1.0) * np.float32(2.0) - np.float32(1.0)

  for size, seed in ((1, 0), (9, 1), (130, 2)):
    got = throughput.blobs(size, seed)
    assert got.dtype == np.float32 and got.shape == (size,) * 3
    np.testing.assert_array_equal(got, whole(size, seed))
  assert throughput.blobs(130, 2).min() < -0.99  # a background is there
