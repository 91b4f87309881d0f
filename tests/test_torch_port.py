"""The PyTorch port: Flax's parameter counts and, with its weights, outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ImportError)

from benchmarks import torch_port  # noqa: E402
from megan_jax.models import (HRGenerator, LRResNetGenerator,  # noqa: E402
                              PatchDiscriminator)

S = jax.ShapeDtypeStruct
F32 = jnp.float32


@pytest.fixture(autouse=True, scope="module")
def _test_config():
  """Full-precision matmuls on the JAX side (torch on CPU has no TF32)."""
  with jax.default_matmul_precision("highest"):
    yield


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(model, *args, **kwargs):
  """Parameter shapes without allocating or compiling."""
  return jax.eval_shape(functools.partial(model.init, **kwargs),
                        jax.random.PRNGKey(0), *args)


def _np_params(model, *args, seed=0, **kwargs):
  """Random O(1)-activation parameters, drawn in numpy from the shapes.

  Like ``init_scheme="default"`` (LeCun-scale kernels), but with norm scales
  and all biases random too, so a swapped scale/bias or bias/kernel mapping
  shows; and without paying for compiling jax.random per shape.
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
    centre = 1.0 if "scale" in name else 0.0
    return centre + rng.normal(0, 0.1, s.shape)

  shapes = _init_shapes(model, *args, **kwargs)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: np.asarray(draw(p, s), np.float32), shapes)


def _rand(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _assert_close(torch_out, flax_out, tol=1e-4):
  a = torch_port.to_numpy(torch_out)
  b = np.asarray(flax_out, np.float32)
  assert a.shape == b.shape
  assert np.abs(b).max() > 1e-2  # a real signal, not all zeros
  np.testing.assert_allclose(a, b, rtol=0, atol=tol)


# ---------------------------------------------------------------------------
# Parameter counts at the paper's sizes (construct only).


def test_param_counts_match_flax_and_method():
  cases = [
      (torch_port.ResNetGenerator(in_channels=2),
       HRGenerator(), S((1, 32, 32, 32, 2), F32), 26_513_089),
      (torch_port.ResNetGenerator(in_channels=1, n_pre_down=1),
       LRResNetGenerator(), S((1, 16, 16, 16, 1), F32), 26_773_697),
      (torch_port.PatchDiscriminator("hr", in_channels=3, norm="batch"),
       PatchDiscriminator("hr", norm="batch", output="code"),
       S((1, 32, 32, 32, 3), F32),
       2_651_329),
  ]
  for torch_model, flax_model, x, expected in cases:
    flax_n = _n_params(_init_shapes(flax_model, x, train=False))
    assert flax_n == expected
    assert torch_port.count_params(torch_model) == expected
  # LR D (docstring's count): sketch 1 channel + image 1 channel.
  d = torch_port.PatchDiscriminator("lr", in_channels=2)
  flax_d = PatchDiscriminator("lr", output="code")
  shapes = _init_shapes(flax_d, (S((1, 16, 16, 16, 1), F32),
                                 S((1, 8, 8, 8, 1), F32)))
  assert torch_port.count_params(d) == _n_params(shapes) == 2_630_876


# ---------------------------------------------------------------------------
# Forward agreement with the same weights.


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("n_pre_down", [0, 1])
def test_generator_matches_flax(impl, n_pre_down):
  cls = LRResNetGenerator if n_pre_down else HRGenerator
  c_in = 1 if n_pre_down else 2
  # Unequal D, H, W: a swapped axis in the layout conversion would show.
  spatial = (16, 12, 8) if not n_pre_down else (32, 24, 16)
  flax_g = cls(ngf=8, n_blocks=2, impl=impl, init_scheme="default")
  x = _rand(1, (2,) + spatial + (c_in,))
  variables = _np_params(flax_g, S(x.shape, F32), train=False)
  apply = jax.jit(functools.partial(flax_g.apply, train=False))
  want = apply(variables, x)
  assert want.shape == (2,) + tuple(n // 2**n_pre_down for n in spatial) + (1,)

  g = torch_port.ResNetGenerator(in_channels=c_in, ngf=8, n_blocks=2,
                                 n_pre_down=n_pre_down)
  torch_port.load_flax_params(g, variables).eval()
  with torch.no_grad():
    got = g(torch_port.to_torch(x))
  _assert_close(got, want)


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_hr_discriminator_matches_flax(impl, norm):
  # The public code's outputs (the port's): output="code".
  flax_d = PatchDiscriminator("hr", ndf=8, n_layers=3, norm=norm, impl=impl,
                              output="code",
                              init_scheme="default")
  x = _rand(2, (2, 32, 32, 32, 3))  # 32³: the smallest patch for 3 layers
  variables = _np_params(flax_d, S(x.shape, F32), seed=1)
  want, _ = jax.jit(flax_d.apply)(variables, x)
  assert want.shape == (2, 1, 1, 1, 1)

  d = torch_port.PatchDiscriminator("hr", in_channels=3, ndf=8, n_layers=3,
                                    norm=norm)
  torch_port.load_flax_params(d, variables).eval()
  with torch.no_grad():
    got = d(torch_port.to_torch(x))
  _assert_close(got, want)


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_lr_discriminator_matches_flax(impl, norm):
  flax_d = PatchDiscriminator("lr", ndf=8, n_layers=3, norm=norm, impl=impl,
                              output="code",
                              init_scheme="default")
  # Two sketch channels: the sketch conv must take all of them.
  edges = _rand(3, (2, 32, 32, 16, 2))
  image = _rand(4, (2, 16, 16, 8, 1))
  variables = _np_params(flax_d, (S(edges.shape, F32), S(image.shape, F32)),
                         seed=2)
  want, _ = jax.jit(flax_d.apply)(variables, (edges, image))
  assert want.shape == (2, 2, 2, 1, 32)

  d = torch_port.PatchDiscriminator("lr", in_channels=3, ndf=8, n_layers=3,
                                    norm=norm, edge_channels=2)
  torch_port.load_flax_params(d, variables).eval()
  with torch.no_grad():
    got = d(torch_port.to_torch(edges), torch_port.to_torch(image))
  _assert_close(got, want)


def test_to_torch_layout_round_trip():
  x = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.float32).reshape(2, 3, 4, 5, 6)
  t = torch_port.to_torch(x)
  assert tuple(t.shape) == (2, 6, 3, 4, 5) and t.dtype == torch.float32
  assert t[1, 5, 2, 3, 4] == x[1, 2, 3, 4, 5]
  np.testing.assert_array_equal(torch_port.to_numpy(t), x)
  with pytest.raises(ValueError, match="expected"):
    torch_port.to_torch(x[0])


# ---------------------------------------------------------------------------
# Mismatches are errors.


def test_load_flax_params_rejects_mismatches():
  flax_g = HRGenerator(ngf=4, n_blocks=1)
  variables = _init_shapes(flax_g, S((1, 8, 8, 8, 2), F32), train=False)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), variables)
  # Right architecture loads (sanity for the failures below).
  torch_port.load_flax_params(
      torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=1), variables)
  with pytest.raises(ValueError, match="conv_in"):  # wrong widths
    torch_port.load_flax_params(
        torch_port.ResNetGenerator(in_channels=2, ngf=8, n_blocks=1),
        variables)
  with pytest.raises(ValueError, match="conv_in"):  # wrong input channels
    torch_port.load_flax_params(
        torch_port.ResNetGenerator(in_channels=3, ngf=4, n_blocks=1),
        variables)
  with pytest.raises(ValueError, match="block_1"):  # torch has more blocks
    torch_port.load_flax_params(
        torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=2),
        variables)
  with pytest.raises(ValueError, match="not matched.*block_0"):  # fewer
    torch_port.load_flax_params(
        torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=0),
        variables)
  with pytest.raises(ValueError, match="no Flax counterpart"):  # extra layer
    g = torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=1)
    g.head = torch.nn.Linear(2, 2)
    torch_port.load_flax_params(g, variables)
  with pytest.raises(ValueError, match="params"):
    torch_port.load_flax_params(
        torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=1),
        variables["params"])
  # A failed load leaves the module untouched.
  g = torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=2)
  before = g.conv_in.weight.detach().clone()
  with pytest.raises(ValueError):
    torch_port.load_flax_params(g, variables)
  assert torch.equal(g.conv_in.weight, before)


