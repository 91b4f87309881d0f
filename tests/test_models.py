"""Layers (fast == plain, PyTorch semantics), networks (shapes, counts, purity)."""
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megan_jax.errors import InputError
from megan_jax.models import layers
from megan_jax.models import (HRGenerator, LRResNetGenerator, LRUNetGenerator,
                              PatchDiscriminator, ResNetBlock)

F32 = jnp.float32
S = jax.ShapeDtypeStruct


@pytest.fixture(autouse=True, scope="module")
def _test_config():
  """fast == plain holds to ~1e-5 only without TF32 (GPU default) matmuls;
  the non-partitionable threefry compiles jax.random (dropout, init) ~10×
  faster on this CPU (a different but equally valid random stream)."""
  with jax.default_matmul_precision("highest"), \
      jax.threefry_partitionable(False):
    yield


def _rand(seed, shape, scale=1.0):
  """Normal noise from numpy: jax.random would compile once per shape (slow)."""
  x = scale * np.random.default_rng(seed).normal(size=shape)
  return x.astype(np.float32)


def _close(a, b, tol=1e-5):
  """|a - b| <= tol · max|b| elementwise (fp32 sums of many products)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  atol = tol * max(np.abs(b).max(), 1e-6)
  np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def _close_tree(a, b, tol=1e-5):
  jax.tree.map(functools.partial(_close, tol=tol), a, b)


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(model, *args, **kwargs):
  """Parameter shapes without allocating or compiling."""
  return jax.eval_shape(functools.partial(model.init, **kwargs),
                        jax.random.PRNGKey(0), *args)


def _np_params(model, *args, seed=0, **kwargs):
  """Random parameters built in numpy from the shapes (tests need not pay for
  compiling jax.random: ~1 s per parameter shape on this CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:  # LeCun-like scale: O(1) activations
      return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
    centre = 1.0 if "scale" in name else 0.0
    return centre + rng.normal(0, 0.1, s.shape)

  shapes = _init_shapes(model, *args, **kwargs)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: np.asarray(draw(p, s), np.float32), shapes)


# ---------------------------------------------------------------------------
# Layers.


def test_space_to_depth_layout_and_inverse():
  x = np.arange(2 * 4 * 6 * 2 * 3, dtype=np.float32).reshape(2, 4, 6, 2, 3)
  y = layers.space_to_depth(x, 2)
  assert y.shape == (2, 2, 3, 1, 24)
  # channel ((i·2 + j)·2 + k)·C + c holds x[:, 2d + i, 2h + j, 2w + k, c]
  i, j, k, c = 1, 0, 1, 2
  np.testing.assert_array_equal(y[:, 1, 2, 0, ((i * 2 + j) * 2 + k) * 3 + c],
                                x[:, 2 + i, 4 + j, 0 + k, c])
  np.testing.assert_array_equal(layers.depth_to_space(y, 2), x)
  with pytest.raises(ValueError, match="divisible"):
    layers.space_to_depth(x[:, :3], 2)


def _value_and_grads(fn, x, kernel):
  """fn(x, kernel) and the gradients of a random projection of it."""
  ct = _rand(9, jax.eval_shape(fn, x, kernel).shape)
  loss = lambda x, k: jnp.sum(fn(x, k) * ct)
  both = jax.jit(lambda x, k: (fn(x, k), jax.grad(loss, (0, 1))(x, k)))
  return both(x, kernel)


# (fast fn, plain fn, kernel size, input shape): odd and even sizes.
_DOWN = lambda p: (lambda x, k: layers.down_conv_fast(x, k, p),
                   lambda x, k: layers.conv3d(x, k, p, stride=2))
