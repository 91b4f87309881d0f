"""benchmarks/op_profile.py: the trace reading, the grouping of XLA ops by
Flax module, the FLOP counts, and a whole --quick run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import op_profile as op
from benchmarks import throughput as tp


def _ev(start, dur, name="a"):
  return op.OpEvent("m", name, float(start), float(dur), False)


def test_busy_time_merges_overlaps():
  events = [_ev(0, 10), _ev(5, 10), _ev(30, 5), _ev(31, 1), _ev(40, 0)]
  assert op.busy_ns(events) == 15 + 5
  assert op.busy_ns([]) == 0


@pytest.mark.parametrize("name, group", [
    ("jit(f)/HRGenerator/block_3/norm_0/norm_0._normalise/sub",
     "block_*/norm_0"),
    ("jit(f)/HRGenerator/block_0/add", "block_*"),
    ("jit(f)/HRGenerator/conv_out/dot_general", "conv_out"),
    ("jit(f)/HRGenerator/down_1/jit(_pad)/pad", "down_1"),
    ("jit(f)/HRGenerator/jit(relu)/max", "(HRGenerator)"),
    ("jit(f)/HRGenerator/tanh", "(HRGenerator)"),
    ("jit(f)/other/thing", "(thing)"),
    ("", op.NO_SOURCE),
])
def test_layer_of(name, group):
  assert op.layer_of(name, "HRGenerator") == group


def test_instruction_lines_of_either_text_format():
  ins = op._parse_instr(
      "  ROOT %custom-call.3 = (bf16[8,16,16,16,64]{4,3,2,1,0}, u8[0]{0}) "
      "custom-call(bf16[8,18,18,18,2]{4,3,2,1,0} %pad.1, bf16[3,3,3,2,64]"
      "{4,3,2,1,0} %p.2), window={size=3x3x3}, custom_call_target="
      '"__cudnn$convForward", metadata={op_name="jit(f)/HRGenerator/conv_in/'
      'conv_general_dilated"}')
  assert (ins.name, ins.opcode, ins.root) == ("custom-call.3", "custom-call",
                                              True)
  assert ins.operands == ["pad.1", "p.2"]
  assert ins.op_name.endswith("conv_in/conv_general_dilated")
  plain = op._parse_instr("  add.4 = f32[2]{0} add(f32[2]{0} a, f32[2]{0} b)")
  assert (plain.opcode, plain.operands, plain.root) == ("add", ["a", "b"],
                                                        False)
  text = """HloModule m, entry_computation_layout={()->f32[2]}

