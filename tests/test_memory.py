"""Tests of the memory benchmark (``benchmarks/memory.py``, Fig. 4).

Tiny networks (``demo:smoke``, baselines at 1/64 width) and XLA's backend
optimisation level 0 (same buffer assignment, faster compiles) keep the file
fast; the session's persistent compilation cache (``conftest.py``) turns
repeated programs into look-ups.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

# ``benchmarks`` lives beside the package, at the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks import baselines  # noqa: E402
from benchmarks import memory  # noqa: E402

TINY = memory.Options(config="demo:smoke", width_scale=1 / 64,
                      fast_compile=True)


def test_hr_scales_cover_the_size():
  for size in (16, 32, 48, 64, 100, 128, 1024):
    for lr in (16, 64):
      n = memory.num_hr_scales_for(size, lr)
      assert -(-size // 2**n) <= lr
      assert n == 0 or -(-size // 2**(n - 1)) > lr


def test_hr_step_and_cascade_do_not_grow_with_the_output():
  """MEGAN's flat lines: the HR training step and the cascade's largest
  per-scale program compile to the same bytes for 32³, 48³ and 64³ outputs
  (1, 2 and 2 HR scales of the smoke config), the patch batch fixed."""
  scales = {s: memory.megan_config(TINY, s).num_hr_scales for s in (32, 48, 64)}
  assert scales[32] < scales[48]  # the cascades really differ
  hr = {s: memory.measure_compiled("megan_hr_step", s, TINY) for s in scales}
  cascade = {s: memory.measure_compiled("megan_cascade", s, TINY)
             for s in scales}
  for r in list(hr.values()) + list(cascade.values()):
    assert r["error"] is None and r["bytes"] > 0
  assert len({r["bytes"] for r in hr.values()}) == 1
  assert len({r["bytes"] for r in cascade.values()}) == 1
  assert [len(cascade[s]["scales"]) for s in (32, 48, 64)] == [
      1 + scales[s] for s in (32, 48, 64)]
  # The maximum is the LR program's here, whose input is fixed anyway: the
  # HR scales' own programs must be flat too, each and at every size.
  hr_scales = {b for s in scales for name, b in cascade[s]["scales"]
               if name != "lr"}
  assert len(hr_scales) == 1 and hr_scales.pop() > 0


def test_pix2pix_step_grows_with_the_volume():
  """A whole-volume baseline: 8× the voxels, more than 4× the memory (at
  1/64 width, where activations, not parameters, dominate)."""
  small = memory.measure_compiled("pix2pix", 16, TINY)
  large = memory.measure_compiled("pix2pix", 32, TINY)
  assert small["error"] is None and large["error"] is None
  assert large["bytes"] > 4 * small["bytes"]


@pytest.mark.parametrize("name", baselines.NAMES)
def test_baselines_map_the_right_shapes(name):
  import jax
  b = baselines.build(name, 16, width_scale=1 / 16)
  state = baselines.abstract_state(b)
  out = jax.eval_shape(
      lambda p, x: b.generator.apply(p, x, train=False), state.g_params,
      baselines.abstract_batch(b)["g_in"])
  assert out.shape == (1, 16, 16, 16, 1)
  assert b.channels  # documented in the results' source
  with pytest.raises(ValueError, match="power of two"):
    baselines.build(name, 24)


def test_main_writes_the_schema(tmp_path, capsys):
  out = tmp_path / "results"
  rc = memory.main(["--sizes", "16", "--models", "pix2pix", "--out",
                    str(out), "--config", "demo:smoke", "--width-scale",
                    "0.015625", "--fast-compile", "--in-process"])
  assert rc == 0
  (json_path,) = out.glob("memory-*.json")
  data = json.loads(json_path.read_text())
  backend = data["meta"]["backend"]
  files = sorted(p.name for p in out.iterdir())
  assert files == [f"memory-{backend}.{ext}" for ext in ("json", "md", "png")]
  assert set(data) == {"meta", "results"}
  for key in ("jax_version", "jaxlib_version", "backend", "device_kind",
              "device_count", "date", "command"):
    assert key in data["meta"]
  (row,) = data["results"]
  assert set(row) == set(memory.ROW_KEYS)
  assert row["model"] == "pix2pix" and row["size"] == 16
  assert row["measure"] == "compiled" and row["error"] is None
  assert isinstance(row["bytes"], int) and row["bytes"] > 0
  assert isinstance(row["compile_s"], float)
  assert (out / f"memory-{backend}.png").read_bytes()[:4] == b"\x89PNG"
  assert "| pix2pix |" in capsys.readouterr().out
  (out / f"memory-{backend}.png").unlink()
  assert memory.main(["--replot", "--out", str(out)]) == 0
  assert (out / f"memory-{backend}.png").exists()


def test_isolated_cases_answer_or_report_why_not():
  case = {"model": "megan_cascade", "size": 16, "measure": "compiled",
          "options": dataclasses.asdict(TINY)}
  r = memory.run_isolated(case, timeout_s=120)
  assert r["error"] is None and r["bytes"] > 0
  r = memory.run_isolated(case, timeout_s=0.01)
  assert r["bytes"] is None and r["error"].startswith("timeout")
  # A bad case (24 is no power of two) is recorded, not raised.
  r = memory.run_case(dict(case, model="pix2pix", size=24))
  assert r["bytes"] is None and "power of two" in r["error"]


def test_markdown_ratios_to_the_cascade_and_to_megans_training():
  gib = {"megan_cascade": 2, "megan_lr_step": 4, "megan_hr_step": 1,
         "pggan": 90}
  rows = [{"model": m, "size": 256, "measure": "compiled",
           "bytes": g * memory.GIB} for m, g in gib.items()]
  table = memory.markdown_table(rows)
  assert "| × cascade at 256³ | × MEGAN training at 256³ |" in table
  # 90 / 2 (the cascade) and 90 / 4 (the larger of the two steps).
  assert "| pggan | 90.00 | 45.0× | 22.5× |" in table
  assert "| megan_lr_step | 4.00 |  |  |" in table  # ratios: baselines only
  # Without both MEGAN steps there is no training ratio.
  table = memory.markdown_table([r for r in rows
                                 if r["model"] != "megan_hr_step"])
  assert "| pggan | 90.00 | 45.0× |  |" in table


def test_markdown_says_why_a_cell_is_empty(tmp_path):
  rows = [{"model": "pix2pix", "size": s, "measure": "peak", "bytes": b,
           "compile_s": 1.0, "error": e}
          for s, b, e in ((32, memory.GIB, None), (256, None, "skipped"))]
  rows.append({"model": "dcgan", "size": 32, "measure": "peak",
               "bytes": memory.GIB, "compile_s": 1.0, "error": None})
  text = memory.write_markdown(str(tmp_path / "m.md"), rows,
                               {"backend": "cpu"})
  assert "- pix2pix 256³ peak: skipped" in text
  assert "- dcgan 256³ peak: not run" in text
  assert "pix2pix 32³" not in text and "dcgan 32³" not in text
  # A column the cascade's rows make is asked of the training steps up to
  # their largest size, the cascade-only 1024³ never.
  rows += [{"model": "megan_cascade", "size": s, "measure": "peak",
            "bytes": memory.GIB, "compile_s": 1.0, "error": None}
           for s in (128, 1024)]
  text = memory.write_markdown(str(tmp_path / "m.md"), rows,
                               {"backend": "cpu"})
  assert "- dcgan 128³ peak: not run" in text
  assert "- pix2pix 128³ peak: not run" in text
  assert "1024³" not in text.split("Not measured:")[1]


def test_merge_keeps_earlier_rows_and_a_cut_run_keeps_its_finished_cases(
    tmp_path, monkeypatch):
  out = tmp_path / "results"
  common = ["--sizes", "16", "--out", str(out), "--config", "demo:smoke",
            "--width-scale", "0.015625"]
  assert memory.main(common + ["--models", "pix2pix", "--in-process",
                               "--fast-compile"]) == 0
  (json_path,) = out.glob("memory-*.json")

  # A second run adds DCGAN; its peak case is "killed" (an outer time limit)
  # after the compiled cases: those are on disk already, with the first
  # run's rows, and the meta says the run did not complete.
  run_case = memory.run_case

  def fake_isolated(case, timeout_s):
    if case["model"] == "probe":
      return run_case(case)
    if case["measure"] == "peak":
      raise KeyboardInterrupt
    return {"bytes": 1234, "compile_s": 0.5, "error": None}

  monkeypatch.setattr(memory, "run_isolated", fake_isolated)
  with pytest.raises(KeyboardInterrupt):
    memory.main(common + ["--models", "dcgan", "--measure", "both",
                          "--merge"])
  data = json.loads(json_path.read_text())
  rows = {(r["model"], r["measure"]): r["bytes"] for r in data["results"]}
  assert rows[("dcgan", "compiled")] == 1234
  assert rows[("pix2pix", "compiled")] > 0
  assert ("dcgan", "peak") not in rows
  assert data["meta"]["complete"] is False
  assert len(data["meta"]["merged_with"]) == 1  # the first run, once
  # Other widths would put rows of two networks under one meta: refused,
  # and the file is left as it was.
  before = json_path.read_text()
  assert memory.main(common[:-1] + ["0.03125", "--models", "dcgan",
                                    "--merge"]) == 2
  assert json_path.read_text() == before


def _fake_cases(monkeypatch, answer):
  """Runs ``answer(case)`` instead of each case's process (the probe still
  runs); returns the list of the cases run, in order."""
  run_case, ran = memory.run_case, []

  def fake_isolated(case, timeout_s):
    if case["model"] == "probe":
      return run_case(case)
    ran.append(case)
    return answer(case)
  monkeypatch.setattr(memory, "run_isolated", fake_isolated)
  return ran


def test_a_compiled_run_cut_short_keeps_the_cases_it_finished(
    tmp_path, monkeypatch):
  # The GPU run of session 15 lost every compiled case of a step its outer
  # limit cut: they were written only once all had finished.
  out = tmp_path / "results"

  def answer(case):
    if case["size"] == 32:
      raise KeyboardInterrupt
    return {"bytes": 4321, "compile_s": 0.5, "error": None}

  _fake_cases(monkeypatch, answer)
  with pytest.raises(KeyboardInterrupt):
    memory.main(["--models", "dcgan", "--sizes", "16", "32", "--jobs", "1",
                 "--out", str(out)])
  (json_path,) = out.glob("memory-*.json")
  data = json.loads(json_path.read_text())
  assert [(r["model"], r["size"], r["bytes"]) for r in data["results"]] == [
      ("dcgan", 16, 4321)]
  assert data["meta"]["complete"] is False


def test_only_missing_runs_the_cases_the_file_has_no_bytes_for(
    tmp_path, monkeypatch):
  out = tmp_path / "results"

  def answer(case):
    if (case["model"], case["size"]) == ("pix2pix", 32) and not second:
      return {"bytes": None, "compile_s": 9.0, "error": "timeout"}
    return {"bytes": 100 * case["size"], "compile_s": 0.5, "error": None}

  second = False
  ran = _fake_cases(monkeypatch, answer)
  common = ["--models", "dcgan", "pix2pix", "--out", str(out), "--merge",
            "--only-missing"]
  assert memory.main(common + ["--sizes", "16", "32"]) == 0
  assert len(ran) == 4
  ran.clear()
  second = True
  # Measured rows stay; the timed-out one and the new size run.
  assert memory.main(common + ["--sizes", "16", "32", "64"]) == 0
  assert sorted((c["model"], c["size"]) for c in ran) == [
      ("dcgan", 64), ("pix2pix", 32), ("pix2pix", 64)]
  (json_path,) = out.glob("memory-*.json")
  data = json.loads(json_path.read_text())
  assert {(r["model"], r["size"]): r["bytes"] for r in data["results"]} == {
      (m, s): 100 * s for m in ("dcgan", "pix2pix") for s in (16, 32, 64)}
  assert [m["command"] for m in data["meta"]["merged_with"]] and all(
      "device_kind" in m for m in data["meta"]["merged_with"])
  # Nothing missing: nothing runs and the files (meta, plot) stay as they
  # were (a GPU script's step for a fresh device is a no-op on a known one).
  ran.clear()
  files = {p.name: p.read_bytes() for p in out.iterdir()}
  assert memory.main(common + ["--sizes", "16", "64"]) == 0
  assert ran == []
  assert {p.name: p.read_bytes() for p in out.iterdir()} == files
  with pytest.raises(SystemExit) as e:  # argparse's error
    memory.main(["--only-missing", "--out", str(out)])
  assert e.value.code == 2


def test_merge_refuses_another_devices_file_and_reads_its_compiled_sizes(
    tmp_path, monkeypatch):
  out = tmp_path / "results"
  ran = _fake_cases(monkeypatch, lambda case: {
      "bytes": 50 * memory.GIB, "compile_s": 0.5, "error": None})
  common = ["--models", "dcgan", "--sizes", "16", "--out", str(out),
            "--merge"]
  assert memory.main(common) == 0
  # A CPU skips a peak case its compiled figure says is too large, also
  # when that figure is the merged file's (--only-missing compiles nothing).
  assert memory.main(common + ["--measure", "peak", "--only-missing"]) == 0
  assert [c["measure"] for c in ran] == ["compiled"]
  (json_path,) = out.glob("memory-*.json")
  data = json.loads(json_path.read_text())
  (peak,) = [r for r in data["results"] if r["measure"] == "peak"]
  assert peak["error"].startswith("skipped: too large")
  # Rows another device measured would be read as this one's: refused.
  data["meta"]["device_kind"] = "NVIDIA H200"
  json_path.write_text(json.dumps(data))
  before = json_path.read_text()
  assert memory.main(common) == 2
  # Also when it has every case asked for (refused, not "nothing to run").
  assert memory.main(common + ["--only-missing"]) == 2
  assert json_path.read_text() == before


def test_cases_run_model_by_model_or_smallest_size_first():
  args = memory.parse_args(["--models", "megan_cascade", "dcgan", "pix2pix",
                            "--sizes", "64", "32", "--cascade-sizes", "128",
                            "--measure", "peak"])
  by_model = [(c["model"], c["size"]) for c in memory.plan_cases(args)]
  assert by_model == [("megan_cascade", 128), ("dcgan", 32), ("dcgan", 64),
                      ("pix2pix", 32), ("pix2pix", 64)]
  args = memory.parse_args(["--models", "megan_cascade", "dcgan", "pix2pix",
                            "--sizes", "64", "32", "--cascade-sizes", "128",
                            "--measure", "peak", "--order", "size"])
  by_size = [(c["model"], c["size"]) for c in memory.plan_cases(args)]
  assert by_size == [("dcgan", 32), ("pix2pix", 32), ("dcgan", 64),
                     ("pix2pix", 64), ("megan_cascade", 128)]
  assert sorted(by_size) == sorted(by_model)


def _mrow(model, size, measure, nbytes):
  return {"model": model, "size": size, "measure": measure, "bytes": nbytes,
          "error": None}


def test_merge_replaces_rows_by_model_size_and_measure():
  """A new ``compiled`` row replaces only the earlier ``compiled`` row of its
  model and size: the earlier ``peak`` row of the same model and size, and
  rows of other sizes, survive; the earlier run is noted once."""
  old = {"results": [_mrow("pix2pix", 16, "peak", 1),
                     _mrow("pix2pix", 16, "compiled", 2),
                     _mrow("pix2pix", 32, "compiled", 4)],
         "meta": {"command": "old", "date": "d0", "total_s": 1.0}}
  meta = {}
  rows = memory._merge(old, [_mrow("pix2pix", 16, "compiled", 3)], meta)
  got = sorted((r["size"], r["measure"], r["bytes"]) for r in rows)
  assert got == [(16, "compiled", 3), (16, "peak", 1), (32, "compiled", 4)]
  assert meta["merged_with"] == [{"command": "old", "date": "d0",
                                  "total_s": 1.0}]


def test_a_failed_rerun_keeps_the_measured_row():
  """A case measured before that fails now (a timeout) keeps its bytes,
  the failure noted on it; a failure where nothing was measured replaces
  the earlier failure."""
  old = {"results": [_mrow("pggan", 64, "peak", 8),
                     dict(_mrow("dcgan", 256, "peak", None), error="old")],
         "meta": {"command": "old", "date": "d0", "total_s": 1.0}}
  new = [dict(_mrow("pggan", 64, "peak", None), error="timeout after 90 s"),
         dict(_mrow("dcgan", 256, "peak", None), error="new")]
  rows = {(r["model"], r["size"]): r for r in memory._merge(old, new, {})}
  assert rows["pggan", 64]["bytes"] == 8
  assert rows["pggan", 64]["rerun_error"] == "timeout after 90 s"
  assert rows["dcgan", 256]["error"] == "new" and len(rows) == 2


def test_merge_keeps_the_new_runs_channel_notes():
  """Where both runs noted a model and size's channels, the new run's text
  wins; the earlier run's notes fill only the sizes the new run lacks."""
  old = {"results": [],
         "meta": {"channels": {"pix2pix": {"16": "old 16", "32": "old 32"},
                               "dcgan": {"16": "old dcgan"}}}}
  meta = {"channels": {"pix2pix": {"16": "new 16"}}}
  memory._merge(old, [_mrow("pix2pix", 16, "compiled", 3)], meta)
  assert meta["channels"] == {"pix2pix": {"16": "new 16", "32": "old 32"},
                              "dcgan": {"16": "old dcgan"}}


