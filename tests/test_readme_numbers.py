"""The README's benchmark numbers against the committed results.

Every expected value is computed from ``benchmarks/results/*.json`` (or the
``.md`` files written beside them), so a rerun that changes a result, or an
edit of the README, fails here until the two agree again. Nothing is
measured or compiled: the files are only read.
"""
import functools
import json
import math
import os
import re
import sys

import pytest

# ``benchmarks`` lives beside the package, at the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks import memory  # noqa: E402

README = os.path.join(_ROOT, "README.md")
RESULTS = os.path.join(_ROOT, "benchmarks", "results")
GIB = 2**30
# The methods of Table 1, as the first cell of their rows.
TABLE1_METHODS = ("MEGAN", "patch-wise GAN", "small GAN + upsampling",
                  "NLM-filtered input", "input as is")


@functools.cache
def _readme() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def _result(name: str):
  """A file of ``benchmarks/results``: parsed if JSON, else its text."""
  with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
    return json.load(f) if name.endswith(".json") else f.read()


def _section(start: str, end: str) -> str:
  """The README from the line starting with ``start`` to the next line
  starting with ``end`` (or the end of the file)."""
  text = _readme()
  match = re.search(f"^{re.escape(start)}", text, re.M)
  assert match, f"README has no line starting with {start!r}"
  text = text[match.start():]
  first = text.index("\n") + 1  # the first line may start with ``end`` too
  stop = re.search(f"^{re.escape(end)}", text[first:], re.M)
  return text[:first + stop.start()] if stop else text


def _prose(text: str) -> str:
  """``text`` with every run of whitespace (line breaks too) as one space,
  so a sentence matches however the README wraps it."""
  return " ".join(text.split())


def _first_table(text: str) -> tuple[list[str], list[list[str]]]:
  """The header cells and body rows (cells stripped) of the first markdown
  table in ``text``."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  table = []
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    table.append([c.strip() for c in line.strip().strip("|").split("|")])
  header, separator, *rows = table
  assert set("".join(separator)) <= set("-:"), separator
  return header, rows


def _search(pattern: str, text: str) -> re.Match:
  match = re.search(pattern, text)
  assert match, f"README no longer says {pattern!r}"
  return match


def _agrees(quoted: str, value: float) -> bool:
  """Whether ``value`` rounds to ``quoted`` at the decimals it is quoted
  with ("0.29" for 0.2907, "67" for 67.0)."""
  decimals = len(quoted.partition(".")[2])
  return quoted == f"{value:.{decimals}f}"


def _sig3(value: float) -> str:
  """``value`` to 3 significant figures, trailing zeros kept (0.680)."""
  decimals = max(0, 2 - math.floor(math.log10(abs(value))))
  return f"{value:.{decimals}f}"


def test_memory_cpu_table_is_the_jsons():
  """The CPU memory table is ``markdown_table`` of memory-cpu.json."""
  results = _result("memory-cpu.json")["results"]
  table = memory.markdown_table(results, "compiled")
  assert table and table in _readme()


def test_memory_gpu_table_and_bytes_are_the_jsons():
  """Every cell of the hand-written GPU table, and the bytes and growth
  factors quoted below it, against memory-gpu.json's peak rows."""
  peak = [r for r in _result("memory-gpu.json")["results"]
          if r["measure"] == "peak"]
  section = _section("**Measured on a GPU**", "**Measured on an H100**")
  header, rows = _first_table(section)
  assert header[0] == "model"
  sizes = [int(_search(r"^(\d+)³$", cell).group(1)) for cell in header[1:]]
  models = [row[0].split()[0] for row in rows]  # "megan_cascade (inference)"
  # Every row of the JSON has its cell.
  assert {(r["model"], r["size"]) for r in peak} <= {
      (m, s) for m in models for s in sizes}
  for model, row in zip(models, rows):
    assert len(row) == 1 + len(sizes), row
    for size, cell in zip(sizes, row[1:]):
      case = [r for r in peak if (r["model"], r["size"]) == (model, size)]
      got = [r["bytes"] for r in case if r["bytes"] is not None]
      timeouts = [r["error"] for r in case
                  if (r["error"] or "").startswith("timeout")]
      where = f"{model} at {size}³"
      if got:
        (nbytes,) = set(got)
        assert cell == f"{nbytes / GIB:.2f}", where
      elif timeouts:
        # The JSON's error text names the case's configured limit; nothing
        # is timed here, the README's cell must only say the same.
        limit = _search(r"(\d+) s", timeouts[-1]).group(1)
        assert cell == f"timed out ({limit} s)", where
      else:
        assert cell == "", where

  text = _prose(section)

  def measured(model):
    """{size: bytes} of ``model``'s measured rows."""
    return {r["size"]: r["bytes"] for r in peak
            if r["model"] == model and r["bytes"] is not None}

  def quoted_sizes(text):
    return {int(s) for s in re.findall(r"(\d+)³", text)}

  cascade = _search(r"cascade peaked at ([\d,]+) bytes at (.+?), the same to "
                    r"the byte", text)
  assert set(measured("megan_cascade").values()) == {
      int(cascade.group(1).replace(",", ""))}
  assert set(measured("megan_cascade")) == quoted_sizes(cascade.group(2))
  steps = _search(r"training steps at ([\d,]+) \(LR\) and ([\d,]+) \(HR\) "
                  r"bytes at (.+?)\.", text)
  for model, quoted in (("megan_lr_step", steps.group(1)),
                        ("megan_hr_step", steps.group(2))):
    assert set(measured(model).values()) == {int(quoted.replace(",", ""))}
    assert set(measured(model)) == quoted_sizes(steps.group(3))
  # The baselines' growth per doubling of the side.
  growth = _search(r"DCGAN ×([\d.]+) then ×([\d.]+), Pix2Pix ×([\d.]+) then "
                   r"×([\d.]+), PGGAN ×([\d.]+)\.", text).groups()
  expected = []
  for model in ("dcgan", "pix2pix", "pggan"):
    by_size = measured(model)
    sides = sorted(by_size)
    assert all(b == 2 * a for a, b in zip(sides, sides[1:])), (model, sides)
    expected += [by_size[b] / by_size[a] for a, b in zip(sides, sides[1:])]
  assert len(growth) == len(expected)
  for quoted, value in zip(growth, expected):
    assert _agrees(quoted, value), (quoted, value)