_CASES = {
    "conv3_odd": (lambda x, k: layers.conv3d_im2col(x, k, 1),
                  lambda x, k: layers.conv3d(x, k, 1), 3, (2, 5, 6, 7, 3)),
    "conv4_p0": (lambda x, k: layers.conv3d_im2col(x, k, 0),
                 lambda x, k: layers.conv3d(x, k, 0), 4, (1, 6, 7, 5, 2)),
    "down_p1_even": _DOWN(1) + (4, (2, 6, 8, 4, 3)),
    "down_p1_odd": _DOWN(1) + (4, (1, 7, 5, 9, 3)),
    "down_p0_odd": _DOWN(0) + (4, (1, 9, 7, 8, 2)),
    "down_k3_p1": _DOWN(1) + (3, (1, 8, 7, 6, 1)),
    "up": (layers.up_conv_fast, layers.up_conv_plain, 4, (2, 3, 4, 5, 3)),
    "up_own_grad": (layers._up_conv_own_grad, layers.up_conv_plain, 4,
                    (2, 3, 4, 5, 3)),
    "out_1ch": (lambda x, k: layers.out_conv_fast(x, k, 3),
                lambda x, k: layers.conv3d(x, k, 3), 7, (1, 5, 6, 7, 4)),
    "out_2ch_k5": (lambda x, k: layers.out_conv_fast(x, k, 2),
                   lambda x, k: layers.conv3d(x, k, 2), 5, (2, 4, 5, 6, 3)),
    "taps_k3_p1": (lambda x, k: layers.conv3d_taps(x, k, 1),
                   lambda x, k: layers.conv3d(x, k, 1), 3, (2, 5, 6, 7, 3)),
    # C_out 16 (`layers.TAPS_VOXEL_MAJOR`): y kept voxel-major.
    "taps_voxel_major": (lambda x, k: layers.conv3d_taps(x, k, 1),
                         lambda x, k: layers.conv3d(x, k, 1), 2,
                         (2, 5, 4, 6, 3)),
    # k = 2 (8 taps, `layers.TAPS_OWN_GRAD_TAPS`): `_taps_small`'s backward.
    "taps_small_p0": (lambda x, k: layers.conv3d_taps(x, k, 0),
                      lambda x, k: layers.conv3d(x, k, 0), 2,
                      (2, 6, 5, 7, 3)),
    "taps_voxel_major_k3": (lambda x, k: layers.conv3d_taps(x, k, 1),
                            lambda x, k: layers.conv3d(x, k, 1), 3,
                            (1, 5, 4, 6, 3)),
    "winograd_p1": (lambda x, k: layers.conv3d_winograd(x, k, 1),
                    lambda x, k: layers.conv3d(x, k, 1), 3, (2, 5, 6, 7, 3)),
    "winograd_p0": (lambda x, k: layers.conv3d_winograd(x, k, 0),
                    lambda x, k: layers.conv3d(x, k, 0), 3, (1, 6, 9, 5, 2)),
    "narrow_p1": (lambda x, k: layers.conv3d_im2col_narrow(x, k, 1),
                  lambda x, k: layers.conv3d(x, k, 1), 3, (2, 6, 5, 7, 1)),
    "narrow_p0_k4": (lambda x, k: layers.conv3d_im2col_narrow(x, k, 0),
                     lambda x, k: layers.conv3d(x, k, 0), 4, (1, 7, 6, 5, 2)),
    # padding beyond k - 1: the backward crops (it padded by a negative).
    "narrow_p2_k2": (lambda x, k: layers.conv3d_im2col_narrow(x, k, 2),
                     lambda x, k: layers.conv3d(x, k, 2), 2, (1, 3, 4, 5, 2)),
    "winograd_k2_p0": (lambda x, k: layers.conv3d_winograd(x, k, 0),
                       lambda x, k: layers.conv3d(x, k, 0), 2, (2, 7, 6, 5, 3)),
    "winograd_k2_p1": (lambda x, k: layers.conv3d_winograd(x, k, 1),
                       lambda x, k: layers.conv3d(x, k, 1), 2, (1, 4, 5, 6, 2)),
    # 8³ 2³-tiles and 32 channels in and out: conv3d_fast takes Winograd.
    "fast_many_tiles": (lambda x, k: layers.conv3d_fast(x, k, 1),
                        lambda x, k: layers.conv3d(x, k, 1), 3,
                        (1, 16, 15, 16, 32)),
    "fast_many_tiles_k2": (lambda x, k: layers.conv3d_fast(x, k, 0),
                           lambda x, k: layers.conv3d(x, k, 0), 2,
                           (1, 17, 16, 17, 32)),
    # C_in 24 >= 4 · C_out 5: conv3d_fast dispatches to the taps form.
    "fast_wide_in": (lambda x, k: layers.conv3d_fast(x, k, 1),
                     lambda x, k: layers.conv3d(x, k, 1), 2, (1, 5, 4, 6, 24)),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_fast_equals_plain_values_and_gradients(case):
  fast, plain, k, shape = _CASES[case]
  cout = {"out_1ch": 1, "out_2ch_k5": 2, "fast_many_tiles": 32,
          "fast_many_tiles_k2": 32, "taps_voxel_major": 16,
          "taps_small_p0": 16, "taps_voxel_major_k3": 16}.get(case, 5)
  x = _rand(0, shape)
  kernel = _rand(1, (k, k, k, shape[-1], cout), 1 / np.sqrt(k**3 * shape[-1]))
  y_fast, g_fast = _value_and_grads(fast, x, kernel)
  y_plain, g_plain = _value_and_grads(plain, x, kernel)
  _close(y_fast, y_plain)
  _close_tree(g_fast, g_plain)


def _torch_conv_transpose(x, w):
  """PyTorch ConvTranspose3d(k=4, stride=2, padding=1), explicit loops, numpy.

  x: [D, H, W, Cin]; w: [4, 4, 4, Cin, Cout]; input voxel i adds to 2i + k - 1.
  """
  d, h, wd, _ = x.shape
  out = np.zeros((2 * d + 2, 2 * h + 2, 2 * wd + 2, w.shape[-1]))  # +1 per side
  for i, j, l in np.ndindex(d, h, wd):
    for a, b, c in np.ndindex(4, 4, 4):
      out[2 * i + a, 2 * j + b, 2 * l + c] += x[i, j, l] @ w[a, b, c]
  return out[1:-1, 1:-1, 1:-1]  # output index o = 2i + k - 1 (padding 1)


def test_up_conv_has_pytorch_semantics():
  x = np.asarray(_rand(0, (1, 2, 3, 2, 2)))
  w = np.asarray(_rand(1, (4, 4, 4, 2, 3)))
  expected = _torch_conv_transpose(x[0], w)
  assert expected.shape == (4, 6, 4, 3)
  for fn in (layers.up_conv_fast, layers.up_conv_plain):
    _close(fn(x, w)[0], expected)
  # and lax's own transposed conv with PyTorch's padding rule (k - 1 - p = 2)
  ref = jax.lax.conv_transpose(x, np.swapaxes(w, 3, 4), (2, 2, 2), [(2, 2)] * 3,
                               dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                               transpose_kernel=True)
  _close(ref[0], expected)


@pytest.mark.parametrize("cls,kwargs,shape", [
    (layers.Conv3d, dict(features=5, kernel_size=3, padding=1),
     (1, 5, 4, 3, 2)),
    (layers.DownConv, dict(features=5, padding=0), (1, 7, 6, 5, 2)),
    (layers.UpConv, dict(features=5), (1, 3, 2, 3, 2)),
    (layers.OutConv, dict(features=1), (1, 5, 4, 6, 3)),
])
def test_conv_modules_share_params_and_agree(cls, kwargs, shape):
  x = _rand(0, shape)
  fast, plain = cls(**kwargs, impl="fast"), cls(**kwargs, impl="plain")
  k = kwargs.get("kernel_size", 7 if cls is layers.OutConv else 4)
  shapes = jax.tree.map(jnp.shape, _init_shapes(fast, x))
  assert shapes == {"params": {
      "kernel": (k, k, k, shape[-1], kwargs["features"]),
      "bias": (kwargs["features"],)}}
  assert jax.tree.map(jnp.shape, _init_shapes(plain, x)) == shapes
  params = _np_params(fast, x)
  _close(jax.jit(fast.apply)(params, x), jax.jit(plain.apply)(params, x))
  with pytest.raises(ValueError, match="impl"):
    _init_shapes(cls(**kwargs, impl="quick"), x)


@hypothesis.settings(deadline=None, max_examples=6)
@hypothesis.given(n=st.integers(4, 9), k=st.sampled_from([3, 4]),
                  padding=st.integers(0, 1))
def test_down_conv_fast_equals_plain_any_size(n, k, padding):
  x = _rand(n, (1, n, n + 1, 4, 2))
  kernel = _rand(k, (k, k, k, 2, 3))
  fast = jax.jit(layers.down_conv_fast, static_argnums=2)
  _close(fast(x, kernel, padding), layers.conv3d(x, kernel, padding, stride=2))


@hypothesis.settings(deadline=None, max_examples=10)
@hypothesis.given(n=st.integers(3, 10), k=st.sampled_from([1, 2, 3, 4, 7]),
                  padding=st.integers(-1, 3), block=st.integers(1, 5),
                  cout=st.sampled_from([1, 3]))
def test_conv3d_blocked_equals_conv3d_and_its_gradients(n, k, padding, block,
                                                          cout):
  """The blocked form (a GPU candidate for the skinny convs) is the same
  function as the lax conv, its gradients too, for sizes the blocks do not
  divide."""
  hypothesis.assume(n + 2 * padding >= k)
  x = _rand(n, (2, n, n + 2, max(n - 1, k - 2 * padding), 2))
  kernel = _rand(k, (k, k, k, 2, cout))
  direct = lambda x, w: layers.conv3d(x, w, padding)
  blocked = lambda x, w: layers.conv3d_blocked(x, w, padding, block)
  _close(jax.jit(blocked)(x, kernel), direct(x, kernel))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  _close_tree(jax.jit(jax.grad(loss(blocked), (0, 1)))(x, kernel),
              jax.grad(loss(direct), (0, 1))(x, kernel))


def _numpy_norm(x, axes, scale, bias, eps=1e-5):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)  # biased
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("cls,axes", [(layers.InstanceNorm, (1, 2, 3)),
                                      (layers.BatchNorm, (0, 1, 2, 3))])