%fused (p0: f32[2]) -> f32[2] {
  %p0 = f32[2]{0} parameter(0)
  %neg = f32[2]{0} negate(%p0), metadata={op_name="jit(f)/G/conv_in/neg"}
  ROOT %pad.9 = f32[2]{0} pad(%neg, %c), padding=0_0
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0), metadata={op_name="x"}
  %f = f32[2]{0} fusion(%x), kind=kLoop, calls=%fused
  %w = f32[2]{0} while(%f), condition=%c, body=%b
  ROOT %copy.1 = f32[2]{0} copy(%f)
}
"""
  ops = op.hlo_ops(text)
  assert op.module_name(text) == "m"
  # The fusion's root (a pad) has no source: the one nearest it in its body.
  assert ops["f"].op_name == "jit(f)/G/conv_in/neg"
  assert op.op_kind(ops["f"]) == "elementwise"
  # A copy without a source op: its operand's.
  assert ops["copy.1"].op_name == "jit(f)/G/conv_in/neg"
  assert op.op_kind(ops["copy.1"]) == "data movement"
  events = [op.OpEvent("m", n, 0.0, 1.0, False) for n in ("f", "w", "copy.1")]
  mine, matched = op.program_events(events, "m", ops)
  assert matched and [e.op for e in mine] == ["f", "copy.1"]
  mine, matched = op.program_events(events, "other", ops)
  assert not matched and len(mine) == 2


def test_hlo_ops_reads_fusions_and_their_sources():
  def f(x, w):
    return jnp.tanh(x @ w).sum() + jnp.sin(x).sum()
  exe = jax.jit(f).lower(jnp.ones((32, 32)), jnp.ones((32, 32))).compile()
  text = exe.as_text()
  ops = op.hlo_ops(text)
  assert op.module_name(text) and op.module_name(text) in text.splitlines()[0]
  contracting = [o for o in ops.values() if o.has_contraction]
  assert contracting, ops
  # The dot's source is its own op_name, whatever fusion holds it.
  assert any(o.op_name.endswith("dot_general") for o in contracting)
  assert all(op.op_kind(o) == "conv/matmul" for o in contracting)
  assert op.op_kind(None) == "other"


@pytest.mark.parametrize("sizes", [tp.QUICK, tp.Sizes()],
                         ids=["quick", "paper"])
def test_module_flops_add_up_to_the_nominal_count(sizes):
  g = tp.hr_generator(sizes, "fast", "fp32")
  x = jax.ShapeDtypeStruct((3,) + (sizes.patch,) * 3 + (2,), jnp.float32)
  v = jax.eval_shape(lambda k, x: g.init(k, x, train=False),
                       jax.random.key(0), x)
  flops = op.module_flops(g, v, x)
  nominal = tp.hr_forward_flops(sizes.ngf, sizes.n_blocks, sizes.patch)
  assert sum(flops.values()) == pytest.approx(3 * nominal, rel=1e-12)
  assert set(flops) == {"conv_in", "down_0", "down_1", "block_*/conv_0",
                        "block_*/conv_1", "up_0", "up_1", "conv_out"}
  # The six (two) blocks are one group each: n_blocks convs of 27 taps.
  p4, c = sizes.patch // 4, 4 * sizes.ngf
  assert flops["block_*/conv_0"] == 3 * sizes.n_blocks * 2 * 27 * c * c * p4**3


def test_timed_phases_restores_the_functions():
  import types
  mod = types.SimpleNamespace(a=lambda: 1, b=lambda: 2)
  a = mod.a
  with pytest.raises(RuntimeError):
    with op.timed_phases(mod, ["a", "missing"]) as spent:
      assert mod.a() == 1 and mod.a is not a
      raise RuntimeError
  assert mod.a is a
  assert spent["a"] >= 0 and "missing" not in spent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("profile")
  assert op.main(["--quick", "--dtypes", "fp32", "bf16", "--repeats", "2",
                  "--impl", "fast", "fast-skinny", "--out", str(out)]) == 0
  return out, json.loads((out / f"profile-{jax.default_backend()}.json")
                         .read_text())


def test_quick_run_profiles_the_forward(quick_run):
  out, data = quick_run
  assert data["meta"]["backend"] == jax.default_backend()
  rows = data["results"]["hr_forward"]
  assert [(r["impl"], r["dtype"]) for r in rows] == [
      ("fast", "fp32"), ("fast", "bf16"), ("fast-skinny", "fp32"),
      ("fast-skinny", "bf16")]
  for row in rows:
    _check_forward_row(row)
  md = (out / f"profile-{jax.default_backend()}.md").read_text()
  assert "| block_*/conv_0 |" in md and "**Edge sketch**" in md


def _check_forward_row(row):
  assert row["error"] is None, row
  assert row["module_matched"]
  assert 0 < row["device_busy_s"] <= row["op_time_s"] + 1e-9
  # Per call: the busy time fits in a traced call (2 calls were traced).
  assert row["device_busy_s"] <= 1.05 * max(row["traced_wall_s"], 1e-6)
  assert row["busy_fraction"] > 0  # its upper end moves with the load
  # Every op put down to a layer and a kind.
  assert row["unattributed_share"] < 0.01, row["top_ops"]
  kinds = {k["kind"]: k["share"] for k in row["kinds"]}
  assert kinds.get("other", 0) == 0 and kinds["data movement"] > 0
  groups = {g["group"]: g for g in row["groups"]}
  assert {"conv_in", "conv_out", "block_*/conv_0", "up_1"} <= set(groups)
  assert sum(g["share"] for g in row["groups"]) == pytest.approx(1, abs=2e-3)
  for g in row["groups"]:  # each layer's time split by kind
    assert sum(g["kinds"].values()) == pytest.approx(1, abs=1e-3)
    assert set(g["kinds"]) <= set(op.KINDS)
  assert groups["block_*/conv_0"]["kinds"]["conv/matmul"] > 0
  for part in ("groups", "kinds"):  # per call, as op_time_s
    assert sum(g["s_per_call"] for g in row[part]) == pytest.approx(
        row["op_time_s"], rel=1e-3)
  assert sum(k["share"] for k in row["kinds"]) == pytest.approx(1, abs=2e-3)
  assert {k["kind"] for k in row["kinds"]} <= set(op.KINDS)
  assert "conv/matmul" in {k["kind"] for k in row["kinds"]}
  s = tp.QUICK
  assert row["flops"] == pytest.approx(
      2 * tp.hr_forward_flops(s.ngf, s.n_blocks, s.patch))
  assert groups["conv_out"]["achieved_flops"] > 0
  assert len(row["top_ops"]) <= op.TOP_OPS


def test_quick_run_times_the_edge_phases(quick_run):
  _, data = quick_run
  rows = {r["engine"]: r for r in data["results"]["edges"]}
  assert list(rows) == ["jax", "jax-sparse", "numpy"]
  for engine, r in rows.items():
    assert r["error"] is None, r
    phases = r["phases_s"]
    step = {"jax": "_steps_jax", "jax-sparse": "_candidates_jax_sparse",
            "numpy": "_smooth_and_differentiate"}[engine]
    assert phases[step] > 0 and phases["_hysteresis"] > 0
    others = {"_steps_jax", "_candidates_jax_sparse",
              "_smooth_and_differentiate"} - {step}
    assert not others & set(phases)
    assert sum(phases.values()) == pytest.approx(np.mean(r["times_s"]),
                                                 rel=0.05, abs=1e-4)
  assert rows["jax"]["kernel_busy_s"] > 0
  assert rows["jax-sparse"]["kernel_busy_s"] > 0
  assert rows["jax"]["differ_voxels"] == 0  # itself
  assert rows["jax-sparse"]["differ_voxels"] == 0  # bit for bit
  assert rows["numpy"]["differ_voxels"] is None
  assert rows["jax-sparse"]["edge_voxels"] == rows["jax"]["edge_voxels"] > 0
  assert "kernel_busy_s" not in rows["numpy"]
  from megan_jax import edges
  assert edges.JAX_SPARSE_TRANSFER is False  # set back


def test_merge_keeps_the_other_section(quick_run, tmp_path):
  out, data = quick_run
  path = out / f"profile-{jax.default_backend()}.json"
  target = tmp_path / path.name
  target.write_text(path.read_text())
  assert op.main(["--quick", "--only", "edges", "--merge", "--out",
                  str(tmp_path)]) == 0
  new = json.loads(target.read_text())
  assert new["results"]["hr_forward"] == data["results"]["hr_forward"]
  assert "--only edges" in new["meta"]["sections"]["edges"]
  assert new["meta"]["sections"]["hr_forward"] == data["meta"]["command"]


def test_bad_out_and_damaged_merge_file_are_refused(tmp_path, capsys):
  not_dir = tmp_path / "file"
  not_dir.write_text("x")
  assert op.main(["--quick", "--out", str(not_dir)]) == 2
  assert "--out" in capsys.readouterr().err
  bad = tmp_path / f"profile-{jax.default_backend()}.json"
  bad.write_text("{not json")
  assert op.main(["--quick", "--only", "edges", "--merge", "--out",
                  str(tmp_path)]) == 2
  assert "not a results file" in capsys.readouterr().err
  assert bad.read_text() == "{not json"
  # Another card's file: refused and kept (it was overwritten).
  other = json.dumps({"meta": {"device_kind": "Some Other GPU",
                               "backend": jax.default_backend()},
                      "results": {"hr_forward": [{"x": 1}]}})
  bad.write_text(other)
  assert op.main(["--quick", "--only", "edges", "--merge", "--out",
                  str(tmp_path)]) == 2
  assert "measured on Some Other GPU" in capsys.readouterr().err
  assert bad.read_text() == other


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--repeats", "0"],
                                  ["--edge-size", "1"], ["--impl", "slow"],
                                  ["--seed", "-1"]])
def test_bad_options(argv):
  with pytest.raises(SystemExit) as e:
    op.parse_args(argv)
  assert e.value.code == 2


def test_off_the_cpu_host_events_are_not_taken_for_kernels():
  """Where a GPU's trace lacks device events (no CUPTI), host events would
  time the launches: the forward's row says so, the edges have no kernel
  time."""
  args = op.parse_args(["--quick", "--only", "hr_forward"])
  info = {"backend": "gpu", "device_kind": "test"}  # the events stay host's
  (row,) = op.profile_hr_forward(args, tp.QUICK, info)
  assert "no gpu device events" in row["error"]
  args.edge_size = 24
  rows = {r["engine"]: r for r in op.profile_edges(args, info)}
  for engine in ("jax", "jax-sparse"):
    assert rows[engine]["error"] is None
    assert rows[engine]["kernel_busy_s"] is None
    assert rows[engine]["kernel_events_from"].startswith("none")


def test_command_buffers_are_off_unless_asked(tmp_path):
  """A fresh process turns XLA's GPU command buffers off before its backend
  starts (a command buffer is one trace event for many kernels, put down
  to no op) and says so in meta; a flag the user set is kept."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false"  # the user's own
  subprocess.run([sys.executable, "-m", "benchmarks.op_profile", "--quick",
                  "--only", "edges", "--out", str(tmp_path)], cwd=root,
                 env=env, check=True, capture_output=True, timeout=300)
  meta = json.loads((tmp_path / "profile-cpu.json").read_text())["meta"]
  assert meta["xla_flags"].split() == [
      "--xla_cpu_enable_fast_math=false", "--xla_gpu_enable_command_buffer="]
  before = os.environ.get("XLA_FLAGS")
  jax.devices()  # this process's backend runs: its flags are left alone
  op._no_command_buffers()
  assert os.environ.get("XLA_FLAGS") == before
