"""Sliding-window inference with Gaussian blending, one output block at a time.

Windows lie on one global grid (stride = window x (1 - overlap), the last
window flush with the volume's end); each window's prediction is weighted by
1e-4 + exp(-r^2 / (2 * 0.2^2)), r the distance from the window centre in
coordinates normalised to [-1, 1]^3 (the original's blending), so seams
vanish. An output block is predicted from every grid window that touches it,
accumulated on the devices, normalised and cropped: the result equals
whole-volume blending exactly, whatever the block size, while memory holds one
block. Windows on a block's faces are computed for both neighbours (the price
of bounded memory; see docs/architecture.md "Inference").
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from stt_jax.data.sources import Volume
from stt_jax.errors import UserError
from stt_jax.infer import blocks as blocks_lib

TTA_MODES = ("none", "flips", "flips_transpose")


def blending_weights(window: Sequence[int], sigma: float = 0.2) -> np.ndarray:
  """[depth, height, width] float32 weights, largest at the window centre."""
  axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in window]
  grid = np.meshgrid(*axes, indexing="ij")
  r2 = sum(g ** 2 for g in grid)
  return (1e-4 + np.exp(-r2 / (2 * sigma ** 2))).astype(np.float32)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start offsets covering [0, size) with windows of `window` (the last one
  flush with the end). A volume smaller than the window gets one start, 0."""
  if size <= window:
    return [0]
  stride = max(int(round(window * (1.0 - overlap))), 1)
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def group_norm_window_note(norm: str, training_patch: Sequence[int] | None,
                           window: Sequence[int]) -> str | None:
  """A one-line note when a GroupNorm model infers on windows of another
  shape than its training patches, else None. GroupNorm's statistics are taken
  over the whole window, so the window's size shifts the probabilities' scale
  (docs/architecture.md "GroupNorm's window dependence")."""
  if norm != "group" or training_patch is None or tuple(training_patch) == tuple(window):
    return None
  shape = lambda s: "(" + ",".join(str(int(n)) for n in s) + ")"
  return (f"note: this GroupNorm model trained on {shape(training_patch)} patches and "
          f"infers on {shape(window)} windows, which shifts its calibration (larger "
          f"windows over-cover at a fixed decode.foreground); to match, pass "
          f"--config.infer.window=\"{shape(training_patch)}\"")


def _tta_transforms(mode: str) -> np.ndarray:
  """[n, 4] flags (flip z, flip y, flip x, transpose yx) of each transform."""
  flips = list(itertools.product((0, 1), repeat=3)) if mode != "none" else [(0, 0, 0)]
  transposes = (0, 1) if mode == "flips_transpose" else (0,)
  return np.array([(*f, t) for t in transposes for f in flips], np.int32)


def make_predict_fn(model, mesh, tta: str = "none") -> Callable:
  """Jitted (params, image [b, d, h, w, 1] in [0, 1]) -> probabilities
  [b, d, h, w, channels], averaged over the test-time transforms of `tta`
  (none; flips: the 8 flips of z, y, x; flips_transpose: those and their yx
  transposes, 16). The transforms run in a `lax.scan`: one compiled copy of
  the model whatever their number."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  transforms = jnp.asarray(_tta_transforms(tta))
  if hasattr(model, "forward_only"):  # a ResUNet: never differentiated here
    model = model.clone(forward_only=True)

  def probabilities(params, x):
    return jax.nn.sigmoid(model.apply({"params": params}, x).astype(jnp.float32))

  def flip(x, flags, axes_first):
    for flag, axis in zip(flags, axes_first):
      x = jnp.where(flag, jnp.flip(x, axis), x)
    return x

  def transpose(x, flag):
    return jnp.where(flag, jnp.swapaxes(x, 2, 3), x) if x.shape[2] == x.shape[3] else x

  def fn(params, x):
    if tta == "none":
      return probabilities(params, x)

    def one(total, t):
      y = transpose(flip(x, t[:3], (1, 2, 3)), t[3])
      p = flip(transpose(probabilities(params, y), t[3]), t[:3], (1, 2, 3))
      return total + p, None

    shape = jax.eval_shape(probabilities, params, x)
    total, _ = jax.lax.scan(one, jnp.zeros(shape.shape, jnp.float32), transforms)
    return total / transforms.shape[0]

  return jax.jit(fn, in_shardings=(replicated, batch_sharding),
                 out_shardings=batch_sharding)


@dataclasses.dataclass(frozen=True)
class Carry:
  """A dispatched block's accumulator, for the block after it along x."""
  block: blocks_lib.Block
  origin: tuple[int, ...]     # the accumulator's voxel 0 in the volume
  acc: jax.Array


