"""The paper's MEGAN at full size: LR 64³ from 128³ edges, HR patches of 32³.

Where the paper and the public PyTorch code differ, the paper's choice is the
default and the code's a value of the same field (comments say which).
Override any field from the command line: ``--config.model.ngf=32``.
Two keys are fixed for scripts: ``steps`` (training steps per scale) and
``seed``.
"""
import ml_collections


# The ``arg``s get_config takes: none (``--config NAME:ARG`` is refused).
VARIANTS = ()


def get_config(arg=None):
  """Returns the default config; ``arg`` is unused (variants take theirs)."""
  del arg
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  c.steps = 20000  # training steps per scale

  # Data: a folder or a list file of target-domain NIfTI volumes
  # ("mni152" = the embedded template), optional label masks beside them.
  c.data = ml_collections.ConfigDict()
  c.data.path = "mni152"
  c.data.val_path = ""  # "" = validate on the training volumes
  c.data.label_suffix = ""  # e.g. "_seg": x.nii.gz -> x_seg.nii.gz as label
  # Voxel axes turned to this orientation first (permute and flip, no
  # interpolation: megan_jax.grid), so anatomy lies the same way in every
  # volume; "" = keep each file's own voxel order.
  c.data.orientation = "RAS"
  c.data.spacing = 0.0  # resample to this isotropic mm first; 0 = keep
  c.data.percentiles = (0.0, 99.5)  # intensity clipping to [-1, 1]
  c.data.window = ()  # (lo, hi), e.g. HU for CT; overrides percentiles
  c.data.foreground = -0.95  # voxels above this (in [-1, 1]) are foreground
  # HR patches are centred on foreground voxels (the paper), except this
  # fraction, centred anywhere, so empty background is seen too (our choice).
  c.data.uniform_patch_fraction = 0.2

  # Geometry of the cascade.
  c.num_hr_scales = 2
  c.lr_size = 64  # LR volume side; its edge input is 2 * lr_size
  c.patch_size = 32
  c.border = 6  # trimmed per side when stitching: the kept centre is 20³
  c.hr_condition = "concat"  # "concat" (the code) | "upsampled" (aligned) | "none" (edges only: the patch-wise GAN baseline)

  c.edges = ml_collections.ConfigDict()
  c.edges.sigma = 1.0
  c.edges.low = 0.1
  c.edges.high = 0.2
  c.edges.use_label = False  # write the label mask onto the sketch

  c.model = ml_collections.ConfigDict()
  c.model.lr_generator = "unet"  # "unet" (paper) | "resnet" (code)
  c.model.unet_levels = 5  # 128³ in -> 4³ x 512 at the bottleneck
  c.model.ngf = 64
  c.model.n_blocks = 6
  c.model.ndf = 64
  c.model.d_layers = 3
  c.model.d_norm = "instance"  # "instance" (paper) | "batch" (code)
  # "map": a 1-channel map of patch logits (paper, pix2pix's PatchGAN) |
  # "code": one logit per HR patch, the LR scale's last features as logits
  c.model.d_output = "map"
  c.model.dropout = 0.5
  c.model.dtype = "float32"  # compute dtype; parameters stay float32
  c.model.impl = "fast"  # "fast" (XLA-friendly forms) | "plain"
  # Our option, not the paper's: HR output = the previous patch's centre
  # (trilinearly upsampled) + the generator's output (`state.generator_output`).
  c.model.hr_residual = False

  c.loss = ml_collections.ConfigDict()
  c.loss.gan = "bce"  # "bce": log-likelihood (paper) | "lsgan" (code)
  c.loss.l1_weight = 10.0
  c.loss.gan_weight = 1.0  # 0 = L1 only (a sanity check, not MEGAN)
  c.loss.d_skip_accuracy = 0.8  # skip D's update above this accuracy; 0 = never

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.999
  c.optim.decay = "none"  # "none" | "linear" (to 0 over the second half)

  c.augment = ml_collections.ConfigDict()
  c.augment.prev_noise_std = 0.05  # not in the paper: our choice
  c.augment.blur_prob = 0.3
  c.augment.halfres_prob = 0.2
  c.augment.edge_noise_std = 0.01
  # Our option, not in the paper (0 = off): each edge voxel's weight is
  # multiplied by a factor drawn from [1 - gain, 1 + gain] per step, so the
  # networks read where edges are more than their exact gradient weights,
  # which another domain's sketch does not share (`augment.augment_edges`).
  c.augment.edge_gain = 0.0
  c.augment.label_scale = 0.15
  c.augment.label_mirror = True

  c.train = ml_collections.ConfigDict()
  c.train.lr_batch_size = 1
  # Patches per HR step (the code takes all from one volume; here each
  # patch draws its volume).
  c.train.hr_batch_size = 20
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.eval_every = 1000
  c.train.montage_every = 500
  c.train.val_patches = 32

  c.infer = ml_collections.ConfigDict()
  c.infer.batch_size = 8
  c.infer.memmap_bytes = 2 ** 31  # larger outputs are memory-mapped on disk
  # Make the sketches of scales 2..n on a second thread while the coarser
  # scales are generated (same output; hides edge time on a GPU).
  c.infer.overlap_edges = True
  return c