def test_norms_match_numpy(cls, axes):
  x = _rand(0, (2, 3, 4, 5, 3), 0.01) + 0.5  # variance near eps: eps matters
  module = cls()
  assert set(_init_shapes(module, x)) == {"params"}  # stateless: no batch_stats
  params = module.init(jax.random.PRNGKey(1), x)  # no RNG: ones and zeros
  np.testing.assert_array_equal(params["params"]["scale"], np.ones(3))
  p = {"scale": np.array([0.5, 1.0, 2.0], np.float32),
       "bias": np.array([0.0, -1.0, 3.0], np.float32)}
  _close(module.apply({"params": p}, x),
         _numpy_norm(x, axes, p["scale"], p["bias"]))


def test_norm_computes_in_float32_for_bf16():
  x = _rand(0, (1, 4, 4, 4, 2), 30.0) + 1000.0  # bf16 statistics would be off
  module = layers.InstanceNorm(dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(1), x)  # ones and zeros, no RNG
  assert params["params"]["scale"].dtype == F32
  y = module.apply(params, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  expected = _numpy_norm(np.asarray(x.astype(jnp.bfloat16), np.float64),
                         (1, 2, 3), 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-2)


def test_init_schemes():
  kernel_init, bias_init, scale_init = layers.initializers("reference")
  key = jax.random.PRNGKey(0)
  with jax.threefry_partitionable(False):  # also set by _test_config
    w = kernel_init(key, (3, 3, 3, 64, 64))
    s = scale_init(key, (10000,))
    w_default = layers.initializers("default")[0](key, (3, 3, 3, 64, 64))
  assert float(jnp.std(w)) == pytest.approx(0.001, rel=0.02)
  assert float(jnp.mean(s)) == pytest.approx(1.0, abs=1e-3)
  assert float(jnp.std(s)) == pytest.approx(0.02, rel=0.05)
  assert not np.any(bias_init(key, (5,)))
  assert float(jnp.std(w_default)) == pytest.approx(1 / np.sqrt(27 * 64),
                                                    rel=0.05)
  with pytest.raises(ValueError, match="init"):
    layers.initializers("xavier")


# ---------------------------------------------------------------------------
# Full-size networks: shapes and counts without allocating or compiling.


@pytest.mark.parametrize("name,model,args,n_params,out_shape", [
    ("hr_g", HRGenerator(), (S((1, 32, 32, 32, 2), F32),), 26_513_089,
     (1, 32, 32, 32, 1)),
    ("lr_resnet_g", LRResNetGenerator(), (S((1, 128, 128, 128, 1), F32),),
     26_773_697, (1, 64, 64, 64, 1)),
    # The public code's outputs (METHOD.md's table): one logit per patch.
    ("hr_d_instance", PatchDiscriminator(kind="hr", output="code"),
     (S((1, 32, 32, 32, 3), F32),), 2_651_329, (1, 1, 1, 1, 1)),
    ("hr_d_batch", PatchDiscriminator(kind="hr", norm="batch", output="code"),
     (S((1, 32, 32, 32, 3), F32),), 2_651_329, (1, 1, 1, 1, 1)),
    # 28 + 8,256 + 524,416 + 256 + 2,097,408 + 512
    ("lr_d", PatchDiscriminator(kind="lr", output="code"),
     ((S((1, 128, 128, 128, 1), F32), S((1, 64, 64, 64, 1), F32)),),
     2_630_876, (1, 8, 8, 8, 256)),
    # The paper's PatchGAN maps (the default): the same HR weights with a
    # stride-1 last conv, a 2³ map; the LR scale gains pix2pix's last conv,
    # 4³ x 256 -> 1 (+16,385), a 7³ map.
    ("hr_d_map", PatchDiscriminator(kind="hr"),
     (S((1, 32, 32, 32, 3), F32),), 2_651_329, (1, 2, 2, 2, 1)),
    ("lr_d_map", PatchDiscriminator(kind="lr"),
     ((S((1, 128, 128, 128, 1), F32), S((1, 64, 64, 64, 1), F32)),),
     2_647_261, (1, 7, 7, 7, 1)),
])
def test_paper_size_parameter_counts_and_shapes(name, model, args, n_params,
                                                out_shape):
  params = _init_shapes(model, *args, train=False)
  assert _n_params(params) == n_params, name
  assert all(p.dtype == F32 for p in jax.tree.leaves(params))
  out = jax.eval_shape(functools.partial(model.apply, train=False), params,
                       *args)
  logits = out[0] if isinstance(out, tuple) else out
  assert logits.shape == out_shape and logits.dtype == F32


def test_unet_size_and_count_match_docstring():
  x = S((1, 128, 128, 128, 1), F32)
  model = LRUNetGenerator()
  params = _init_shapes(model, x, train=False)
  assert f"{_n_params(params):,}" in LRUNetGenerator.__doc__
  out = jax.eval_shape(functools.partial(model.apply, train=False), params, x)
  assert out.shape == (1, 64, 64, 64, 1)


def test_hr_generator_flops_per_patch(monkeypatch):
  """METHOD.md: 36.3 GFLOP per 32³ patch (1 multiply-add = 2 FLOP).

  XLA's count of the fast form (lowered, not compiled; the plain form's
  dilated convs are under-counted by XLA's cost model) with Winograd off
  (it does fewer multiplies than the network has) includes the
  sub-pixel up convs' extra windows: each of the 8 phases runs at (n+1)³
  windows for n³ outputs; and the same for the tap-matmul form of the
  down convs (`layers.conv3d_fast`).
  """
  monkeypatch.setattr(layers, "WINOGRAD_MIN_TILES", math.inf)
  model, x = HRGenerator(impl="fast"), S((1, 32, 32, 32, 2), F32)
  params = _init_shapes(model, x, train=False)
  flops = jax.jit(functools.partial(model.apply, train=False)).lower(
      params, x).cost_analysis()["flops"]
  extra = sum(2 * ((n + 1)**3 - n**3) * 64 * cin * cout
              for n, cin, cout in ((8, 256, 128), (16, 128, 64)))
  # The stride-2 convs' space-to-depth convs (512 -> 128 channels, 17³ ->
  # 16³; 1024 -> 256, 9³ -> 8³) run as the tap matmul, at every input voxel.
  extra += 2 * (17**3 - 16**3) * 8 * 512 * 128
  extra += 2 * (9**3 - 8**3) * 8 * 1024 * 256
  assert flops == pytest.approx(36.3e9 + extra, rel=0.02)


# ---------------------------------------------------------------------------
# Tiny generators, compiled once per module and shared by the tests.

_HR_X = _rand(0, (2, 16, 16, 16, 2))


def _tiny_hr(**kwargs):
  return HRGenerator(ngf=4, n_blocks=1, **kwargs)


@pytest.fixture(scope="module")
def hr_params():
  return _np_params(_tiny_hr(), _HR_X, train=False)


@pytest.fixture(scope="module")
def hr_out(hr_params):
  """The fast fp32 tiny HR G's output (train=False)."""
  apply = jax.jit(functools.partial(_tiny_hr().apply, train=False))
  return apply(hr_params, _HR_X)


def test_hr_generator_output(hr_out):
  assert hr_out.shape == (2, 16, 16, 16, 1) and hr_out.dtype == F32
  assert float(jnp.abs(hr_out).max()) <= 1.0 and float(jnp.std(hr_out)) > 0.01


def test_hr_generator_fast_equals_plain(hr_params, hr_out):
  plain = _tiny_hr(impl="plain")
  _close(jax.jit(functools.partial(plain.apply, train=False))(hr_params, _HR_X),
         hr_out, tol=2e-5)


def test_hr_generator_is_pure_and_dropout_uses_rng(hr_params):
  apply = jax.jit(_tiny_hr(impl="plain").apply, static_argnames="train")
  y = apply(hr_params, _HR_X, train=False)
  np.testing.assert_array_equal(apply(hr_params, _HR_X, train=False), y)
  rng = {"dropout": jax.random.PRNGKey(1)}
  y1 = apply(hr_params, _HR_X, train=True, rngs=rng)
  np.testing.assert_array_equal(apply(hr_params, _HR_X, train=True, rngs=rng),
                                y1)
  y2 = apply(hr_params, _HR_X, train=True,
             rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(y1, y2)
  assert not np.allclose(y1, y)


def test_hr_generator_bf16_compute_fp32_params(hr_params, hr_out):
  model = _tiny_hr(dtype=jnp.bfloat16)
  shapes = _init_shapes(model, _HR_X, train=False)
  assert all(p.dtype == F32 for p in jax.tree.leaves(shapes))
  y = jax.jit(functools.partial(model.apply, train=False))(hr_params, _HR_X)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), hr_out, atol=0.1)


