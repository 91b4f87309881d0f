"""Tiny MEGAN that trains on the embedded MNI152 template in minutes on a CPU.

The template at 2 mm (98×116×94) with two HR scales: LR 32³ (the 25×29×24
scale-0 volume, padded) from 64³ edges, then 16³ patches at 49×58×47 and at
98×116×94 (see ``resample.scale_shapes``). ``demo:smoke`` shrinks it further
for the tests.
"""
from megan_jax.configs import default


# The ``arg``s get_config takes (``--config demo:smoke``).
VARIANTS = ("smoke",)


def get_config(arg=None):
  c = default.get_config()
  c.name = "demo"
  c.steps = 400
  # Tiny networks learn the 2x alignment of the "concat" conditioning
  # slowly; the aligned variant trains in minutes.
  c.hr_condition = "upsampled"
  c.data.path = "mni152"
  c.data.spacing = 2.0
  c.num_hr_scales = 2
  c.lr_size = 32
  c.patch_size = 16
  c.border = 3
  # A demo trains on one volume for minutes and translates another
  # contrast's sketch. Measured (session 9; SSIM of each scale on the
  # T2-like sketch, the HR scales fed the real scale below, 400 steps): the
  # paper's settings left the LR output a blob (0.77) and the HR scales
  # blocky with seams (0.65, 0.61; trilinear upsampling of the real scale
  # below scores 0.80, 0.85; `launch/demo_ablation.py`): dropout 0.5 and Adam 2e-4 learn too slowly
  # here, the sketch's exact weights do not carry over to another contrast,
  # and tiny HR generators with instance norm lose each patch's mean. These
  # four fields (the last two our options) took them to 0.96, 0.84, 0.87,
  # and the whole `megan demo` from SSIM 0.32 to 0.60 (README).
  c.optim.lr = 1e-3
  c.model.dropout = 0.0
  c.augment.edge_gain = 1.0
  c.model.hr_residual = True
  c.model.lr_generator = "unet"
  c.model.unet_levels = 3
  c.model.ngf = 8
  c.model.n_blocks = 2
  c.model.ndf = 8
  c.model.d_layers = 2  # a 16³ patch is too small for 3 stride-2 layers
  # The public code's discriminator outputs (one logit per HR patch, the LR
  # scale's last features): the paper's PatchGAN maps (the default) scored
  # SSIM 0.553 / PSNR 16.87 against 0.600 / 17.34 here (`megan demo`, one
  # run each, session 21), and every committed demo result used these.
  c.model.d_output = "code"
  c.train.hr_batch_size = 8
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.train.montage_every = 100
  c.train.val_patches = 8
  c.infer.batch_size = 16
  if arg == "smoke":  # for tests: a few steps, 4 mm, smallest widths
    c.steps = 4
    c.data.spacing = 4.0  # 49x58x47: scales 13x15x12, 25x29x24, 49x58x47
    c.lr_size = 16
    c.model.ngf = 4
    c.model.ndf = 4
    c.model.n_blocks = 1
    c.train.hr_batch_size = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 2
    c.train.montage_every = 2
    c.train.val_patches = 2
  return c
