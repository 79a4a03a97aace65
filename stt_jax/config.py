"""Default configuration and its validation.

Config files under `configs/` start from `default_config()` and change what
their data set needs. `validate` turns a bad value into a one-line UserError
that names the key.
"""

from __future__ import annotations

import importlib.util
import math
import re

import jax
import ml_collections

from stt_jax.errors import UserError

# the probability of each augmentation in data.augment (flips/transpose aside)
AUGMENT_PROBABILITIES = ("intensity_prob", "rescale_prob", "rotate_prob", "elastic_prob",
                         "misalignment_prob", "missing_section_prob", "motion_blur_prob",
                         "cut_blur_prob", "cut_noise_prob")

MODES = ("train", "evaluate", "segment", "decode", "export", "convert")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # How this run uses its machine (stt_jax/backend.py); none of it changes
  # the model, so a run may resume under other values.
  c.backend = ml_collections.ConfigDict()
  c.backend.platform = "auto"          # auto | cpu | cuda | rocm | gpu | tpu
  c.backend.xla_flags = ""             # added to XLA_FLAGS (after per-backend defaults)
  c.backend.matmul_precision = "default"   # default | high | highest (float32 matmuls)
  # glibc malloc arenas (0: glibc's default, 8 per core); MALLOC_ARENA_MAX wins
  c.backend.heap_arenas = 2
  # compiled programs kept on disk for the next run of the same program
  # (resume, evaluate, segment): auto = $JAX_COMPILATION_CACHE_DIR if set,
  # else ~/.cache/stt_jax/xla/<this CPU>; off; or a folder. Bounded to
  # compilation_cache_gb, least recently used evicted first.
  c.backend.compilation_cache = "auto"
  c.backend.compilation_cache_gb = 4.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "res_unet"
  c.model.widths = (28, 36, 48, 64, 80)
  c.model.downsample_z = (False, False, False, False)
  c.model.conv_impl = "auto"           # auto | native | depth_as_batch | im2col
  # auto: bfloat16 on GPU/TPU, float32 on CPU (parameters and optimiser
  # state stay float32 either way)
  c.model.compute_dtype = "auto"       # auto | float32 | bfloat16
  # output channels: mask and contour (decoded by the seeded watershed), and
  # optionally "distance", a normalised distance transform per instance
  # (regressed; written to probabilities.zarr as a third channel)
  c.model.outputs = ("mask", "contour")
  # after every conv but the head, before its ELU: none (the original
  # Res-UNET-R) | group (GroupNorm over each patch: converges several times
  # faster on VNC III); docs/architecture.md "Normalisation"
  c.model.norm = "none"
  c.model.norm_groups = 4              # groups of "group"; must divide every width
  # (z, y, x) binning of the image the model reads: (1, 2, 2) trains on 2x2
  # means (labels: each box's most frequent id) and predicts on them, its
  # probabilities brought back to the input's voxels (linear) before
  # decoding: outputs, scores and decode.* stay at the input's resolution,
  # data.patch_shape and infer.* count binned voxels. For 4-5 nm data (VNC
  # III, Lucchi) with a network sized for 8 nm; README "Binned input"
  c.model.input_scale = (1, 1, 1)
  # STT-UNET parts (paper Tables 3-5); design "none" is the baseline.
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.design = "none"    # none | split | spatial_then_temporal | temporal_then_spatial
  c.model.attention.fusion = "deform"  # add | concat | deform (split design only)
  c.model.attention.heads = 4
  c.model.attention.kv_grid = 16       # spatial keys/values pooled to <= kv_grid^2 per slice
  c.model.attention.encoder_levels = (1, 2, 3, 4)
  c.model.attention.decoder_levels = (3, 2, 1)
  c.model.attention.deform_groups = 4
  c.model.attention.deform_modulation = False   # eq. 3 has none
  # the order the deformable fusion's gradient scatter-adds its samples in:
  # scatter (as sampled, pixel-major) | sorted (by the pixel read: fewer
  # atomics, for a sort) | tap_major (tap by tap: fewer adds to one row at a
  # time). Same values; a speed choice for GPUs (bench/deform_impl.py)
  c.model.attention.deform_gradient = "scatter"
  # auto = xla off CPUs (measured on an H100: cudnn no faster here, gradients
  # disagree); on CPUs unrolled up to 8 keys (one key at a time, no matrix
  # product: the binned VNC III STT-UNET's 4-section temporal streams; its
  # train step 1.04-1.17x faster), heads_major beyond (XLA's einsums heads
  # first: 1.9x faster there; models/attention.py); pallas: the fused
  # spatial stream
  c.model.attention.implementation = "auto"     # auto | xla | heads_major | unrolled | cudnn | pallas
  # the temporal stream's (32 keys per pixel column): auto = implementation's,
  # but XLA's when that is pallas (a speed choice: bench/gpu_compile.py)
  c.model.attention.temporal_implementation = "auto"   # auto | xla | heads_major | unrolled | cudnn | pallas
  # > 1: each SST block runs its streams in this many sequential pieces, each
  # recomputed in the backward pass (less memory, same function and parameters)
  c.model.attention.chunks = 1
  c.model.denoise = ml_collections.ConfigDict()
  c.model.denoise.enabled = False
  c.model.denoise.kernel_size = 5        # per-pixel kernels k x k on each adjacent slice
  c.model.denoise.features = 16          # width of the kernel-predicting CNN
  # FG-BG discriminator (built only when loss.adversarial_weight > 0).
  c.model.discriminator = ml_collections.ConfigDict()
  c.model.discriminator.features = (32, 64)   # the two stride-2 3D convs

  c.data = ml_collections.ConfigDict()
  # image/label: any format of stt_jax.data.sources (zarr, N5, precomputed, TIFF
  # stack, PNG/TIFF slice folder, file.h5:dataset); region: ((z0, y0, x0),
  # (z1, y1, x1)) of the volume to use, () = all of it
  c.data.train = ml_collections.ConfigDict({"image": "", "label": "", "region": ()})
  c.data.val = ml_collections.ConfigDict({"image": "", "label": "", "region": ()})
  # more labelled volumes to draw training patches from (labs annotate several
  # cubes): ((image, label), ...) or ((image, label, region), ...), checked
  # like data.train; a patch comes from each volume in proportion to its voxels
  c.data.train.more_volumes = ()
  # more labelled volumes to validate on, same form; scored with data.val as
  # one set (AP over all their instances, Jaccard over all their voxels),
  # each volume's own scores beside
  c.data.val.more_volumes = ()
  # image voxels (z, y, x) read beyond each face of data.val.region (cut at
  # the volume's end) so that validation windows see the real neighbouring
  # tissue; predicted, then cropped: only the region is scored
  c.data.val.context = (0, 0, 0)
  c.data.voxel_size_nm = (30.0, 8.0, 8.0)
  # instances: label volumes hold instance ids; mask: binary masks, voxels >=
  # mask_threshold are foreground and 3D connected components are instances
  c.data.label_kind = "instances"      # instances | mask
  # partly annotated labels: voxels of this id are "not annotated" (neither
  # object nor background): the losses skip them, validation scores around
  # them; -1 = every voxel is annotated
  c.data.unlabelled_id = -1
  c.data.mask_threshold = 128
  c.data.patch_shape = (32, 320, 320)
  c.data.contour_width = 2
  c.data.foreground_bias = 0.0         # share of patches redrawn until they hold foreground
  c.data.prefetch = 4                  # batches ready ahead (at least `workers`)
  # threads assembling batches (read, augment, targets); 0 = one per core this
  # process may use, at least 2. Two starved an H100: 3.7 steps/s of VNC III
  # batches while the model alone ran several times faster
  c.data.workers = 0
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.flip_z = True
  c.data.augment.flip_yx = True
  c.data.augment.transpose_xy = True
  c.data.augment.intensity_prob = 0.75
  # the rest of the pytorch_connectomics set; flips/transpose already give rot90
  c.data.augment.rescale_prob = 0.5
  c.data.augment.rescale_range = (0.8, 1.2)
  # any-angle in-plane rotation (the reference's p is 0.5); off until a GPU
  # A/B shows it pays: it widens each read from 344^2 to 476^2 at 256^2
  c.data.augment.rotate_prob = 0.0
  c.data.augment.elastic_prob = 0.5
  c.data.augment.elastic_alpha = 16.0      # pixels
  c.data.augment.elastic_sigma = 4.0       # pixels
  c.data.augment.misalignment_prob = 0.5
  c.data.augment.misalignment_max_shift = 8
  c.data.augment.missing_section_prob = 0.5
  c.data.augment.motion_blur_prob = 0.5
  c.data.augment.cut_blur_prob = 0.5
  c.data.augment.cut_noise_prob = 0.5
  # Synthetic EM volumes (stt_jax.data.synthetic) written under the workdir.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.enabled = False
  c.data.synthetic.train_seed = 0
  c.data.synthetic.val_seed = 1
  c.data.synthetic.train_shape = (32, 256, 256)
  c.data.synthetic.val_shape = (32, 192, 192)
  c.data.synthetic.anisotropy = 4.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200_000
  c.train.batch_size = 2
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 1000
  c.train.schedule = "constant"        # constant | cosine | linear (decay to 1% by the last step)
  c.train.weight_decay = 1e-4
  # generator modules left out of that L2 (name prefixes: ("sst", "denoise")
  # for STT-UNET's blocks, which it otherwise switches off; README "Binned input")
  c.train.weight_decay_exempt = ()
  c.train.grad_clip_norm = 0.0         # global-norm clipping; 0 = off (the original has none)
  c.train.disc_learning_rate = 1e-4    # discriminator's Adam, same schedule
  c.train.ema_decay = 0.0              # EMA of generator weights (e.g. 0.999); 0 = off
  # start from another model's weights: an export or a run folder (its best
  # state, else its latest); parameters of the same path and shape are copied,
  # the rest (e.g. a baseline's missing SST blocks) start fresh. "" = none
  c.train.init_from = ""
  c.train.model_parallel = 1           # devices per parameter shard (mesh axis "model")
  c.train.log_every = 50
  c.train.checkpoint_every = 1500
  # and whenever this many minutes passed since the last save (0 = off): what
  # a kill without a signal (the OOM killer, a lost node) can cost at most
  c.train.checkpoint_minutes = 30.0
  c.train.keep_checkpoints = 3
  c.train.eval_every = 0               # segment data.val every N steps; 0 = only at the end
  c.train.best_metric = "ap_75"        # keeps the best state by this in <workdir>/best

  c.loss = ml_collections.ConfigDict()
  c.loss.bce_weight = 1.0
  c.loss.dice_weight = 1.0
  # the original's per-sample class weights in the BCE (positives x (1-f)/f):
  # recall first, so its maps over-cover at 0.5 and are decoded at 0.85-0.9;
  # False = plain BCE, whose p estimates the posterior (semantic p > 0.5 protocols)
  c.loss.class_balance = True
  c.loss.distance_weight = 1.0         # MSE of the distance channel, when model.outputs has it
  # FG-BG adversarial loss (eq. 4): L = L_sup + adversarial_weight * L_fg-bg.
  c.loss.adversarial_weight = 0.0      # the paper's lambda = 0.5 when on
  c.loss.adversarial_lambda1 = 1.0
  c.loss.adversarial_form = "non_saturating"   # non_saturating | minimax (G's side of eq. 4)

  c.infer = ml_collections.ConfigDict()
  c.infer.window = (32, 256, 256)
  c.infer.overlap = 0.5
  c.infer.batch_size = 2
  # output blocks, in raster order: memory holds one (plus its windows'
  # margin). A block starts from its x-neighbour's sums, so only windows on z
  # and y faces are computed twice: deep, tall blocks thin along x waste the
  # least for their memory (docs/architecture.md "Inference")
  c.infer.block_shape = (256, 2048, 128)
  c.infer.tta = "none"                 # none | flips (8) | flips_transpose (16)
  c.infer.preview_sections = ()        # z indices of preview PNGs; () = 3 spread

  c.decode = ml_collections.ConfigDict()
  c.decode.seed_mask = 0.9
  c.decode.seed_contour = 0.8
  c.decode.foreground = 0.85
  c.decode.min_seed_size = 32
  c.decode.min_size = 128
  # objects whose mean mask probability is below this are removed (0 = off,
  # as the original): a confidence cut for invented objects; eval.json's
  # object_mean_mask_sweep shows what each value would do to the scores
  c.decode.min_mean_mask = 0.0
  # blockwise decoding: exact (equal to whole-volume) where no foreground
  # component reaching a block is longer than the halo; segment.json counts
  # the components cut by a halo
  c.decode.block_shape = (64, 512, 512)
  c.decode.halo = (8, 64, 64)

  c.eval = ml_collections.ConfigDict()
  c.eval.min_gt_size = 2000            # MitoEM drops smaller GT "crumbs"
  return c