def test_hr_generator_reads_input_channels_and_validates_size():
  three = _init_shapes(_tiny_hr(), S((1, 8, 8, 8, 3), F32), train=False)
  assert three["params"]["conv_in"]["kernel"].shape == (3, 3, 3, 3, 4)
  with pytest.raises(InputError, match=r"\(12, 12, 10\).*divisible by 4"):
    _init_shapes(_tiny_hr(), S((1, 12, 12, 10, 2), F32), train=False)


def test_resnet_block_reference_init():
  """The HR nets' init: conv weights N(0, 0.001²), norm scales N(1, 0.02²)."""
  x = jnp.zeros((1, 4, 4, 4, 16))
  with jax.threefry_partitionable(False):  # also set by _test_config
    p = ResNetBlock(init_scheme="reference").init(
        jax.random.PRNGKey(0), x, train=False)["params"]
    q = ResNetBlock(init_scheme="default").init(
        jax.random.PRNGKey(0), x, train=False)["params"]
  assert float(jnp.std(p["conv_0"]["kernel"])) == pytest.approx(0.001, rel=0.05)
  assert float(jnp.std(p["norm_1"]["scale"])) == pytest.approx(0.02, rel=0.5)
  assert float(jnp.abs(p["norm_1"]["scale"] - 1).max()) < 0.1
  assert not np.any(p["conv_1"]["bias"])
  assert float(jnp.std(q["conv_0"]["kernel"])) == pytest.approx(
      1 / np.sqrt(27 * 16), rel=0.1)
  np.testing.assert_array_equal(q["norm_0"]["scale"], np.ones(16))


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_resnet_block_adds_its_branch_to_its_input(impl):
  """``x + branch(x)``: with the branch's last norm scaled by 0 the branch is
  exactly that norm's bias b, so the block returns ``x + b`` bit for bit
  (``x`` itself for b = 0), whatever the convs' weights."""
  block = ResNetBlock(impl=impl)
  x = _rand(3, (2, 4, 4, 4, 8))
  p = _np_params(block, x, train=False, seed=3)
  apply = jax.jit(functools.partial(block.apply, train=False))
  b = _rand(4, (8,))
  for bias in (np.zeros(8, np.float32), b):
    p["params"]["norm_1"]["scale"] = np.zeros(8, np.float32)
    p["params"]["norm_1"]["bias"] = bias
    y = apply(p, x)
    np.testing.assert_array_equal(y, x + bias)
  # With its weights the branch adds something: the block is not x alone.
  q = _np_params(block, x, train=False, seed=3)
  assert np.abs(np.asarray(apply(q, x)) - x).max() > 0.1


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_hr_generator_ends_in_tanh(impl, hr_params):
  """The output is tanh of the output conv's (captured) pre-activation, not
  a clip of it: for random weights elementwise; with that conv's kernel 0
  and bias 1.5, tanh(1.5) ≈ 0.905 everywhere, strictly inside (-1, 1)."""
  apply = jax.jit(functools.partial(_tiny_hr(impl=impl).apply, train=False,
                                    capture_intermediates=True))
  y, inter = apply(hr_params, _HR_X)
  pre = np.asarray(inter["intermediates"]["conv_out"]["__call__"][0])
  assert y.shape == pre.shape == (2, 16, 16, 16, 1)
  assert np.abs(pre - np.tanh(pre)).max() > 0.05  # tanh and clip differ here
  np.testing.assert_allclose(y, np.tanh(pre), rtol=0, atol=2e-6)
  flat = jax.tree_util.tree_map_with_path(
      lambda path, v: (np.zeros_like(v) if "conv_out']['kernel" in
                       jax.tree_util.keystr(path) else
                       np.full_like(v, 1.5) if "conv_out']['bias" in
                       jax.tree_util.keystr(path) else v), hr_params)
  y, inter = apply(flat, _HR_X)
  np.testing.assert_array_equal(inter["intermediates"]["conv_out"]
                                ["__call__"][0], 1.5)
  np.testing.assert_allclose(y, np.tanh(np.float32(1.5)), rtol=0, atol=1e-6)
  assert float(jnp.abs(y).max()) < 0.95


