"""PyTorch port (NCDHW) of the MEGAN networks, for side-by-side benchmarks.

Mirrors `megan_jax.models` layer for layer, so a Flax variables dict can be
copied in (`load_flax_params`) and both frameworks run the same weights:

- `ResNetGenerator`: ``n_pre_down=0`` is `megan_jax.models.HRGenerator`,
  ``n_pre_down=1`` `megan_jax.models.LRResNetGenerator`.
- `PatchDiscriminator`: `megan_jax.models.PatchDiscriminator`, kinds
  ``"hr"`` and ``"lr"``, instance or (batch-statistics) batch norm.
- `make_train_step`: one pix2pix update (D, then G) with BCE + L1 and Adam,
  the structure of `megan_jax.train.train_step` (without its D-skip threshold
  and augmentation).

Every submodule carries the Flax module's name (``block_0.conv_1`` here is
``params["block_0"]["conv_1"]`` there), which is all the weight mapping
needs. Layouts: ``Conv3d.weight [C_out, C_in, k, k, k]`` is the Flax
``kernel.transpose(4, 3, 0, 1, 2)``; ``ConvTranspose3d.weight [C_in, C_out, k,
k, k]`` is ``kernel.transpose(3, 4, 0, 1, 2)`` (no flip: `layers.UpConv` has
PyTorch's semantics); norms' ``weight``/``bias`` are Flax's
``scale``/``bias``.

This module imports torch at the top: import it only where torch is installed
(the ``bench`` extra); the library itself never does.
"""
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("hr", "lr")
NORMS = ("instance", "batch")


# ---------------------------------------------------------------------------
# Layers.


def _instance_norm(c: int) -> nn.Module:
  # Affine, eps 1e-5, biased variance, no running statistics: `InstanceNorm`.
  return nn.InstanceNorm3d(c, eps=1e-5, affine=True, track_running_stats=False)


def _norm(kind: str, c: int) -> nn.Module:
  if kind == "instance":
    return _instance_norm(c)
  if kind == "batch":
    # Without running statistics BatchNorm3d uses the batch's statistics in
    # train and eval mode alike, as the stateless Flax `BatchNorm`.
    return nn.BatchNorm3d(c, eps=1e-5, affine=True, track_running_stats=False)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ResNetBlock(nn.Module):
  """conv 3³, IN, ReLU, dropout, conv 3³, IN, + x; ``[B, C, D, H, W]`` kept."""

  def __init__(self, channels: int, dropout_rate: float = 0.5):
    super().__init__()
    self.conv_0 = nn.Conv3d(channels, channels, 3, padding=1)
    self.norm_0 = _instance_norm(channels)
    # Elementwise, as flax.linen.Dropout (not Dropout3d's whole channels).
    self.dropout = nn.Dropout(dropout_rate) if dropout_rate else None
    self.conv_1 = nn.Conv3d(channels, channels, 3, padding=1)
    self.norm_1 = _instance_norm(channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.norm_0(self.conv_0(x)))
    if self.dropout is not None:
      y = self.dropout(y)
    return x + self.norm_1(self.conv_1(y))


