"""Image volume -> probabilities -> instances -> report, block by block.

Output folder:
  probabilities.zarr   [z, y, x, channels] uint8 (mask, contour, ... x 255)
  instances.zarr       [z, y, x] uint32, 0 = background, 1..N
  morphology.csv, morphology_summary.json, size_histogram.png
  previews/z<k>.png    EM section + instances + contours
  segment.json         settings, prediction plan, timings, finished flag
  progress/            finished blocks of each stage (a rerun skips them)
Both zarr arrays carry `voxel_size_nm` in their attributes, and
`translation_nm` (where their voxel 0 lies) where the input has one or is a
box of a volume, so viewers overlay them on the input.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np
import tqdm

from stt_jax import memory_use
from stt_jax.data import rescaled, sources
from stt_jax.infer import blocks as blocks_lib
from stt_jax.infer import blockwise, preview, sliding_window
from stt_jax.metrics import morphology


def weights_fingerprint(params) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def _settings(cfg, image: sources.Volume, params, region_context: bool) -> dict:
  path, region = sources.file_and_box(image)
  return {"input": path, "input_region": region, "input_shape": list(image.shape),
          **({"region_context": region_context} if region else {}),
          "weights": weights_fingerprint(params), "infer": cfg.infer.to_dict(),
          "decode": cfg.decode.to_dict(),
          **({} if rescaled.is_identity(cfg.model.input_scale) else
             {"input_scale": [int(f) for f in cfg.model.input_scale]})}


def _whole_volume(image: sources.Volume, region_context: bool
                  ) -> tuple[sources.Volume, list[int]]:
  """(the volume whose window grid predicts `image`: with `region_context`
  the one it is a box of, else itself; `image`'s start in it)."""
  if region_context and isinstance(image, sources.RegionVolume):
    return image.base, list(image.start)
  return image, [0, 0, 0]


def model_input(image: sources.Volume, factors, region_context: bool
                ) -> tuple[sources.Volume, tuple[int, int, int]]:
  """(what the model reads of `image` at `model.input_scale` = `factors`, and
  where `image`'s voxel 0 lies inside that one's voxel 0, in `image` voxels).
  With `region_context` a `RegionVolume` box becomes the binned box of its
  binned whole volume (the windows still read the image around it), grown
  outward to whole bins and one more where the volume goes on, so that its
  interpolation at the box's faces is the whole volume's."""
  if rescaled.is_identity(factors):
    return image, (0, 0, 0)
  if region_context and isinstance(image, sources.RegionVolume):
    whole = rescaled.BinnedVolume(image.base, factors, "mean")
    start = [max(s // f - (f > 1), 0) for s, f in zip(image.start, factors)]
    stop = [min(-(-s // f) + (f > 1), n) for s, f, n in zip(image.stop, factors, whole.shape)]
    origin = tuple(s - c * f for s, c, f in zip(image.start, start, factors))
    return sources.RegionVolume(whole, start, stop), origin
  return rescaled.BinnedVolume(image, factors, "mean"), (0, 0, 0)


def predict(cfg, predict_fn, params, image: sources.Volume, mesh, out_dir: str, *,
            voxel_size_nm, quiet: bool = True, region_context: bool = False,
            part: tuple[int, int] = (0, 1), translation_nm=None,
            attributes: dict | None = None) -> tuple[sources.Volume, dict]:
  """Blended probabilities of `image` into <out_dir>/probabilities.zarr
  (uint8), skipping blocks a previous run finished. Returns the volume and
  the plan: blocks, windows computed / the grid's, accumulator bytes.

  `region_context`: a `RegionVolume` box is predicted on its whole volume's
  window grid, the windows reading the image around the box, so its
  probabilities equal the whole volume's there (neighbouring boxes join
  without seams). Without it the box is predicted as a volume of its own
  (validation's data.val.context sets its own margin that way).

  `part` (i, n): only rows of blocks (along x) i, i + n, ... are predicted,
  so n processes sharing `out_dir` split the work (`segment`).

  `translation_nm` (default: `image`'s place in its file's world) and
  `attributes` go into the zarr's attributes."""
  i = cfg.infer
  block = tuple(int(b) for b in i.block_shape)
  source, origin = _whole_volume(image, region_context)
  predictor = sliding_window.BlockPredictor(
      predict_fn, params, mesh, source.shape, window=i.window, overlap=i.overlap,
      batch_size=i.batch_size, block=block,
      box=(origin, [o + n for o, n in zip(origin, image.shape)]))
  path = os.path.join(out_dir, "probabilities.zarr")
  shape = (*image.shape, predictor.channels)
  with blocks_lib.output_lock(out_dir):  # parts of a split run start together
    if os.path.exists(path):
      out = sources.reopen_for_writing(path)
    else:
      out = sources.create_volume(
          path, shape, np.uint8, chunks=(*blocks_lib.chunk_shape(block), predictor.channels),
          voxel_size_nm=voxel_size_nm, attributes=attributes,
          translation_nm=(sources.world_translation_nm(image, voxel_size_nm)
                          if translation_nm is None else translation_nm))
  done = blocks_lib.Progress(out_dir, "predict")
  every = predictor.blocks()
  # whole rows per part: a block along x carries its neighbour's sums
  rows = blocks_lib.grid_shape(image.shape, block)[1]
  mine = [b for b in every if (b.position[0] * rows + b.position[1]) % part[1] == part[0]]
  todo = [b for b in mine if not done.done(b.index)]
  plan = {"block_shape": list(block), "blocks": len(every),
          **({"part": list(part), "part_blocks": len(mine)} if part[1] > 1 else {}),
          "blocks_done_before": len(mine) - len(todo),
          "windows_vs_grid": round(sliding_window.redundancy(
              tuple(image.shape), tuple(i.window), float(i.overlap), block), 4),
          "accumulator_bytes_per_device": predictor.accumulator_bytes}
  if not quiet:
    size = predictor.accumulator_bytes
    size = f"{size / 2 ** 30:.2f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"
    print(f"predicting {len(todo)} of {len(mine)} blocks of {block}"
          f"{f' (part {part[0]}/{part[1]} of {len(every)})' if part[1] > 1 else ''}: "
          f"{plan['windows_vs_grid']:.2f}x the grid's windows, accumulator {size} "
          "per device", flush=True)
  bar = tqdm.tqdm(total=len(todo), desc="predict blocks", disable=quiet, leave=False)
  # uint8 on the devices; each block is written while the next one computes
  for b, probs in predictor.run(source, todo, as_uint8=True):
    out.write((*[a - o for a, o in zip(b.start, origin)], 0), probs)
    done.mark(b.index)
    memory_use.return_free_heap()
    bar.update()
  bar.close()
  return out, plan


def decode(cfg, probabilities: sources.Volume, out_dir: str, *, voxel_size_nm,
           quiet: bool = True) -> tuple[sources.Volume, dict]:
  settings = blockwise.DecodeSettings.from_config(cfg.decode)
  bar = tqdm.tqdm(total=blockwise.passes(probabilities.shape[:3], settings.block),
                  desc="decode blocks", disable=quiet, leave=False)
  out = blockwise.decode(probabilities, out_dir, settings, voxel_size_nm=voxel_size_nm,
                         progress_bar=bar)
  bar.close()
  return out


def report(cfg, image: sources.Volume, instances: sources.Volume, out_dir: str, *,
           voxel_size_nm, sections=()) -> dict:
  summary = morphology.write_report(instances, voxel_size_nm, out_dir,
                                    block=tuple(cfg.decode.block_shape))
  summary["previews"] = preview.write_previews(image, instances, out_dir, sections)
  return summary


def _peak_rss_mb() -> float:
  return round(memory_use.peak_resident_mb(), 1)


def segment(cfg, predict_fn, params, image: sources.Volume, mesh, out_dir: str, *,
            overwrite: bool = False, quiet: bool = True, with_report: bool = True,
            sections=(), region_context: bool = False,
            part: tuple[int, int] = (0, 1)) -> dict:
  """Segments `image` into `out_dir` (see the module doc). An unfinished
  run there with the same settings is continued; anything else is refused
  unless `overwrite`. Returns the summary also written to segment.json.
  `region_context`: see `predict`; instances are decoded within the box.

  `part` (i, n), n > 1: one of n processes (machines, array jobs) sharing
  `out_dir` on one filesystem, each predicting its share of the blocks; the
  part that finds every block predicted decodes and reports (one part, under
  a lock), the others return {"part", "predicted_blocks", "blocks_left"}
  (blocks that other parts have still to predict) without "finished".
  """
  settings = _settings(cfg, image, params, region_context)
  if part[1] > 1:
    with blocks_lib.output_lock(out_dir):  # the first part creates, the rest join
      resumed = blocks_lib.open_output(out_dir, settings, overwrite=False)
  else:
    resumed = blocks_lib.open_output(out_dir, settings, overwrite)
  voxel_size = image.voxel_size_nm or tuple(cfg.data.voxel_size_nm)
  factors = tuple(int(f) for f in cfg.model.input_scale)
  seen, origin = model_input(image, factors, region_context)
  same_voxels = rescaled.is_identity(factors)
  t0 = time.perf_counter()
  probabilities, plan = predict(
      cfg, predict_fn, params, seen, mesh, out_dir, quiet=quiet,
      voxel_size_nm=rescaled.binned_voxel_size(voxel_size, factors),
      region_context=region_context, part=part,
      **({} if same_voxels else dict(
          # the coarse voxel 0 starts `origin` voxels before the image's
          translation_nm=tuple(t - o * v for t, o, v in zip(
              sources.world_translation_nm(image, voxel_size), origin, voxel_size)),
          attributes=rescaled.full_resolution_attributes(image.shape, factors, origin,
                                                         voxel_size))))
  # decoded at the image's voxels whatever the model read
  probabilities = rescaled.full_resolution(probabilities)
  t1 = time.perf_counter()
  times = {"resumed": resumed, "predict_plan": plan, "predict_seconds": t1 - t0}
  if part[1] == 1:
    return _decode_and_report(cfg, image, probabilities, out_dir, times, voxel_size,
                              quiet=quiet, with_report=with_report, sections=sections)
  own = {"part": list(part), "predicted_blocks": plan["part_blocks"] - plan[
      "blocks_done_before"], "predict_seconds": t1 - t0}
  left = plan["blocks"] - blocks_lib.Progress(out_dir, "predict").count()
  if left:
    return dict(own, blocks_left=left)
  with blocks_lib.output_lock(out_dir, ".decode.lock", wait=False) as decoding:
    if not decoding or blocks_lib.is_finished(out_dir):  # another part's work
      return dict(own, blocks_left=0)
    return dict(_decode_and_report(cfg, image, probabilities, out_dir, times, voxel_size,
                                   quiet=quiet, with_report=with_report,
                                   sections=sections), **own)


def _decode_and_report(cfg, image: sources.Volume, probabilities: sources.Volume,
                       out_dir: str, times: dict, voxel_size, *, quiet: bool,
                       with_report: bool, sections) -> dict:
  """The stages after prediction; writes the finished segment.json."""
  rss = {"predict": _peak_rss_mb()}
  blocks_lib.release_free_memory()
  t1 = time.perf_counter()
  instances, stats = decode(cfg, probabilities, out_dir, voxel_size_nm=voxel_size,
                            quiet=quiet)
  t2 = time.perf_counter()
  rss["decode"] = _peak_rss_mb()
  blocks_lib.release_free_memory()
  summary = {"resumed": times["resumed"], "volume_shape": list(image.shape),
             "voxel_size_nm": list(voxel_size),
             "translation_nm": list(sources.world_translation_nm(image, voxel_size)), **stats,
             "predict_plan": times["predict_plan"],
             "predict_seconds": times["predict_seconds"], "decode_seconds": t2 - t1,
             "probabilities_path": probabilities.path,
             "instances_path": instances.path}
  if with_report:
    summary["morphology"] = report(cfg, image, instances, out_dir,
                                   voxel_size_nm=voxel_size, sections=sections)
    summary["report_seconds"] = time.perf_counter() - t2
    rss["report"] = _peak_rss_mb()
  summary["peak_rss_mb_after"] = rss  # process peak after each stage
  blocks_lib.finish_output(out_dir, summary)
  return summary