@pytest.mark.parametrize("model", [
    LRResNetGenerator(ngf=4, n_blocks=1),
    LRUNetGenerator(ngf=4, num_levels=3),
], ids=["resnet", "unet"])
def test_lr_generators(model):
  edges = _rand(1, (1, 16, 16, 16, 1))
  params = _np_params(model, edges, train=False)
  apply = jax.jit(functools.partial(model.apply, train=True))
  y1 = apply(params, edges, rngs={"dropout": jax.random.PRNGKey(1)})
  assert y1.shape == (1, 8, 8, 8, 1) and y1.dtype == F32
  assert float(jnp.abs(y1).max()) <= 1.0
  y2 = apply(params, edges, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(y1, y2)  # dropout acts


def test_lr_generators_validate_size():
  with pytest.raises(InputError, match=r"\(24, 24, 24\).*2\*\*num_levels = 16"):
    _init_shapes(LRUNetGenerator(ngf=4, num_levels=4),
                 S((1, 24, 24, 24, 1), F32), train=False)
  with pytest.raises(InputError, match="divisible by 8"):
    _init_shapes(LRResNetGenerator(ngf=4), S((1, 20, 20, 20, 1), F32),
                 train=False)


# ---------------------------------------------------------------------------
# Discriminators.


@pytest.mark.parametrize("norm,output", [("instance", "map"),
                                         ("batch", "map"),
                                         ("instance", "code")])
def test_hr_discriminator_fast_equals_plain(norm, output):
  x = _rand(2, (2, 16, 16, 16, 3))
  fast = PatchDiscriminator(kind="hr", ndf=4, n_layers=2, norm=norm,
                            output=output)
  params = _np_params(fast, x)
  logits, features = jax.jit(fast.apply)(params, x)
  side = 2 if output == "map" else 1  # 5³ -> conv 4³ stride 1 or 2
  assert logits.shape == (2, side, side, side, 1) and logits.dtype == F32
  assert [f.shape for f in features] == [(2, 13, 13, 13, 4), (2, 5, 5, 5, 8)]
  plain = fast.clone(impl="plain")
  logits_p, features_p = jax.jit(plain.apply)(params, x)
  _close(logits, logits_p, tol=2e-5)
  _close_tree(features, features_p, tol=2e-5)
  # Batch statistics couple the samples; instance statistics do not.
  logits_0, _ = jax.jit(plain.apply)(params, x[:1])
  assert np.allclose(logits_0, logits[:1], atol=1e-5) == (norm == "instance")


def test_lr_discriminator_fast_equals_plain_and_bf16():
  edges, image = _rand(3, (1, 32, 32, 32, 1)), _rand(4, (1, 16, 16, 16, 1))
  fast = PatchDiscriminator(kind="lr", ndf=4, n_layers=3, output="code")
  params = _np_params(fast, (edges, image))
  assert params["params"]["sketch_down"]["kernel"].shape == (3, 3, 3, 1, 1)
  logits, features = jax.jit(fast.apply)(params, (edges, image))
  assert logits.shape == (1, 2, 2, 2, 16) and logits.dtype == F32
  np.testing.assert_array_equal(logits, features[-1])
  logits_p, _ = jax.jit(fast.clone(impl="plain").apply)(params, (edges, image))
  _close(logits, logits_p, tol=2e-5)
  half = fast.clone(dtype=jnp.bfloat16)
  logits_h, features_h = jax.jit(half.apply)(params, (edges, image))
  assert logits_h.dtype == F32 and features_h[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(logits_h, logits, atol=0.1)


def test_lr_discriminator_map_is_one_conv_on_the_codes_logits():
  # output="map" (the paper's): pix2pix's last conv 4³ s1 p1 to 1 channel on
  # what output="code" returns as logits (the last features).
  edges, image = _rand(5, (2, 64, 64, 64, 1)), _rand(6, (2, 32, 32, 32, 1))
  mapped = PatchDiscriminator(kind="lr", ndf=4, n_layers=3)
  params = _np_params(mapped, (edges, image))
  logits, features = jax.jit(mapped.apply)(params, (edges, image))
  assert logits.shape == (2, 3, 3, 3, 1)  # 4³ features -> a 3³ map
  code = mapped.clone(output="code")
  code_params = {"params": {k: v for k, v in params["params"].items()
                            if k != "conv_out"}}
  code_logits, _ = jax.jit(code.apply)(code_params, (edges, image))
  np.testing.assert_array_equal(code_logits, features[-1])
  out = params["params"]["conv_out"]
  want = layers.conv3d(features[-1], out["kernel"], 1) + out["bias"]
  _close(logits, want, tol=2e-5)
  with pytest.raises(ValueError, match="output"):
    _init_shapes(mapped.clone(output="pix2pix"), (edges, image))


def test_discriminators_validate_inputs():
  hr = PatchDiscriminator(kind="hr")
  with pytest.raises(InputError, match="too small"):
    _init_shapes(hr, S((1, 16, 16, 16, 3), F32))
  with pytest.raises(InputError, match="one"):
    _init_shapes(hr, (S((1, 32, 32, 32, 1), F32), S((1, 32, 32, 32, 1), F32)))
  lr = PatchDiscriminator(kind="lr")
  with pytest.raises(InputError, match="not twice"):
    _init_shapes(lr, (S((1, 64, 64, 64, 1), F32), S((1, 64, 64, 64, 1), F32)))
  with pytest.raises(InputError, match="tuple"):
    _init_shapes(lr, S((1, 64, 64, 64, 1), F32))
  with pytest.raises(ValueError, match="kind"):
    _init_shapes(PatchDiscriminator(kind="mid"), S((1, 32, 32, 32, 3), F32))
  with pytest.raises(ValueError, match="norm"):
    _init_shapes(PatchDiscriminator(norm="group"), S((1, 32, 32, 32, 3), F32))


def _dot_batch_dims(fn, *args):
  """Batch dimensions of every dot_general ``fn`` traces to (sub-jaxprs
  included)."""
  found = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "dot_general":
        found.append(e.params["dimension_numbers"][1])
      for value in e.params.values():
        sub = getattr(value, "jaxpr", value)
        if hasattr(sub, "eqns"):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("side,batch,own", [(16, 1, True), (8, 1, False),
                                            (8, 4, True)])
def test_up_conv_takes_own_backward_where_its_input_gradient_goes_winograd(
    side, batch, own):
  # The input gradient is `down_conv_fast`'s 2³ conv 8·C_out -> C_in over
  # side³ outputs: Winograd from 256 2³-tiles (HR decoder: 16³ -> 32³ at
  # batch 1, 8³ -> 16³ from batch 4).
  assert layers.UP_OWN_GRAD and layers.WINOGRAD_MIN_TILES == 256
  x = jax.ShapeDtypeStruct((batch, side, side, side, 128), jnp.float32)
  w = jax.ShapeDtypeStruct((4, 4, 4, 128, 64), jnp.float32)
  jaxpr = str(jax.make_jaxpr(layers.up_conv_fast)(x, w))
  assert ("custom_vjp_call" in jaxpr) == own


@pytest.mark.parametrize("k", [2, 3])
def test_voxel_major_taps_take_own_backward_for_few_taps(k):
  # 2³ kernels (the stride-2 layers' convs): `_taps_small`, a custom vjp;
  # 3³ ones differentiate the form itself.
  assert layers.TAPS_OWN_GRAD_TAPS == 8
  x, w = jnp.ones((1, 5, 5, 5, 4)), jnp.ones((k, k, k, 4, 16))
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv3d_taps(x, w, 1))(x, w))
  assert ("custom_vjp_call" in jaxpr) == (k == 2)