def _x_neighbours(first: blocks_lib.Block, second: blocks_lib.Block) -> bool:
  """Whether `second` follows `first` along x in the same row."""
  here, there = first.position, second.position
  return here[:2] == there[:2] and here[2] + 1 == there[2]


class _Programs:
  """The jitted programs of a BlockPredictor. Built once per (model, mesh,
  shapes) by `_programs`: each validation of a training run and each volume
  of a process makes its own BlockPredictor, and jitting per instance
  compiled the model again every time."""

  def __init__(self, predict_fn: Callable, mesh, window: tuple[int, ...],
               buffer: tuple[int, ...], batch_size: int, channels: int):
    self.predict_fn, self.buffer, self.batch_size = predict_fn, buffer, batch_size
    self.n_data = mesh.shape["data"]
    self.weights = jnp.asarray(blending_weights(window))
    acc_sharding = NamedSharding(mesh, P("data"))
    self.accumulate = jax.jit(self._accumulate_fn, donate_argnums=(1,))
    # the crop and the output type are static: a block on the volume's edge
    # has its own shape, so at most 8 variants compile
    self.finish = jax.jit(self._finish_fn, static_argnums=(1, 2),
                          out_shardings=NamedSharding(mesh, P()))
    self.zeros = jax.jit(
        lambda: jnp.zeros((self.n_data, *buffer, channels + 1), jnp.float32),
        out_shardings=acc_sharding)
    self.carry = jax.jit(self._carry_fn, out_shardings=acc_sharding)

  def _accumulate_fn(self, params, acc, x_u8, offsets, valid):
    """acc += weighted predictions of windows x_u8 [b, d, h, w] at `offsets`
    [b, 3] in the buffer; padding windows have valid = 0."""
    probs = self.predict_fn(params, x_u8[..., None].astype(jnp.float32) / 255.0)
    per = self.batch_size // self.n_data
    w = self.weights[..., None]
    contrib = jnp.concatenate([probs * w, jnp.broadcast_to(w, (*probs.shape[:-1], 1))], -1)
    contrib = contrib * valid[:, None, None, None, None]
    contrib = contrib.reshape(self.n_data, per, *contrib.shape[1:])
    offsets = offsets.reshape(self.n_data, per, 3)

    def add_windows(acc_device, contrib_device, offsets_device):
      def body(i, a):
        start = (*[offsets_device[i, k] for k in range(3)], 0)
        current = jax.lax.dynamic_slice(a, start, contrib_device.shape[1:])
        return jax.lax.dynamic_update_slice(a, current + contrib_device[i], start)
      return jax.lax.fori_loop(0, per, body, acc_device)

    return jax.vmap(add_windows)(acc, contrib, offsets)

  def _carry_fn(self, previous, shift):
    """The accumulator of the previous block along x moved `shift` voxels
    left (its origin to the next block's), zeros beyond its end."""
    padded = jnp.pad(previous, [(0, 0), (0, 0), (0, 0), (0, self.buffer[2]), (0, 0)])
    return jax.lax.dynamic_slice_in_dim(padded, shift, self.buffer[2], axis=3)

  def _finish_fn(self, acc, crop: tuple[tuple[int, int], ...], as_uint8: bool):
    """The block's normalised probabilities [*crop, channels] from the
    buffer's accumulator; uint8 (x 255, rounded half to even like
    `postprocess.as_uint8`) moves a quarter of the bytes to the host."""
    total = acc[(slice(None), *[slice(a, b) for a, b in crop])].sum(0)
    probs = total[..., :-1] / jnp.maximum(total[..., -1:], 1e-12)
    if as_uint8:
      return jnp.clip(jnp.round(probs * 255.0), 0, 255).astype(jnp.uint8)
    return probs


@functools.lru_cache(maxsize=8)
def _programs(predict_fn: Callable, mesh, window: tuple[int, ...], buffer: tuple[int, ...],
              batch_size: int, channels: int) -> _Programs:
  return _Programs(predict_fn, mesh, window, buffer, batch_size, channels)