def test_options_clash_names_every_merge_key():
  """Each of ``MERGE_KEYS`` (``impl`` among them) changed from the earlier
  run's options is a clash naming that key; options outside them
  (``fast_compile``) and an identical set are not."""
  assert "impl" in memory.MERGE_KEYS
  opts = dataclasses.asdict(TINY)
  old = {"results": [], "meta": {"options": dict(opts)}}
  assert memory._options_clash(old, opts) is None
  assert memory._options_clash(None, opts) is None
  other = "plain" if opts["impl"] != "plain" else "fast"
  clash = memory._options_clash(old, dict(opts, impl=other))
  assert clash is not None and clash.startswith("impl=")
  assert memory._options_clash(old, dict(opts, hr_batch=7)).startswith(
      "hr_batch=")
  assert memory._options_clash(
      old, dict(opts, fast_compile=not opts["fast_compile"])) is None


def test_bad_arguments_and_files_are_one_line(tmp_path, capsys):
  for value in ("nan", "inf", "0"):
    with pytest.raises(SystemExit) as e:
      memory.parse_args(["--width-scale", value])
    assert e.value.code == 2
  assert f"--width-scale {value}" in capsys.readouterr().err
  # A size the baselines cannot take: now, not as an error row per case.
  with pytest.raises(SystemExit) as e:
    memory.parse_args(["--models", "megan_hr_step", "pix2pix", "--sizes",
                       "48", "32"])
  assert e.value.code == 2
  assert "--sizes 48: pix2pix: size 48 must be a power of two" in (
      capsys.readouterr().err)
  memory.parse_args(["--models", "megan_hr_step", "--sizes", "48"])  # MEGAN
  a_file = tmp_path / "f"
  a_file.write_text("")
  assert memory.main(["--out", str(a_file)]) == 2
  assert "exists and is not a folder" in capsys.readouterr().err
  out = tmp_path / "results"
  out.mkdir()
  (out / "memory-cpu.json").write_text('{"meta": 1')
  assert memory.main(["--replot", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "memory-cpu.json: not a results file" in err and err.count("\n") == 1
  # --merge would have replaced it with this run's rows: refused, kept.
  assert memory.main(["--models", "dcgan", "--sizes", "16", "--merge",
                      "--out", str(out)]) == 2
  assert "--merge" in capsys.readouterr().err
  assert (out / "memory-cpu.json").read_text() == '{"meta": 1'


def test_no_autotune_reaches_each_case_and_marks_its_rows(
    tmp_path, monkeypatch, capsys):
  # The flag goes into each case's own process (XLA reads XLA_FLAGS when
  # JAX starts there), after any the user set.
  seen = {}

  def fake_run(cmd, env, **kw):
    seen["flags"] = env.get("XLA_FLAGS")
    return subprocess.CompletedProcess(
        cmd, 0, memory._RESULT + json.dumps(
            {"bytes": 7, "compile_s": 0.1, "error": None}) + "\n", "")

  monkeypatch.setattr(memory.subprocess, "run", fake_run)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  case = {"model": "dcgan", "size": 16, "measure": "compiled",
          "options": dataclasses.asdict(TINY)}
  assert memory.run_isolated(case, 10)["bytes"] == 7
  assert seen["flags"] == "--xla_dump_to=/tmp/x"  # autotune on: untouched
  untuned = dict(case, options=dataclasses.asdict(
      dataclasses.replace(TINY, autotune=False)))
  memory.run_isolated(untuned, 10)
  assert seen["flags"] == "--xla_dump_to=/tmp/x " + memory.NO_AUTOTUNE_FLAG
  monkeypatch.undo()

  # A real run: the child starts with the flag (a real XLA flag: an
  # unknown one would abort it); on a CPU it changes nothing, so no mark.
  out = tmp_path / "results"
  common = ["--sizes", "16", "--models", "dcgan", "--config", "demo:smoke",
            "--width-scale", "0.015625", "--fast-compile", "--no-autotune"]
  assert memory.main(common + ["--out", str(out)]) == 0
  (json_path,) = out.glob("memory-*.json")
  data = json.loads(json_path.read_text())
  (row,) = data["results"]
  assert row["error"] is None and row["bytes"] > 0
  assert "autotune" not in row and data["meta"]["options"]["autotune"] is False
  assert memory.UNTUNED_MARK not in json_path.with_suffix(".md").read_text()
  # On a GPU the rows and the table say so.
  monkeypatch.setattr(memory, "run_isolated", lambda case, timeout_s: (
      {**memory.run_case(case), "backend": "gpu", "device_kind": "GPU 1"}
      if case["model"] == "probe" else
      {"bytes": 5 * memory.GIB, "compile_s": 0.1, "error": None}))
  gpu_out = tmp_path / "gpu"
  assert memory.main(common + ["--out", str(gpu_out)]) == 0
  data = json.loads((gpu_out / "memory-gpu.json").read_text())
  (row,) = data["results"]
  assert row["autotune"] is False
  md = (gpu_out / "memory-gpu.md").read_text()
  assert f"| dcgan | 5.00{memory.UNTUNED_MARK} |" in md
  assert memory.NO_AUTOTUNE_FLAG in md
  capsys.readouterr()
  # An autotuned row is not marked.
  table = memory.markdown_table([dict(row, autotune=True)])
  assert memory.UNTUNED_MARK not in table and "| dcgan | 5.00 |" in table
  # In one process the flag could not reach XLA: refused.
  with pytest.raises(SystemExit) as e:
    memory.parse_args(["--no-autotune", "--in-process"])
  assert e.value.code == 2
  assert "--no-autotune" in capsys.readouterr().err


def test_a_gpu_peak_records_the_high_water_mark_left_by_compiling(
    tmp_path, monkeypatch):
  # A fake device: its high-water mark is 1 until something compiled,
  # then 200 (what compiling left), then 300 (the step ran). A reading
  # taken before the compile, or after the run, would not give 200.
  import jax
  state = {"compiled": False, "reads": 0}
  compile_ = jax.stages.Lowered.compile

  def compile_and_note(self, *a, **k):
    out = compile_(self, *a, **k)
    state["compiled"] = True
    return out

  def device_peak():
    if not state["compiled"]:
      return 1
    state["reads"] += 1
    return 200 if state["reads"] == 1 else 300

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_and_note)
  monkeypatch.setattr(memory, "_device_peak", device_peak)
  for model in ("megan_hr_step", "megan_cascade"):
    state.update(compiled=False, reads=0)
    r = memory.measure_peak(model, 16, TINY)
    assert r["error"] is None, r
    assert (r["bytes"], r["compile_peak_bytes"]) == (300, 200), model
  # Written with the row's other keys.
  row = {"model": "megan_hr_step", "size": 16, "measure": "peak",
         "compile_s": 1.0, "error": None, **r}
  memory.write_json(str(tmp_path / "m.json"), {}, [row])
  (written,) = json.loads((tmp_path / "m.json").read_text())["results"]
  assert written == row