@pytest.mark.parametrize("k", [2, 3])
def test_winograd_backward_form_follows_kernel_size(k):
  # 3³ convs differentiate through the stacked Winograd form (dots batched
  # over tile positions); 2³ convs run the split Winograd forward and the
  # dot form's backward (plain dots), which was faster for them.
  assert layers.WINOGRAD_GRAD_KERNELS == (3,)
  x = jnp.ones((1, 9, 9, 9, 32))
  w = jnp.ones((k, k, k, 32, 32))
  grad = jax.grad(lambda x, w: jnp.sum(layers.conv3d_winograd(x, w, 1) ** 2),
                  argnums=(0, 1))
  batch = _dot_batch_dims(grad, x, w)
  batched = [b for b in batch if b != ((), ())]
  if k == 3:
    assert batch and len(batched) == len(batch)
  else:
    # the split forward's 27; im2col's dot traced again by its vjp (XLA
    # drops it: unused) and its two transposes
    assert not batched and len(batch) == 27 + 3


def test_winograd_3_in_bfloat16_is_nearer_the_plain_conv():
  # Its transforms (sums, halvings) ran in bf16: more roundings before the
  # dot, 2.2x the plain bf16 conv's error here (3³). Now in float32, the
  # dot's operands cast to bf16 once: 1.55x. (2³ stays ~2.3x either way:
  # the transformed operands' own rounding, which the output transform's
  # cancellations magnify.)
  k = 3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 8, 32)), F32)
  w = jnp.asarray(rng.normal(size=(k, k, k, 32, 32)) / np.sqrt(k**3 * 32),
                  F32)
  with jax.default_matmul_precision("highest"):
    ref = layers.conv3d(x, w, 1)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

  def err(fn):
    y = jax.jit(fn)(xb, wb)
    assert y.dtype == jnp.bfloat16
    return float(jnp.abs(y.astype(F32) - ref).max() / jnp.abs(ref).max())
  plain = err(lambda a, b: layers.conv3d(a, b, 1))
  wino = err(lambda a, b: layers.conv3d_winograd(a, b, 1))
  assert wino < 1.8 * plain, (wino, plain)
  # And its gradients (the stacked form for 3³) in bf16 run.
  g = jax.grad(lambda a, b: jnp.sum(
      layers.conv3d_winograd(a, b, 1).astype(F32) ** 2), argnums=(0, 1))
  gx, gw = jax.jit(g)(xb, wb)
  assert gx.dtype == gw.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["narrow", "taps_small", "up_own_grad"])