def _need(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise UserError(f"config.{key}: {message}")


def load_file(spec: str) -> ml_collections.ConfigDict:
  """configs/x.py or configs/x.py:preset, as --config takes it: the file's
  get_config(preset), without overrides."""
  path, _, preset = spec.partition(":")
  loader = importlib.util.spec_from_file_location("stt_jax_config_file", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad key."""
  _need(c.data.label_kind in ("instances", "mask"), "data.label_kind",
        f"must be instances or mask, got {c.data.label_kind!r}")
  _need(c.data.mask_threshold > 0, "data.mask_threshold",
        f"must be > 0, got {c.data.mask_threshold}")
  _need(c.data.unlabelled_id == -1 or c.data.unlabelled_id >= 1, "data.unlabelled_id",
        f"must be -1 (all annotated) or a label id >= 1, got {c.data.unlabelled_id}")
  _need(c.data.unlabelled_id == -1 or c.data.label_kind == "instances", "data.unlabelled_id",
        "needs instance labels (data.label_kind=instances): a binary mask has no id "
        "for 'not annotated'")
  if c.data.synthetic.enabled:  # it would point data.* at generated volumes, silently
    given = [f"data.{split}.{field}" for split in ("train", "val")
             for field in ("image", "label") if c.data[split][field]]
    given += [f"data.{split}.more_volumes" for split in ("train", "val")
              if c.data[split].more_volumes]
    _need(not given, "data.synthetic.enabled",
          f"is on, so it would train and score on generated volumes instead of "
          f"{', '.join(given)}; add --config.data.synthetic.enabled=False to use yours")
  from stt_jax.models.unet import input_multiple  # pylint: disable=g-import-not-at-top
  m = c.model
  _need(m.name == "res_unet", "model.name", f"must be 'res_unet', got {m.name!r}")
  _need(len(m.widths) >= 2 and all(int(w) > 0 for w in m.widths), "model.widths",
        f"needs >= 2 positive widths, got {tuple(m.widths)}")
  _need(len(m.downsample_z) == len(m.widths) - 1, "model.downsample_z",
        f"needs {len(m.widths) - 1} entries (one per down-sampling), got {len(m.downsample_z)}")
  from stt_jax.models.layers import CONV_IMPLS, NORMS  # pylint: disable=g-import-not-at-top
  _need(m.conv_impl in CONV_IMPLS, "model.conv_impl",
        f"must be {', '.join(CONV_IMPLS[:-1])} or {CONV_IMPLS[-1]}, got {m.conv_impl!r}")
  _need(m.compute_dtype in ("auto", "float32", "bfloat16"), "model.compute_dtype",
        f"must be auto, float32 or bfloat16, got {m.compute_dtype!r}")
  _need(m.norm in NORMS, "model.norm", f"must be one of {NORMS}, got {m.norm!r}")
  if m.norm == "group":
    _need(m.norm_groups > 0 and all(int(w) % m.norm_groups == 0 for w in m.widths),
          "model.norm_groups", f"{m.norm_groups} must divide every width of "
          f"model.widths {tuple(m.widths)}")
  _need(len(m.input_scale) == 3 and all(int(f) == f and int(f) >= 1 for f in m.input_scale),
        "model.input_scale", f"needs 3 whole factors >= 1 (z, y, x), got {tuple(m.input_scale)}")
  from stt_jax.models import attention  # pylint: disable=g-import-not-at-top
  a = m.attention
  _need(a.design in attention.DESIGNS, "model.attention.design",
        f"must be one of {attention.DESIGNS}, got {a.design!r}")
  _need(a.fusion in attention.FUSIONS, "model.attention.fusion",
        f"must be one of {attention.FUSIONS}, got {a.fusion!r}")
  levels = range(len(m.widths))
  attended = a.design != "none"  # the baseline builds no SST block: its levels are moot
  _need(not attended or all(l in levels for l in a.encoder_levels),
        "model.attention.encoder_levels",
        f"levels must lie in 0..{len(m.widths) - 1}, got {tuple(a.encoder_levels)}")
  _need(not attended or all(l in levels[:-1] for l in a.decoder_levels),
        "model.attention.decoder_levels",
        f"levels must lie in 0..{len(m.widths) - 2}, got {tuple(a.decoder_levels)}")
  _need(a.implementation in attention.IMPLEMENTATIONS,
        "model.attention.implementation",
        f"must be one of {attention.IMPLEMENTATIONS}, got {a.implementation!r}")
  from stt_jax.models import deformable_conv  # pylint: disable=g-import-not-at-top
  _need(a.deform_gradient in deformable_conv.GRADIENTS, "model.attention.deform_gradient",
        f"must be one of {deformable_conv.GRADIENTS}, got {a.deform_gradient!r}")
  _need(a.temporal_implementation in attention.IMPLEMENTATIONS,
        "model.attention.temporal_implementation",
        f"must be one of {attention.IMPLEMENTATIONS}, got {a.temporal_implementation!r}")
  _need(a.heads > 0 and a.kv_grid > 0 and a.deform_groups > 0, "model.attention",
        "heads, kv_grid and deform_groups must be positive")
  _need(a.chunks >= 1, "model.attention.chunks", f"must be 1 or more, got {a.chunks}")
  _need(m.denoise.features > 0, "model.denoise.features",
        f"must be positive, got {m.denoise.features}")
  _need(m.denoise.kernel_size % 2 == 1, "model.denoise.kernel_size",
        f"must be odd, got {m.denoise.kernel_size}")
  _need(tuple(c.model.outputs) in (("mask", "contour"), ("mask", "contour", "distance")),
        "model.outputs", f"must be (mask, contour) or (mask, contour, distance), "
        f"got {tuple(c.model.outputs)}")
  _need(c.loss.distance_weight >= 0.0, "loss.distance_weight",
        f"must be >= 0, got {c.loss.distance_weight}")
  _need(c.loss.adversarial_weight >= 0.0, "loss.adversarial_weight",
        f"must be >= 0 (0 = off), got {c.loss.adversarial_weight}")
  _need(c.loss.adversarial_lambda1 >= 0.0, "loss.adversarial_lambda1",
        f"must be >= 0, got {c.loss.adversarial_lambda1}")
  _need(c.loss.adversarial_form in ("non_saturating", "minimax"), "loss.adversarial_form",
        f"must be non_saturating or minimax, got {c.loss.adversarial_form!r}")
  _need(len(m.discriminator.features) == 2 and all(int(f) > 0 for f in m.discriminator.features),
        "model.discriminator.features",
        f"needs 2 positive widths, got {tuple(m.discriminator.features)}")
  multiple = input_multiple(m.downsample_z)
  for key, shape in (("data.patch_shape", c.data.patch_shape),
                     ("infer.window", c.infer.window)):
    _need(len(shape) == 3 and all(int(s) > 0 for s in shape), key,
          f"needs 3 positive sizes (depth, height, width), got {tuple(shape)}")
    _need(all(int(s) % k == 0 for s, k in zip(shape, multiple)), key,
          f"{tuple(shape)} must be a multiple of {multiple} for this model")
  n_dev = jax.device_count()
  mp = int(c.train.model_parallel)
  _need(mp >= 1 and n_dev % mp == 0, "train.model_parallel",
        f"must divide the {n_dev} devices, got {mp}")
  n_data = n_dev // mp
  _need(c.train.batch_size > 0 and c.train.batch_size % n_data == 0, "train.batch_size",
        f"{c.train.batch_size} must be a positive multiple of the {n_data} "
        "data-parallel devices")
  _need(c.train.batch_size % jax.process_count() == 0, "train.batch_size",
        f"{c.train.batch_size} must be a multiple of the {jax.process_count()} processes")
  _need(c.train.steps > 0, "train.steps", f"must be positive, got {c.train.steps}")
  _need(c.train.learning_rate > 0 and math.isfinite(c.train.learning_rate),
        "train.learning_rate", f"must be positive, got {c.train.learning_rate}")
  _need(c.train.schedule in ("constant", "cosine", "linear"), "train.schedule",
        f"must be constant, cosine or linear, got {c.train.schedule!r}")
  _need(c.train.disc_learning_rate > 0 and math.isfinite(c.train.disc_learning_rate),
        "train.disc_learning_rate", f"must be positive, got {c.train.disc_learning_rate}")
  exempt = c.train.weight_decay_exempt
  # (sst,denoise) unquoted reaches here as the one string "(sst,denoise)"
  _need(isinstance(exempt, (tuple, list))
        and all(isinstance(e, str) and re.fullmatch(r"\w+", e) for e in exempt),
        "train.weight_decay_exempt",
        f"must be module-name prefixes, quoted: \"('sst','denoise')\", got {tuple(exempt)!r}")
  _need(c.train.grad_clip_norm >= 0, "train.grad_clip_norm",
        f"must be >= 0 (0 = off), got {c.train.grad_clip_norm}")
  _need(0.0 <= c.train.ema_decay < 1.0, "train.ema_decay",
        f"must be in [0, 1) (0 = off), got {c.train.ema_decay}")
  _need(c.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)")
  _need(c.train.best_metric in ("ap_50", "ap_75", "ap_50_95", "jaccard", "dice"),
        "train.best_metric",
        f"must be ap_50, ap_75, ap_50_95, jaccard or dice, got {c.train.best_metric!r}")
  for split in ("train", "val"):
    for i, entry in enumerate(c.data[split].more_volumes):
      _need(isinstance(entry, (tuple, list)) and len(entry) in (2, 3)
            and all(isinstance(p, str) and p for p in entry[:2]),
            f"data.{split}.more_volumes",
            f"entry {i} must be (image, label) or (image, label, region) with two "
            f"paths, got {entry!r}" + (" (one pair is ((image, label),), with the "
                                       "trailing comma)" if isinstance(entry, str) else ""))
  context = tuple(c.data.val.context)
  _need(len(context) == 3 and all(int(v) >= 0 for v in context), "data.val.context",
        f"needs 3 sizes >= 0 (depth, height, width), got {context}")
  _need(c.data.workers >= 0, "data.workers", f"must be >= 0 (0 = auto), got {c.data.workers}")
  _need(0.0 <= c.data.foreground_bias <= 1.0, "data.foreground_bias",
        f"must be in [0, 1], got {c.data.foreground_bias}")
  for key in AUGMENT_PROBABILITIES:
    _need(0.0 <= c.data.augment[key] <= 1.0, f"data.augment.{key}",
          f"must be in [0, 1], got {c.data.augment[key]}")
  low, high = c.data.augment.rescale_range
  _need(0 < low <= high, "data.augment.rescale_range", f"needs 0 < low <= high, got {(low, high)}")
  _need(c.train.log_every > 0, "train.log_every", "must be positive")
  _need(c.train.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
  _need(c.train.checkpoint_minutes >= 0, "train.checkpoint_minutes",
        "must be >= 0 (0 = save by steps only)")
  _need(c.train.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
  _need(0.0 <= c.infer.overlap < 1.0, "infer.overlap",
        f"must be in [0, 1), got {c.infer.overlap}")
  _need(c.infer.batch_size > 0, "infer.batch_size", "must be positive")
  for key in ("infer.block_shape", "decode.block_shape", "decode.halo"):
    value = tuple(c[key.split(".")[0]][key.split(".")[1]])
    low = 0 if key == "decode.halo" else 1
    _need(len(value) == 3 and all(int(v) >= low for v in value), key,
          f"needs 3 sizes >= {low} (depth, height, width), got {value}")
  from stt_jax.infer.sliding_window import TTA_MODES  # pylint: disable=g-import-not-at-top
  _need(c.infer.tta in TTA_MODES, "infer.tta",
        f"must be one of {TTA_MODES}, got {c.infer.tta!r}")
  _need(c.infer.tta != "flips_transpose" or c.infer.window[1] == c.infer.window[2],
        "infer.tta", "flips_transpose needs a square window (height == width)")
  for key in ("seed_mask", "seed_contour", "foreground", "min_mean_mask"):
    value = c.decode[key]
    _need(0.0 <= value <= 1.0, f"decode.{key}", f"must be in [0, 1], got {value}")
  _need(c.data.contour_width >= 1, "data.contour_width", "must be >= 1")