def test_memory_gpu_h100_table_and_bytes_are_the_jsons():
  """The H100 table (cells "compiled / peak") and the bytes and growth
  factors quoted below it, against memory-gpu-h100.json."""
  data = _result("memory-gpu-h100.json")
  assert data["meta"]["device_kind"] == "NVIDIA H100 80GB HBM3"
  rows_json = data["results"]
  section = _section("**Measured on an H100**", "## ")
  header, rows = _first_table(section)
  sizes = [int(_search(r"^(\d+)³$", cell).group(1)) for cell in header[1:]]
  models = [row[0].split()[0] for row in rows]

  def expected(model, size, measure):
    case = [r for r in rows_json if (r["model"], r["size"], r["measure"])
            == (model, size, measure)]
    got = [r["bytes"] for r in case if r["bytes"] is not None]
    if got:
      (nbytes,) = set(got)
      return f"{nbytes / GIB:.2f}"
    timeouts = [r["error"] for r in case
                if (r["error"] or "").startswith("timeout")]
    if timeouts:
      limit = _search(r"(\d+) s", timeouts[-1]).group(1)
      return f"timed out ({limit} s)"
    return ""

  assert {(r["model"], r["size"]) for r in rows_json} <= {
      (m, z) for m in models for z in sizes}
  for model, row in zip(models, rows):
    assert len(row) == 1 + len(sizes), row
    for size, cell in zip(sizes, row[1:]):
      want = [expected(model, size, m) for m in ("compiled", "peak")]
      assert cell == ("" if want == ["", ""] else " / ".join(want).strip()), (
          model, size, cell, want)

  text = _prose(section)

  def measured(model, measure):
    return {r["size"]: r["bytes"] for r in rows_json if r["model"] == model
            and r["measure"] == measure and r["bytes"] is not None}

  def quoted_sizes(text):
    return {int(z) for z in re.findall(r"(\d+)³", text)}

  m = _search(r"cascade peaked at ([\d,]+) bytes at (.+?) here too, the same "
              r"to the byte as on the H200, and its compiled figure is "
              r"([\d,]+) bytes at every size that compiled \((\d+)³ to "
              r"(\d+)³\)", text)
  peak = measured("megan_cascade", "peak")
  assert set(peak.values()) == {int(m.group(1).replace(",", ""))}
  assert set(peak) == quoted_sizes(m.group(2))
  h200 = {r["bytes"] for r in _result("memory-gpu.json")["results"]
          if r["model"] == "megan_cascade" and r["measure"] == "peak"
          and r["bytes"]}
  assert h200 == set(peak.values())
  compiled = measured("megan_cascade", "compiled")
  assert set(compiled.values()) == {int(m.group(3).replace(",", ""))}
  assert (min(compiled), max(compiled)) == (int(m.group(4)), int(m.group(5)))
  steps = _search(r"training steps peaked at ([\d,]+) \(LR\) and ([\d,]+) "
                  r"\(HR\) bytes at (.+?) \(the H200's within ([\d.]+) %",
                  text)
  h200 = _result("memory-gpu.json")["results"]
  for model, quoted in (("megan_lr_step", steps.group(1)),
                        ("megan_hr_step", steps.group(2))):
    ours = measured(model, "peak")
    assert set(ours.values()) == {int(quoted.replace(",", ""))}
    assert set(ours) == quoted_sizes(steps.group(3))
    (theirs,) = {r["bytes"] for r in h200 if r["model"] == model
                 and r["measure"] == "peak" and r["bytes"]}
    assert abs(ours[min(ours)] / theirs - 1) * 100 < float(steps.group(4))
  growth = _search(r"compiled memory grows per doubling of the side: DCGAN "
                   r"×([\d.]+) then ×([\d.]+), Pix2Pix ×([\d.]+) then "
                   r"×([\d.]+), PGGAN ×([\d.]+)\.", text).groups()
  want = []
  for model in ("dcgan", "pix2pix", "pggan"):
    by_size = measured(model, "compiled")
    sides = sorted(by_size)
    want += [by_size[b] / by_size[a] for a, b in zip(sides, sides[1:])]
  assert len(growth) == len(want)
  for quoted, value in zip(growth, want):
    assert _agrees(quoted, value), (quoted, value)