def test_own_backwards_run_in_bfloat16(name):
  # XLA's CPU dot thunk has no bf16 x bf16 -> f32 (only its YNNPACK fusions
  # do): the custom backwards accumulate in the input dtype, as autodiff
  # does. Gradients near the float32 ones.
  rng = np.random.default_rng(0)
  fn, xs, ks = {
      "narrow": (lambda x, k: layers.conv3d_im2col_narrow(x, k, 0),
                 (1, 15, 15, 15, 3), (4, 4, 4, 3, 8)),
      "taps_small": (lambda x, k: layers.conv3d_taps(x, k, 0),
                     (1, 14, 14, 14, 64), (2, 2, 2, 64, 16)),
      "up_own_grad": (layers._up_conv_own_grad, (1, 6, 6, 6, 16),
                      (4, 4, 4, 16, 8)),
  }[name]
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  k = jnp.asarray(rng.standard_normal(ks) / np.sqrt(np.prod(ks[:4])), jnp.float32)
  grads = {}
  for dt in (jnp.float32, jnp.bfloat16):
    loss = lambda x, k: jnp.sum(fn(x.astype(dt), k.astype(dt)).astype(jnp.float32) ** 2)
    grads[dt] = jax.jit(jax.grad(loss, (0, 1)))(x, k)
  for a, b in zip(grads[jnp.bfloat16], grads[jnp.float32]):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(jnp.abs(b).max()))