class BlockPredictor:
  """Blended probabilities of output blocks of a volume.

  The accumulator [data devices, *buffer, channels + 1] (weighted sums and the
  weight) stays on the devices: each device adds its own windows, the block's
  sum crosses devices once, and only the normalised block comes back.
  """

  def __init__(self, predict_fn: Callable, params, mesh, volume_shape: Sequence[int], *,
               window: Sequence[int], overlap: float, batch_size: int,
               block: Sequence[int], box: tuple[Sequence[int], Sequence[int]] | None = None):
    """`box`: [start, stop) of the volume whose blocks are wanted (default:
    all of it). Its windows stay on the whole volume's grid and read the
    image around the box, so its probabilities equal the whole volume's."""
    self.predict_fn, self.params, self.mesh = predict_fn, params, mesh
    self.shape = tuple(int(s) for s in volume_shape)
    self.window = tuple(int(w) for w in window)
    self.block = tuple(int(b) for b in block)
    box = box or ((0, 0, 0), self.shape)
    self.box = tuple(tuple(int(v) for v in corner[:3]) for corner in box)
    self.starts = [window_starts(s, w, overlap) for s, w in zip(self.shape, self.window)]
    self.n_data = mesh.shape["data"]
    self.batch_size = max(batch_size - batch_size % self.n_data, self.n_data)
    self.buffer = self._buffer(self.block)
    x = jax.ShapeDtypeStruct((self.batch_size, *self.window, 1), jnp.float32)
    self.channels = int(jax.eval_shape(predict_fn, params, x).shape[-1])
    self.accumulator_bytes = self._accumulator_bytes(self.buffer)
    self._check_fits(device_memory_limit(mesh))
    self._batch_sharding = NamedSharding(mesh, P("data"))
    self._programs = _programs(predict_fn, mesh, self.window, self.buffer, self.batch_size,
                               self.channels)

  def blocks(self, block: Sequence[int] | None = None) -> list[blocks_lib.Block]:
    """The blocks tiling the box in raster order, in volume coordinates;
    `index` and `position` count within the box's own grid."""
    start, stop = self.box
    return [blocks_lib.Block(b.index, b.position,
                             tuple(a + o for a, o in zip(b.start, start)),
                             tuple(a + o for a, o in zip(b.stop, start)))
            for b in blocks_lib.iterate([hi - lo for lo, hi in zip(start, stop)],
                                        block or self.block)]

  def _buffer(self, block: Sequence[int]) -> tuple[int, ...]:
    """The largest span of windows touching one block, per axis: one
    accumulator shape for every block."""
    return tuple(max(self._span(axis, b.start[axis], b.stop[axis])[1]
                     for b in self.blocks(block))
                 for axis in range(3))

  def _accumulator_bytes(self, buffer: Sequence[int]) -> int:
    """Per data device: float32 sums of every channel and the weight."""
    return int(np.prod(buffer)) * (self.channels + 1) * 4

  def _check_fits(self, limit: int | None) -> None:
    """A one-line error, before any work, where the accumulator alone takes
    over 90 % of what a device may allocate (the model's windows need the
    rest), naming blocks that fit: the axis spanning the most windows
    halved, down to half a window, until the accumulator fits."""
    if not limit or self.accumulator_bytes <= 0.9 * limit:
      return
    smaller = [min(b, hi - lo) for b, lo, hi in zip(self.block, *self.box)]
    while self._accumulator_bytes(self._buffer(smaller)) > 0.9 * limit:
      axis = max(range(3), key=lambda a: smaller[a] / self.window[a])
      if smaller[axis] <= self.window[axis] // 2:
        smaller = None
        break
      smaller[axis] = max(smaller[axis] // 2, 1)
    advice = (f"use smaller blocks, e.g. --config.infer.block_shape="
              f"\"({','.join(map(str, smaller))})\"" if smaller
              else "no block shape fits these windows: use a smaller infer.window")
    gib = 2.0 ** 30
    raise UserError(
        f"infer.block_shape={self.block}: the blending accumulator alone needs "
        f"{self.accumulator_bytes / gib:.1f} GiB per device, over 90 % of the "
        f"{limit / gib:.1f} GiB a device may allocate; {advice}")

  def _window_range(self, axis: int, lo: int, hi: int) -> list[int]:
    w = self.window[axis]
    return [s for s in self.starts[axis] if s < hi and s + w > lo]

  def _span(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
    """(origin, extent) on `axis` of the windows touching [lo, hi)."""
    starts = self._window_range(axis, lo, hi)
    return starts[0], starts[-1] + self.window[axis] - starts[0]

  def _input_box(self, block: blocks_lib.Block) -> tuple[list[int], list[int]]:
    """[origin, stop) of the input a block needs: its windows' span, cut
    at the volume's end."""
    spans = [self._span(a, block.start[a], block.stop[a]) for a in range(3)]
    origin = [s[0] for s in spans]
    return origin, [min(o + e, n) for (o, e), n in zip(spans, self.shape)]

  def read_input(self, image: Volume, block: blocks_lib.Block,
                 previous: blocks_lib.Block | None = None) -> _InputRead:
    """Starts reading the input `block` needs. Where `previous` is its
    x-neighbour, whose input the caller holds, only the part past that
    input's end is read (`_InputRead.result` joins the two): thin blocks
    share most of their neighbour's input."""
    origin, stop = self._input_box(block)
    start = list(origin)
    reuse = previous is not None and _x_neighbours(previous, block)
    if reuse:
      start[2] = max(origin[2], self._input_box(previous)[1][2])
    size = [b - a for a, b in zip(start, stop)]
    future = image.read_async(start, size) if size[2] > 0 else None
    return _InputRead(origin, reuse, future)

  def _batches(self, ranges: list[list[int]]
               ) -> list[list[tuple[int, int, int] | None]]:
    """Window starts of a block in batches, x-start first: each voxel then
    sums its windows in one order whether its block starts from zeros or
    from a carry, so restarting in the middle of a row gives the same bytes.
    With several data devices a window's device (its place in the batch)
    fixes which partial sum it joins, so each x-start's windows begin a
    fresh batch and a window's device follows from its place on the whole
    volume's grid (its (z, y) ordinal modulo the devices), not from its
    place in this block's list: a block of another tiling (a --region box)
    then sums every voxel's windows in the same groups and order. Slots a
    device has no window for are None (padding)."""
    columns = [[(z, y, x) for z in ranges[0] for y in ranges[1]] for x in ranges[2]]
    size = self.batch_size
    if self.n_data == 1:
      flat = [w for column in columns for w in column]
      return [flat[i:i + size] for i in range(0, len(flat), size)]
    per = size // self.n_data
    z_index = {z: i for i, z in enumerate(self.starts[0])}
    y_index = {y: i for i, y in enumerate(self.starts[1])}
    n_y = len(self.starts[1])
    batches = []
    for column in columns:
      queues = [[] for _ in range(self.n_data)]
      for w in column:
        queues[(z_index[w[0]] * n_y + y_index[w[1]]) % self.n_data].append(w)
      for t in range(-(-max(len(q) for q in queues) // per)):
        batch = []
        for q in queues:
          part = q[t * per:(t + 1) * per]
          batch += part + [None] * (per - len(part))
        batches.append(batch)
    return batches

  def dispatch(self, block: blocks_lib.Block, origin: Sequence[int], region: np.ndarray,
               *, as_uint8: bool = False, previous: Carry | None = None
               ) -> tuple[jax.Array, Carry]:
    """Queues the work of `block` on the devices and returns at once:
    (result, carry). The result (its copy to the host already started) is
    [*block.shape, channels] float32 blended probabilities, or uint8 x 255.
    `region` is the input from `read_input` (uint8 or [0, 255] values).
    `previous`: the carry of the block before this one along x; the windows
    straddling their shared face are then not computed again, their sums
    come from its accumulator."""
    pads = [(0, max(b - r, 0)) for b, r in zip(self.buffer, region.shape)]
    region = np.pad(region, pads, mode="edge") if any(p[1] for p in pads) else region
    region = np.asarray(region, np.uint8)
    ranges = [self._window_range(a, block.start[a], block.stop[a]) for a in range(3)]
    carried = previous is not None and _x_neighbours(previous.block, block)
    if carried:
      ranges[2] = [s for s in ranges[2] if s >= block.start[2]]
      acc = self._programs.carry(previous.acc, np.int32(origin[2] - previous.origin[2]))
    else:
      acc = self._programs.zeros()
    for group in self._batches(ranges):
      # fixed batch (one compiled program): padding slots repeat a window of
      # the batch and add nothing (valid 0)
      group = group + [None] * (self.batch_size - len(group))
      valid = np.array([w is not None for w in group], np.float32)
      filler = next(w for w in group if w is not None)
      group = [filler if w is None else w for w in group]
      offsets = np.array([[s - o for s, o in zip(st, origin)] for st in group], np.int32)
      x = np.stack([region[tuple(slice(o, o + w) for o, w in zip(off, self.window))]
                    for off in offsets])
      acc = self._programs.accumulate(self.params, acc,
                                      jax.device_put(x, self._batch_sharding),
                                      jax.device_put(offsets, self._batch_sharding),
                                      jax.device_put(valid, self._batch_sharding))
    crop = tuple((a - o, b - o) for a, b, o in zip(block.start, block.stop, origin))
    out = self._programs.finish(acc, crop, as_uint8)
    out.copy_to_host_async()
    return out, Carry(block, tuple(origin), acc)

  def run(self, image: Volume, todo: Sequence[blocks_lib.Block], *, as_uint8: bool = False
          ) -> Iterator[tuple[blocks_lib.Block, np.ndarray]]:
    """Yields (block, probabilities) for `todo` in order (see `dispatch`).
    One block ahead: block k+1 is read and its windows queued on the devices
    before block k is handed over, so the caller's work on block k (writing
    it) overlaps the devices' work on block k+1 instead of idling them. A
    block following its x-neighbour carries the neighbour's sums (`todo` in
    raster order, as `blocks.iterate` gives, makes every block but a row's
    first one do so)."""
    reads = [self.read_input(image, todo[0])] if todo else []
    queued, carry, held = None, None, None
    for k, block in enumerate(todo):
      origin, region = reads.pop(0).result(held)
      held = (origin, region)
      if k + 1 < len(todo):
        reads.append(self.read_input(image, todo[k + 1], previous=block))
      probs, carry = self.dispatch(block, origin, region, as_uint8=as_uint8, previous=carry)
      current = (block, probs)
      del region
      if queued is not None:
        yield queued[0], np.asarray(queued[1])
      queued = current
    if queued is not None:
      yield queued[0], np.asarray(queued[1])


@dataclasses.dataclass
class _InputRead:
  """A block's input being read: `result(held)` gives (origin, region),
  joining the held input of its x-neighbour where `reuse`."""
  origin: list[int]
  reuse: bool
  future: object | None  # None: the neighbour's input covers it all

  def result(self, held: tuple[list[int], np.ndarray] | None) -> tuple[list[int], np.ndarray]:
    new = None if self.future is None else np.asarray(self.future.result())
    if not self.reuse:
      return self.origin, new
    held_origin, held_region = held
    kept = held_region[:, :, self.origin[2] - held_origin[2]:]
    return self.origin, kept if new is None else np.concatenate([kept, new], axis=2)


def predict_volume(predict_fn: Callable, params, image: Volume, mesh, *,
                   window: Sequence[int], overlap: float = 0.5,
                   batch_size: int = 2, block: Sequence[int] | None = None) -> np.ndarray:
  """Blended probabilities float32 [depth, height, width, channels] of a
  (small) volume, in memory; `block` only changes the order of work."""
  block = block or image.shape
  predictor = BlockPredictor(predict_fn, params, mesh, image.shape, window=window,
                             overlap=overlap, batch_size=batch_size, block=block)
  out = np.zeros((*image.shape, predictor.channels), np.float32)
  for b, probs in predictor.run(image, predictor.blocks()):
    out[b.slices()] = probs
  return out


def device_memory_limit(mesh) -> int | None:
  """Bytes one device of `mesh` may allocate, where its backend says (GPUs
  and TPUs do; the CPU does not)."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  try:
    stats = local[0].memory_stats() if local else None
  except Exception:  # pylint: disable=broad-except
    return None  # a backend without the query: no check, the run goes on
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@functools.lru_cache(maxsize=None)
def redundancy(shape: tuple[int, ...], window: tuple[int, ...], overlap: float,
               block: tuple[int, ...]) -> float:
  """Windows computed blockwise / windows of the grid (>= 1). Along x a
  block carries its neighbour's sums (`BlockPredictor.run`), so only z and y
  faces cost windows twice."""
  total = 1
  per_axis = []
  for axis, (size, w, b) in enumerate(zip(shape, window, block)):
    starts = window_starts(size, w, overlap)
    total *= len(starts)
    per_axis.append([len(starts)] if axis == 2 else
                    [sum(1 for s in starts if s < min(lo + b, size) and s + w > lo)
                     for lo in range(0, size, b)])
  computed = int(np.prod([sum(c) for c in per_axis]))
  return computed / total