def test_throughput_gpu_numbers_are_the_jsons():
  """The HR forward table (ms per patch, 3 significant figures), the 512³
  cascade, the JAX / PyTorch ratios and the achieved FLOP/s under
  "### On a GPU" (H200) against throughput-gpu.json, and under "### On an
  H100" against throughput-gpu-h100.json."""
  _check_gpu_throughput(_result("throughput-gpu.json"),
                        _section("### On a GPU", "### "))
  data = _result("throughput-gpu-h100.json")
  assert data["meta"]["device_kind"] == "NVIDIA H100 80GB HBM3"
  section = _section("### On an H100", "## ")
  casc = _check_gpu_throughput(data, section)
  text = _prose(section)
  assert casc["size"] == 512 and casc["dtype"] == "bf16"
  of_goal = _search(r"under 10 s on one H100 in bf16, is met\*\* \(([\d.]+) "
                    r"of it\)", text).group(1)
  assert _agrees(of_goal, casc["total_s"] / 10) and casc["total_s"] < 10
  total, hr3 = _search(r"With impl `fast-skinny` ([\d.]+) s \(HR3 ([\d.]+) s",
                       text).groups()
  (skinny,) = [r for r in data["results"]["cascade"]
               if r.get("impl") == "fast-skinny" and not r["error"]]
  assert _agrees(total, skinny["total_s"])
  assert _agrees(hr3, skinny["stages_s"]["hr3"])