class ResNetGenerator(nn.Module):
  """The MEGAN ResNet generator, output at ``2**-n_pre_down`` × the input size.

  conv 3³ C_in→ngf, IN, ReLU; ``n_pre_down`` × [conv 4³ s2 p1 ngf→ngf, IN,
  ReLU]; 2 × [conv 4³ s2 p1, IN, ReLU] ngf→2ngf→4ngf; ``n_blocks``
  `ResNetBlock`\\ s at 4ngf; 2 × [transposed conv 4³ s2 p1, IN, ReLU]
  4ngf→2ngf→ngf; conv 7³ p3 ngf→out_channels; tanh. Zero padding; every conv
  has a bias. D, H, W must be divisible by ``2**(2 + n_pre_down)``.

  Args:
    in_channels: input channels (2 for the HR generator: previous-scale
      patch and edges; 1 for the LR one: the sketch).
    ngf: channels after the first conv.
    n_blocks: ResNet blocks.
    n_pre_down: 0 (`megan_jax.models.HRGenerator`) or 1
      (`megan_jax.models.LRResNetGenerator`).
    out_channels: output channels.
    dropout_rate: dropout in the blocks (active in ``.train()`` mode only).
  """

  def __init__(self, in_channels: int = 2, ngf: int = 64, n_blocks: int = 6,
               n_pre_down: int = 0, out_channels: int = 1,
               dropout_rate: float = 0.5):
    super().__init__()
    for name, value in (("in_channels", in_channels), ("ngf", ngf),
                        ("out_channels", out_channels)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if n_blocks < 0 or n_pre_down < 0:
      raise ValueError(
          f"n_blocks and n_pre_down must be >= 0, got {n_blocks}, {n_pre_down}")
    self.n_pre_down = n_pre_down
    self.n_blocks = n_blocks
    self.conv_in = nn.Conv3d(in_channels, ngf, 3, padding=1)
    self.norm_in = _instance_norm(ngf)
    for i in range(n_pre_down):
      setattr(self, f"pre_down_{i}", nn.Conv3d(ngf, ngf, 4, stride=2,
                                               padding=1))
      setattr(self, f"pre_down_norm_{i}", _instance_norm(ngf))
    for i in range(2):
      c_in, c_out = ngf * 2**i, ngf * 2**(i + 1)
      setattr(self, f"down_{i}", nn.Conv3d(c_in, c_out, 4, stride=2,
                                           padding=1))
      setattr(self, f"down_norm_{i}", _instance_norm(c_out))
    for i in range(n_blocks):
      setattr(self, f"block_{i}", ResNetBlock(4 * ngf, dropout_rate))
    for i in range(2):
      c_in, c_out = ngf * 2**(2 - i), ngf * 2**(1 - i)
      setattr(self, f"up_{i}", nn.ConvTranspose3d(c_in, c_out, 4, stride=2,
                                                  padding=1))
      setattr(self, f"up_norm_{i}", _instance_norm(c_out))
    self.conv_out = nn.Conv3d(ngf, out_channels, 7, padding=3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """``[B, C_in, D, H, W]`` -> ``[B, out_channels, D', H', W']`` (tanh)."""
    factor = 2**(2 + self.n_pre_down)
    if x.ndim != 5 or any(n % factor for n in x.shape[2:]):
      raise ValueError(
          f"ResNetGenerator: expected [B, C, D, H, W] with D, H, W divisible "
          f"by {factor}, got {tuple(x.shape)}")
    x = F.relu(self.norm_in(self.conv_in(x)))
    for i in range(self.n_pre_down):
      x = F.relu(getattr(self, f"pre_down_norm_{i}")(
          getattr(self, f"pre_down_{i}")(x)))
    for i in range(2):
      x = F.relu(getattr(self, f"down_norm_{i}")(getattr(self, f"down_{i}")(x)))
    for i in range(self.n_blocks):
      x = getattr(self, f"block_{i}")(x)
    for i in range(2):
      x = F.relu(getattr(self, f"up_norm_{i}")(getattr(self, f"up_{i}")(x)))
    return torch.tanh(self.conv_out(x))


class PatchDiscriminator(nn.Module):
  """PatchGAN as `megan_jax.models.PatchDiscriminator`; returns the logits only.

  ``kind="hr"``: ``forward(x)``, x ``[B, C, p, p, p]`` (edges, previous-scale
  patch, patch concatenated; ``C = in_channels``): conv 4³ s1 p0 C→ndf,
  LReLU 0.2; ``n_layers - 1`` × [conv 4³ s2 p0 to ``ndf·min(2**n, 8)``, norm,
  LReLU 0.2]; conv 4³ s2 p0 →1. Logits ``[B, 1, p', p', p']`` (1³ at p 32).

  ``kind="lr"``: ``forward(edges, image)``, edges ``[B, C_e, 2L, 2L, 2L]``,
  image ``[B, in_channels - C_e, L, L, L]``: conv 3³ s2 p1 C_e→C_e on the
  sketch (all its channels), concatenated with the image (sketch first); conv
  4³ s2 p1 →ndf, LReLU 0.2; ``n_layers - 1`` × [conv 4³ s2 p1, norm, LReLU
  0.2]; no final conv: logits ``[B, ndf·min(2**(n_layers-1), 8),
  L/2**n_layers, ...]`` after the last LeakyReLU.

  Args:
    kind: ``"hr"`` or ``"lr"``.
    in_channels: channels entering the first of the main convs: for
      ``"hr"`` the input's channels (3 in MEGAN), for ``"lr"`` edge plus
      image channels (2 in MEGAN).
    ndf: channels of the first conv.
    n_layers: the first conv plus ``n_layers - 1`` normalised stride-2 convs.
    norm: ``"instance"`` or ``"batch"`` (batch statistics in train and eval
      mode, like the Flax module).
    edge_channels: ``"lr"`` only: the sketch's channels C_e (default 1).
  """

  def __init__(self, kind: str = "hr", in_channels: int = 3, ndf: int = 64,
               n_layers: int = 3, norm: str = "instance", *,
               edge_channels: int = 1):
    super().__init__()
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if kind == "lr" and not 1 <= edge_channels < in_channels:
      raise ValueError(
          f"PatchDiscriminator(kind='lr'): in_channels ({in_channels}) counts "
          f"edge ({edge_channels}) plus image channels; need 1 <= "
          "edge_channels < in_channels")
    self.kind = kind
    self.n_layers = n_layers
    self.edge_channels = edge_channels
    self.in_channels = in_channels
    if kind == "hr":
      self.conv_0 = nn.Conv3d(in_channels, ndf, 4, padding=0)
      padding = 0
    else:
      self.sketch_down = nn.Conv3d(edge_channels, edge_channels, 3, stride=2,
                                   padding=1)
      self.conv_0 = nn.Conv3d(in_channels, ndf, 4, stride=2, padding=1)
      padding = 1
    c = ndf
    for n in range(1, n_layers):
      c_out = ndf * min(2**n, 8)
      setattr(self, f"conv_{n}", nn.Conv3d(c, c_out, 4, stride=2,
                                           padding=padding))
      setattr(self, f"norm_{n}", _norm(norm, c_out))
      c = c_out
    if kind == "hr":
      self.conv_out = nn.Conv3d(c, 1, 4, stride=2, padding=0)

  def forward(self, x: torch.Tensor,
              image: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``forward(x)`` (hr) or ``forward(edges, image)`` (lr)."""
    if self.kind == "hr":
      if image is not None or x.ndim != 5 or x.shape[1] != self.in_channels:
        raise ValueError(
            "PatchDiscriminator(kind='hr'): expected one [B, "
            f"{self.in_channels}, p, p, p] tensor, got {tuple(x.shape)}"
            + ("" if image is None else f" and {tuple(image.shape)}"))
      x = self.conv_0(x)
    else:
      if image is None:
        raise ValueError(
            "PatchDiscriminator(kind='lr'): call forward(edges, image)")
      edges = x
      if (edges.ndim != 5 or image.ndim != 5
          or edges.shape[1] != self.edge_channels
          or image.shape[1] != self.in_channels - self.edge_channels
          or tuple(edges.shape[2:]) != tuple(2 * n for n in image.shape[2:])):
        raise ValueError(
            "PatchDiscriminator(kind='lr'): expected edges [B, "
            f"{self.edge_channels}, 2L, 2L, 2L] and image [B, "
            f"{self.in_channels - self.edge_channels}, L, L, L], got "
            f"{tuple(edges.shape)} and {tuple(image.shape)}")
      x = torch.cat([self.sketch_down(edges), image], dim=1)
      x = self.conv_0(x)
    x = F.leaky_relu(x, 0.2)
    for n in range(1, self.n_layers):
      x = getattr(self, f"norm_{n}")(getattr(self, f"conv_{n}")(x))
      x = F.leaky_relu(x, 0.2)
    if self.kind == "hr":
      x = self.conv_out(x)
    return x


# ---------------------------------------------------------------------------
# Weights and layouts.


def _flax_leaves(tree: Mapping, prefix: tuple = ()) -> dict:
  """``{("a", "b", "kernel"): array}`` for a nested mapping of arrays."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flax_leaves(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _torch_layout(module: nn.Module, flax_name: str,
                  value: np.ndarray) -> np.ndarray:
  """A Flax leaf in the layout of the torch parameter it feeds."""
  if flax_name == "kernel" and value.ndim == 5:
    # [k, k, k, in, out] -> [in, out, k, k, k] resp. [out, in, k, k, k].
    if isinstance(module, nn.ConvTranspose3d):
      return value.transpose(3, 4, 0, 1, 2)
    return value.transpose(4, 3, 0, 1, 2)
  return value


# (torch parameter, Flax leaf) names per layer type.
_CONV_NAMES = (("weight", "kernel"), ("bias", "bias"))
_NORM_NAMES = (("weight", "scale"), ("bias", "bias"))


def load_flax_params(module: nn.Module, variables: Mapping) -> nn.Module:
  """Copies Flax parameters into a torch module of the same layers, in place.

  Each conv / norm submodule ``a.b`` takes ``variables["params"]["a"]["b"]``
  (``kernel``, ``bias`` or ``scale``, ``bias``), converted to PyTorch's
  layout and to the torch parameter's dtype and device.

  Args:
    module: a `ResNetGenerator` or `PatchDiscriminator` (or any module built
      from ``Conv3d``, ``ConvTranspose3d``, ``InstanceNorm3d`` and
      ``BatchNorm3d`` named as the Flax modules).
    variables: ``{"params": ...}`` as returned by the Flax model's ``init``
      (jax or numpy leaves).

  Returns:
    ``module``, its parameters overwritten.

  Raises:
    ValueError: a collection other than ``params``, a Flax leaf missing or
      left over, a torch parameter not covered, or a shape mismatch. Nothing
      is copied unless everything matches.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    got = (f"keys {list(variables)}" if isinstance(variables, Mapping) else
           type(variables).__name__)
    raise ValueError(
        "load_flax_params: expected a Flax variables dict {'params': ...}, got "
        f"{got}")
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(
        f"load_flax_params: unexpected variable collections {extra} (the "
        "MEGAN networks have only 'params')")
  leaves = _flax_leaves(variables["params"])
  used = set()
  copies = []  # (torch parameter, converted array), applied once all match
  covered = set()
  for name, sub in module.named_modules():
    if isinstance(sub, (nn.Conv3d, nn.ConvTranspose3d)):
      pairs = _CONV_NAMES
    elif isinstance(sub, (nn.InstanceNorm3d, nn.BatchNorm3d)):
      pairs = _NORM_NAMES
    else:
      continue
    path = tuple(name.split(".")) if name else ()
    for torch_name, flax_name in pairs:
      param = getattr(sub, torch_name, None)
      key = path + (flax_name,)
      where = "/".join(key)
      if param is None:
        raise ValueError(
            f"load_flax_params: torch module {name!r} has no {torch_name!r} "
            f"(a conv without bias or a norm without affine?) but Flax "
            f"{where} is expected")
      if key not in leaves:
        raise ValueError(
            f"load_flax_params: Flax params have no {where} for torch "
            f"{name}.{torch_name} {tuple(param.shape)}")
      value = _torch_layout(sub, flax_name, np.asarray(leaves[key]))
      if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"load_flax_params: Flax {where} {tuple(leaves[key].shape)} gives "
            f"{tuple(value.shape)} in torch layout, but torch "
            f"{name}.{torch_name} is {tuple(param.shape)}")
      used.add(key)
      covered.add(id(param))
      copies.append((param, value))
  unused = sorted("/".join(k) for k in set(leaves) - used)
  if unused:
    raise ValueError(
        f"load_flax_params: Flax params not matched by the torch module: "
        f"{unused}")
  uncovered = [n for n, p in module.named_parameters() if id(p) not in covered]
  if uncovered:
    raise ValueError(
        f"load_flax_params: torch parameters with no Flax counterpart: "
        f"{uncovered}")
  with torch.no_grad():
    for param, value in copies:
      param.copy_(torch.as_tensor(np.ascontiguousarray(value),
                                  dtype=param.dtype, device=param.device))
  return module


def to_torch(x: Any, device: Any = None) -> torch.Tensor:
  """``[B, D, H, W, C]`` numpy/jax -> float32 ``[B, C, D, H, W]`` tensor."""
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 5:
    raise ValueError(f"to_torch: expected [B, D, H, W, C], got {x.shape}")
  t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
  return t if device is None else t.to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  """``[B, C, D, H, W]`` tensor -> float32 ``[B, D, H, W, C]`` numpy array."""
  if t.ndim != 5:
    raise ValueError(f"to_numpy: expected [B, C, D, H, W], got "
                     f"{tuple(t.shape)}")
  return t.detach().to("cpu", torch.float32).permute(0, 2, 3, 4, 1).numpy()


def count_params(module: nn.Module) -> int:
  """Number of parameters (elements) of a torch module."""
  return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# Training step.

_BATCH_KEYS = {"hr": ("prev", "edges", "target"), "lr": ("edges", "target")}


def make_train_step(g: nn.Module, d: nn.Module, kind: str = "hr",
                    l1_weight: float = 10.0, lr: float = 2e-4,
                    betas: Sequence[float] = (0.5, 0.999)
                    ) -> Callable[[Mapping[str, torch.Tensor]], dict]:
  """A pix2pix update of D, then G, as `megan_jax.train.train_step`.

  G runs once (dropout on); D's loss is ``0.5 · (BCE(D(real), 1) +
  BCE(D(fake.detach()), 0))``; after D's Adam step G's loss is
  ``BCE(D(fake), 1) + l1_weight · mean|fake - target|`` with the updated D,
  back-propagated through the same G forward. The JAX step's D-skip threshold
  and input augmentation are left out. Each optimiser is Adam (eps 1e-8, as
  optax's), created here.

  Args:
    g: the generator (`ResNetGenerator`).
    d: the discriminator (`PatchDiscriminator` of the same ``kind``).
    kind: ``"hr"``: G sees cat(prev, edges), D cat(edges, prev, image) on
      channels; ``"lr"``: G sees edges, D ``(edges, image)``.
    l1_weight: weight of the L1 term.
    lr, betas: Adam's.

  Returns:
    ``step(batch) -> {"d_loss", "d_real", "d_fake", "g_loss", "g_gan",
    "g_l1"}`` (python floats; reading them waits for the device). ``batch``:
    NCDHW tensors on the modules' device, ``{"prev", "edges", "target"}`` for
    ``"hr"`` (all ``[B, 1, p, p, p]``), ``{"edges" [B, C, 2L, 2L, 2L],
    "target" [B, 1, L, L, L]}`` for ``"lr"``.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  g_opt = torch.optim.Adam(g.parameters(), lr=lr, betas=tuple(betas), eps=1e-8)
  d_opt = torch.optim.Adam(d.parameters(), lr=lr, betas=tuple(betas), eps=1e-8)

  def set_d_grad(flag: bool) -> None:
    for p in d.parameters():
      p.requires_grad_(flag)

  def step(batch: Mapping[str, torch.Tensor]) -> dict:
    missing = [k for k in _BATCH_KEYS[kind] if k not in batch]
    if missing:
      raise ValueError(f"train step ({kind}): batch lacks {missing}; has "
                       f"{sorted(batch)}")
    edges, real = batch["edges"], batch["target"]
    if kind == "hr":
      prev = batch["prev"]
      x = torch.cat([prev, edges], dim=1)
      d_fn = lambda image: d(torch.cat([edges, prev, image], dim=1))
    else:
      x = edges
      d_fn = lambda image: d(edges, image)
    g.train()
    d.train()
    fake = g(x)

    set_d_grad(True)
    d_opt.zero_grad(set_to_none=True)
    real_logits = d_fn(real)
    fake_logits = d_fn(fake.detach())
    d_real = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits))
    d_fake = F.binary_cross_entropy_with_logits(
        fake_logits, torch.zeros_like(fake_logits))
    d_loss = 0.5 * (d_real + d_fake)
    d_loss.backward()
    d_opt.step()

    # G's backward goes through D without accumulating D gradients.
    set_d_grad(False)
    g_opt.zero_grad(set_to_none=True)
    fake_logits = d_fn(fake)
    g_gan = F.binary_cross_entropy_with_logits(
        fake_logits, torch.ones_like(fake_logits))
    g_l1 = torch.mean(torch.abs(fake - real))
    g_loss = g_gan + l1_weight * g_l1
    g_loss.backward()
    g_opt.step()
    set_d_grad(True)

    values = {"d_loss": d_loss, "d_real": d_real, "d_fake": d_fake,
              "g_loss": g_loss, "g_gan": g_gan, "g_l1": g_l1}
    return {k: float(v.detach()) for k, v in values.items()}

  return step