def _conv_count(fn, *args) -> int:
  """The conv_general_dilated equations in ``fn``'s jaxpr, nested ones too
  (traced afresh: make_jaxpr caches traces by function)."""
  from jax.extend.core import jaxprs_in_params

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "conv_general_dilated"
      for sub in jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


def test_skinny_dots_off_the_cpu_rewrite_only_the_skinny_convs(monkeypatch):
  """`layers.SKINNY_DOTS` (a GPU experiment): where the fast forms keep
  lax convs (``use_dots`` false, as on a GPU), True writes the first conv
  (2 input channels) and the 7³ output conv as dots, the same function;
  every other conv stays a lax conv."""
  monkeypatch.setattr(layers, "use_dots", lambda: False)  # as on a GPU
  g = HRGenerator(ngf=8, n_blocks=1, dropout_rate=0.5)
  x = _rand(0, (2, 16, 16, 16, 2))
  v = jax.jit(lambda k: g.init(k, x, train=False))(jax.random.key(0))
  run = lambda v, x: g.apply(v, x, train=False)
  lax_convs = _conv_count(run, v, x)
  want = run(v, x)
  monkeypatch.setattr(layers, "SKINNY_DOTS", True)
  assert layers.skinny_dots()
  assert _conv_count(run, v, x) == lax_convs - 2
  _close(run(v, x), want)
  monkeypatch.setattr(layers, "SKINNY_DOTS", None)  # follows use_dots
  assert not layers.skinny_dots()
  assert _conv_count(run, v, x) == lax_convs


def _conv_input_channels(fn, *args) -> list[int]:
  """The input channels (lhs's last axis) of ``fn``'s lax convs."""
  from jax.extend.core import jaxprs_in_params

  def walk(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out.append(eqn.invars[0].aval.shape[-1])
      for sub in jaxprs_in_params(eqn.params):
        out += walk(sub)
    return out
  return walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


def test_blocked_skinny_convs_off_the_cpu(monkeypatch):
  """`layers.OUT_CONV_BLOCK` / `NARROW_CONV_BLOCK` (a GPU experiment): where
  the skinny convs stay lax convs (off the CPU), the 7³ output conv and the
  first conv (2 channels) become convs over b³ blocks (b³× the input
  channels), the same network function and gradients; `SKINNY_DOTS` goes
  first; "plain" never changes."""
  monkeypatch.setattr(layers, "use_dots", lambda: False)  # as on a GPU
  g = HRGenerator(ngf=8, n_blocks=1, dropout_rate=0.5)
  x = _rand(0, (1, 16, 16, 16, 2))
  v = jax.jit(lambda k: g.init(k, x, train=False))(jax.random.key(0))
  run = lambda v, x: g.apply(v, x, train=False)
  loss = lambda v, x: jnp.sum(run(v, x) ** 2)
  channels = _conv_input_channels(run, v, x)
  assert channels[0] == 2 and channels[-1] == 8  # sketch in, ngf to 1 out
  # Fresh lambdas jitted: each traces with the flags of its call.
  want = jax.jit(lambda v, x: run(v, x))(v, x)
  want_grad = jax.jit(lambda v, x: jax.grad(loss)(v, x))(v, x)
  monkeypatch.setattr(layers, "OUT_CONV_BLOCK", 4)
  monkeypatch.setattr(layers, "NARROW_CONV_BLOCK", 2)
  got = _conv_input_channels(run, v, x)
  assert got[0] == 8 * 2 and got[-1] == 64 * 8 and got[1:-1] == channels[1:-1]
  _close(jax.jit(lambda v, x: run(v, x))(v, x), want)
  # Against the largest gradient: biases before a norm have none but noise.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grad))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-5 * scale),
      jax.jit(lambda v, x: jax.grad(loss)(v, x))(v, x), want_grad)
  monkeypatch.setattr(layers, "SKINNY_DOTS", True)  # the dots go first
  assert len(_conv_input_channels(run, v, x)) == len(channels) - 2
  plain = HRGenerator(ngf=8, n_blocks=1, dropout_rate=0.5, impl="plain")
  monkeypatch.setattr(layers, "SKINNY_DOTS", None)
  assert _conv_input_channels(
      lambda v, x: plain.apply(v, x, train=False), v, x)[-1] == 8