def _check_gpu_throughput(data, section):
  """Checks one GPU section against its JSON; returns the cascade row."""
  res, ratios = data["results"], data["ratios"]

  # HR generator forward.
  forward = [r for r in res["hr_forward"] if not r["error"]]
  header, rows = _first_table(section)
  batches = [int(_search(r"^batch (\d+)$", cell).group(1))
             for cell in header[1:]]
  seen = set()
  for label, *cells in rows:
    jax_row = re.fullmatch(r"JAX \(`impl` (\w+)\) (.+)", label)
    torch_row = re.fullmatch(r"PyTorch port (.+)", label)
    assert jax_row or torch_row, label
    framework, impl, dtypes = (
        ("jax", jax_row.group(1), jax_row.group(2)) if jax_row
        else ("torch", "torch_port", torch_row.group(1)))
    dtypes = dtypes.split(" / ")
    for batch, cell in zip(batches, cells, strict=True):
      per_dtype = (cell.split(" / ") if cell != "–"
                   else [None] * len(dtypes))  # not measured
      for dtype, ms in zip(dtypes, per_dtype, strict=True):
        key = (framework, impl, dtype, batch)
        case = [r for r in forward
                if (r["framework"], r["impl"], r["dtype"], r["batch"]) == key]
        if ms is None:
          assert not case, key
        else:
          (r,) = case
          assert ms == _sig3(r["s_per_patch"] * 1e3), key
          seen.add(key)
  assert seen == {(r["framework"], r["impl"], r["dtype"], r["batch"])
                  for r in forward}

  text = _prose(section)
  fp32, bf16 = _search(r"JAX over PyTorch per patch, best batch of each: "
                       r"([\d.]+) in fp32 and ([\d.]+) in bf16", text).groups()
  assert _agrees(fp32, ratios["jax_over_torch_per_patch"])
  assert _agrees(bf16, ratios["jax_over_torch_per_patch_bf16"])

  # Achieved FLOP/s, at the batch of the fp32 and the bf16 rows.
  (f32,) = [r for r in res["flops"] if r["dtype"] == "fp32"]
  (b16,) = [r for r in res["flops"] if r["dtype"] == "bf16"]
  (gflop, flops_batch, tflops32, of_peak32, peak32, of_tf32, peak_tf32,
   tflops16, of_peak16, peak16) = _search(
       r"Achieved FLOP/s \(([\d.]+) GFLOP per patch, batch (\d+)\): fp32 "
       r"([\d.]+) TFLOP/s, ([\d.]+) of the plain-fp32 datasheet peak "
       r"\(([\d.]+)\), i\.e\. it ran as TF32: ([\d.]+) of the TF32 peak "
       r"\(([\d.]+)\); bf16 ([\d.]+) TFLOP/s, ([\d.]+) of ([\d.]+)\.",
       text).groups()
  assert f32["batch"] == b16["batch"] == int(flops_batch)
  assert b16["flops_per_patch"] == f32["flops_per_patch"]
  for q, value in (
      (gflop, f32["flops_per_patch"] / 1e9),
      (tflops32, f32["achieved_flops"] / 1e12),
      (of_peak32, f32["fraction_of_peak"]),
      (peak32, f32["peak_flops"] / 1e12),
      (of_tf32, f32["achieved_flops"] / f32["peak_tf32_flops"]),
      (peak_tf32, f32["peak_tf32_flops"] / 1e12),
      (tflops16, b16["achieved_flops"] / 1e12),
      (of_peak16, b16["fraction_of_peak"]),
      (peak16, b16["peak_flops"] / 1e12)):
    assert _agrees(q, value), (q, value)

  # The whole cascade.
  size, dtype = _search(r"Whole cascade to (\d+)³ in (\w+)", text).groups()
  (casc,) = [r for r in res["cascade"] if not r["error"]
             and r["size"] == int(size) and r["dtype"] == dtype
             and r.get("impl", "fast") == "fast"
             and r.get("edges", "jax") == "jax"]
  (casc_batch, edges, lr, n1, hr1, n2, hr2, n3, rate3, hr3, total, run1,
   run2, compile_s) = _search(
      r"device memory: (\d+)\): edges \([^)]*\) ([\d.]+) s, LR ([\d.]+), "
      r"HR1 \(([\d ]+) patches\) ([\d.]+), HR2 \(([\d ]+)\) ([\d.]+), HR3 "
      r"\(([\d ]+), ([\d ]+) patches/s\) ([\d.]+): \*\*([\d.]+) s\*\* "
      r"\(runs ([\d.]+) and ([\d.]+)\), compile ([\d.]+) s", text).groups()
  assert int(casc_batch) == casc["batch"]
  stages = casc["stages_s"]
  for q, value in ((edges, stages["edges"]), (lr, stages["lr"]),
                   (hr1, stages["hr1"]), (hr2, stages["hr2"]),
                   (hr3, stages["hr3"]), (total, casc["total_s"]),
                   (compile_s, casc["compile_s"])):
    assert _agrees(q, value), (q, value)
  assert len(casc["times_s"]) == 2
  for q, value in zip((run1, run2), casc["times_s"]):
    assert _agrees(q, value), (q, value)
  assert [int(n.replace(" ", "")) for n in (n1, n2, n3)] == [
      casc["patches"][k] for k in ("hr1", "hr2", "hr3")]
  rate = casc["hr_patches_per_s"]["hr3"]  # quoted to 3 significant figures
  assert int(rate3.replace(" ", "")) == int(float(f"{rate:.3g}"))
  return casc