# ---------------------------------------------------------------------------
# Training step.


@pytest.mark.parametrize("kind", ["hr", "lr"])
def test_train_step_updates_both_networks(kind):
  torch.manual_seed(0)
  if kind == "hr":
    g = torch_port.ResNetGenerator(in_channels=2, ngf=4, n_blocks=1)
    d = torch_port.PatchDiscriminator("hr", in_channels=3, ndf=4, n_layers=2,
                                      norm="batch")
    p = 16
    batch = {k: torch.randn(2, 1, p, p, p) for k in ("prev", "edges")}
    batch["target"] = torch.tanh(torch.randn(2, 1, p, p, p))
  else:
    g = torch_port.ResNetGenerator(in_channels=1, ngf=4, n_blocks=1,
                                   n_pre_down=1)
    d = torch_port.PatchDiscriminator("lr", in_channels=2, ndf=4, n_layers=2)
    batch = {"edges": torch.randn(2, 1, 16, 16, 16),
             "target": torch.tanh(torch.randn(2, 1, 8, 8, 8))}
  g0 = [p.detach().clone() for p in g.parameters()]
  d0 = [p.detach().clone() for p in d.parameters()]
  step = torch_port.make_train_step(g, d, kind=kind)
  metrics = step(batch)
  assert {"d_loss", "g_loss"} <= set(metrics)
  assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
  # g_loss = gan + 10·L1, each term non-negative.
  assert metrics["g_loss"] >= 10 * metrics["g_l1"] > 0
  assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
  assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
  assert all(p.requires_grad for p in d.parameters())
  with pytest.raises(ValueError, match="lacks"):
    step({"edges": batch["edges"]})