def test_profile_cpu_numbers_are_the_jsons():
  """The shares, FLOP/s and edge phases under "### Where the time goes"
  against profile-cpu.json."""
  data = _result("profile-cpu.json")["results"]
  section = _section("### Where the time goes", "### ")
  prose = _prose(section)
  fwd = {r["dtype"]: r for r in data["hr_forward"]}
  header, rows = _first_table(section)
  assert header[1:] == ["fp32", "bf16"]

  def share(r, label):
    groups = {g["group"]: g["share"] for g in r["groups"]}
    kinds = {k["kind"]: k["share"] for k in r["kinds"]}
    if label.startswith("the 12 ResNet-block convs"):
      return groups["block_*/conv_0"] + groups["block_*/conv_1"]
    if label.startswith("`down_0` + `up_1`"):
      return groups["down_0"] + groups["up_1"]
    if label.startswith("kind: convolution or matmul"):
      return kinds["conv/matmul"]
    if label.startswith("kind: elementwise"):
      return kinds["elementwise"]
    if label.startswith("kind: data movement"):
      return kinds["data movement"]
    if label.startswith("the 17 instance norms"):
      return sum(v for k, v in groups.items() if "norm" in k)
    raise AssertionError(f"unknown row {label!r}")

  for label, *cells in rows:
    for dtype, cell in zip(header[1:], cells, strict=True):
      quoted = _search(r"^([\d.]+) %$", cell).group(1)
      assert _agrees(quoted, 100 * share(fwd[dtype], label)), (label, dtype)

  rates = [g["achieved_flops"] / 1e12 for r in fwd.values()
           for g in r["groups"] if g["group"].startswith("block_*/conv")]
  lo, hi = _search(r"block convs run at ([\d.]+)–([\d.]+) nominal", prose
                   ).groups()
  assert _agrees(lo, min(rates)) and _agrees(hi, max(rates))
  rates = [g["achieved_flops"] / 1e12 for r in fwd.values()
           for g in r["groups"] if g["group"] in ("down_0", "up_1")]
  lo, hi = _search(r"about half that \(([\d.]+)–([\d.]+)\)", prose).groups()
  assert _agrees(lo, min(rates)) and _agrees(hi, max(rates))
  fp32 = {g["group"]: g for g in fwd["fp32"]["groups"]}
  m = _search(r"in fp32 `down_0` spends (\d+) % of its time in its dots, the "
              r"block convs (\d+)–(\d+) %", prose)
  blocks = [g["kinds"]["conv/matmul"] for n, g in fp32.items()
            if n.startswith("block_*/conv")]
  for quoted, value in zip(m.groups(), (
      fp32["down_0"]["kinds"]["conv/matmul"], min(blocks), max(blocks))):
    assert _agrees(quoted, 100 * value), (quoted, value)
  share = _search(r"the share it could not put down \(([\d.]+) % here\)",
                  prose).group(1)
  for r in fwd.values():
    assert _agrees(share, 100 * r["unattributed_share"])
  bf16 = fwd["bf16"]
  m = _search(r"the bf16 forward took ([\d.]+) s per call untraced and "
              r"([\d.]+) s traced", prose)
  assert _agrees(m.group(1), bf16["wall_s"])
  assert _agrees(m.group(2), bf16["traced_wall_s"])

  edges = {r["engine"]: r for r in data["edges"]}
  jx, npy = edges["jax"], edges["numpy"]
  assert f"at {jx['size']}³ with the JAX engine" in prose
  m = _search(r"JAX engine \(([\d.]+) s\): its kernels ([\d.]+) s of op "
              r"time, the hysteresis ([\d.]+) s, and ([\d.]+) s after", prose)
  for quoted, value in zip(m.groups(), (
      jx["median_s"], jx["kernel_busy_s"],
      jx["phases_s"]["_hysteresis"], jx["phases_s"]["rest"])):
    assert _agrees(quoted, value), (quoted, value)
  sp = edges["jax-sparse"]
  m = _search(r"the same sketch bit for bit here \((\d+) edge voxels, (\d+) "
              r"differing\)", prose)
  assert (int(m.group(1)), int(m.group(2))) == (sp["edge_voxels"],
                                                sp["differ_voxels"])
  assert sp["differ_voxels"] == 0
  m = _search(r"jax-sparse ([\d.]+) s against ([\d.]+) s at 512³; its host "
              r"share after the kernels ([\d.]+) s against ([\d.]+) s", prose)
  for quoted, value in zip(m.groups(), (
      sp["median_s"], jx["median_s"], sp["phases_s"]["rest"],
      jx["phases_s"]["rest"])):
    assert _agrees(quoted, value), (quoted, value)
  m = _search(r"numpy engine \(([\d.]+) s\) spends ([\d.]+) s smoothing "
              r"and differentiating, ([\d.]+) s in", prose)
  for quoted, value in zip(m.groups(), (
      npy["median_s"], npy["phases_s"]["_smooth_and_differentiate"],
      npy["phases_s"]["_suppress"])):
    assert _agrees(quoted, value), (quoted, value)

def test_profile_gpu_h100_numbers_are_the_jsons():
  """The "On an H100" paragraph under "### Where the time goes" against
  profile-gpu-h100.json (and the cascade's skinny row, throughput's)."""
  data = _result("profile-gpu-h100.json")
  assert data["meta"]["device_kind"] == "NVIDIA H100 80GB HBM3"
  res = data["results"]
  fwd = {(r["impl"], r["dtype"]): r for r in res["hr_forward"]}
  prose = _prose(_section("**On an H100** (session 18", "### "))

  def group(impl, dtype, name):
    (g,) = [g for g in fwd[impl, dtype]["groups"] if g["group"] == name]
    return g

  def check(pattern, *values):
    m = _search(pattern, prose)
    assert len(m.groups()) == len(values)
    for quoted, value in zip(m.groups(), values):
      assert _agrees(quoted, value), (pattern, quoted, value)

  for dtype in ("fp32", "bf16"):  # "On a GPU": the norms and adds < 2 %
    assert sum(g["share"] for g in fwd["fast", dtype]["groups"]
               if "norm" in g["group"] or g["group"] in (
                   "block_*", "(HRGenerator)")) < 0.02
  assert "(under 2 % of the op time put down to them)" in _prose(
      _section("### On a GPU", "### "))
  bf16, out = fwd["fast", "bf16"], group("fast", "bf16", "conv_out")
  check(r"the bf16 forward took ([\d.]+) ms per call, the device busy "
        r"(\d+) % of it", 1e3 * bf16["wall_s"], 100 * bf16["busy_fraction"])
  check(r"\(`conv_out`\) took ([\d.]+) % of the op time\*\* \(([\d.]+) ms: "
        r"its ([\d.]+) GFLOP at ([\d.]+) TFLOP/s, ([\d.]+) % of the bf16 "
        r"peak\)", 100 * out["share"], 1e3 * out["s_per_call"],
        out["flops"] / 1e9, out["achieved_flops"] / 1e12,
        100 * out["fraction_of_peak"])
  blocks = [g for g in bf16["groups"] if g["group"].startswith("block_*/conv")]
  check(r"the 12 block convs ran at (\d+)–(\d+) TFLOP/s \((\d+)–(\d+) % of "
        r"it\)", *(f(g[k] * m for g in blocks) for k, m in (
            ("achieved_flops", 1e-12), ("fraction_of_peak", 100))
            for f in (min, max)))
  check(r"the first conv, on 2 channels, ([\d.]+) %; in fp32 `conv_out` took "
        r"([\d.]+) %", 100 * group("fast", "bf16", "conv_in")["share"],
        100 * group("fast", "fp32", "conv_out")["share"])
  check(r"\(([\d.]+) % of the bf16 op time was put down to no op",
        100 * group("fast", "bf16", "(no source op)")["share"])
  sk, sk32, f32 = (fwd["fast-skinny", "bf16"], fwd["fast-skinny", "fp32"],
                   fwd["fast", "fp32"])
  check(r"forward to ([\d.]+) ms per call \(([\d.]+)× fast; fp32 ([\d.]+) "
        r"against ([\d.]+) ms\)", 1e3 * sk["wall_s"],
        sk["wall_s"] / bf16["wall_s"], 1e3 * sk32["wall_s"],
        1e3 * f32["wall_s"])
  casc = {r["impl"]: r for r in
          _result("throughput-gpu-h100.json")["results"]["cascade"]
          if r["size"] == 512 and not r["error"]}
  check(r"HR3 ([\d.]+) s against ([\d.]+) \(the tap tensor is 343 × the "
        r"output: ([\d.]+) GB a scale's batch against ([\d.]+),",
        casc["fast-skinny"]["stages_s"]["hr3"], casc["fast"]["stages_s"]["hr3"],
        casc["fast-skinny"]["device_bytes"]["hr3"] / 1e9,
        casc["fast"]["device_bytes"]["hr3"] / 1e9)
  assert casc["fast-skinny"]["batch"] == casc["fast"]["batch"] == int(
      _search(r"at its automatic batch of (\d+) patches", prose).group(1))
  assert "21.45GiB" in _result("gpu-checks-h100.log")
  per_patch = out["flops"] / bf16["batch"] / 1e9
  check(r"for ([\d.]+)× the multiplies \(([\d.]+) GFLOP a patch instead of "
        r"([\d.]+);", (12 / 7) ** 3, per_patch * (12 / 7) ** 3, per_patch)
  edges = {r["engine"]: r for r in res["edges"]}
  jx, sp, npy = edges["jax"], edges["jax-sparse"], edges["numpy"]
  check(r"JAX engine ([\d.]+) s \(`_steps_jax`.*?, ([\d.]+) s; the hysteresis "
        r"([\d.]+) s\), with `JAX_SPARSE_TRANSFER` ([\d.]+) s \(([\d.]+)×: the "
        r"two-pass candidates ([\d.]+) s, the hysteresis ([\d.]+) s\)",
        jx["median_s"], jx["phases_s"]["_steps_jax"],
        jx["phases_s"]["_hysteresis"], sp["median_s"],
        sp["median_s"] / jx["median_s"],
        sp["phases_s"]["_candidates_jax_sparse"], sp["phases_s"]["_hysteresis"])
  m = _search(r"the same sketch \((\d+) edge voxels, (\d+) differing\), the "
              r"numpy engine ([\d.]+) s", prose)
  assert (int(m.group(1)), int(m.group(2))) == (sp["edge_voxels"],
                                                sp["differ_voxels"]) == (
      jx["edge_voxels"], 0)
  assert _agrees(m.group(3), npy["median_s"])


@pytest.mark.parametrize("task", ["t1t2", "kernel"])
def test_table1_rows_are_the_results(task):
  """Table 1's caption and rows (header and one per method) of
  ``table1-<task>.md``, the measured table before the paper's, are in the
  README verbatim, and in that order."""
  measured, _, _ = _result(f"table1-{task}.md").partition("\nPaper (")
  caption = measured.strip().splitlines()[0]
  assert caption.startswith(f"Task `{task}`") and caption in _readme()
  lines = [line for line in measured.splitlines() if line.startswith("|")]
  header, separator, *rows = lines
  method_rows = {m: [r for r in rows if r.startswith(f"| {m} |")]
                 for m in TABLE1_METHODS}
  assert all(len(found) == 1 for found in method_rows.values()), method_rows
  for line in [header, separator] + [r for (r,) in method_rows.values()]:
    assert line in _readme(), line
  assert "\n".join(lines) in _readme()
