"""One 3D convolution in each of the forms `stt_jax.models.layers` can run it:
forward and forward + gradient time, and the error against XLA's own conv.

  python3 bench/conv_forms.py [--convs=2x18x130x130:3x3x3:12-12,...]
      [--forms=native,depth_as_batch,inference,batched_planes,taps_as_outputs,im2col]

A conv is batch x depth x height x width (its input, padding included) :
kernel : in-out channels, stride 1. The forms: `native` (XLA's 3D conv),
`depth_as_batch` (what `model.conv_impl=depth_as_batch` runs in training:
the kd taps as 2D convs with depth in the batch, or for 3D kernels up to 16
outputs `taps_as_outputs` with `layers.conv3d_input_gradient` and the
batched kernel gradient), `inference` (what a CPU runs in inference,
`layers.DEPTH_TAPS_AS_OUTPUTS`: that form for every 3D kernel and the rows
of a narrow 2D one), `batched_planes` (the batched 2D convs alone),
`taps_as_outputs` (the taps as extra output channels of one 2D conv, with
its own autodiff gradient), `im2col` (one matmul); where
PyTorch imports, also `torch` and `torch_channels_last` (its F.conv3d, the
peer's conv, NCDHW and channels_last_3d) as the reference, and each form's
ratio to the faster of the two. The defaults
are the demo network's convs at its 16x128x128 inference window, batch 2
(levels 1-3 and the 1x5x5 head), and one 28-wide conv of the paper's widths.
Writes bench/results/conv_forms-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import aot_timing  # noqa: E402
import result_files  # noqa: E402
from stt_jax.models import layers  # noqa: E402

FORMS = {
    "native": lambda x, k: layers.conv3d(x, k, (1, 1, 1), "native"),
    "depth_as_batch": lambda x, k: layers.conv3d(x, k, (1, 1, 1), "depth_as_batch"),
    "inference": lambda x, k: layers.conv3d(x, k, (1, 1, 1), layers.DEPTH_TAPS_AS_OUTPUTS),
    "batched_planes": lambda x, k: layers.conv3d_depth_as_batch(x, k, (1, 1, 1)),
    "taps_as_outputs": layers.conv3d_taps_as_outputs,
    "im2col": lambda x, k: layers.conv3d(x, k, (1, 1, 1), "im2col"),
}
TORCH_FORMS = ("torch", "torch_channels_last")
DEFAULT_CONVS = ("2x18x130x130:3x3x3:12-12,2x18x66x66:3x3x3:16-16,"
                 "2x18x34x34:3x3x3:24-24,2x16x132x132:1x5x5:12-2,2x10x66x66:3x3x3:28-28")


def parse_conv(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """'2x18x130x130:3x3x3:12-12' -> (input shape [b, d, h, w, cin],
  kernel shape [kd, kh, kw, cin, cout])."""
  try:
    size, kernel, channels = spec.split(":")
    cin, cout = (int(v) for v in channels.split("-"))
    x = tuple(int(v) for v in size.split("x"))
    k = tuple(int(v) for v in kernel.split("x"))
    if len(x) != 4 or len(k) != 3:
      raise ValueError
  except ValueError:
    raise SystemExit(f"conv_forms: bad conv {spec!r}: want e.g. 2x18x130x130:3x3x3:12-12 "
                     "(input b x d x h x w : kernel : in-out channels)") from None
  return (*x, cin), (*k, cin, cout)


def time_torch(x: np.ndarray, kernel: np.ndarray, probe: np.ndarray, channels_last: bool,
               repeats: int) -> dict:
  """PyTorch's F.conv3d on the same numbers: forward and forward + gradient
  (input and kernel) times, medians of `repeats`, and its output [b, d, h, w, c]."""
  import time  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
  xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()).contiguous(memory_format=fmt)
  kt = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy()).contiguous(memory_format=fmt)
  pt = torch.from_numpy(probe.transpose(0, 4, 1, 2, 3).copy())
  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv3d(xt, kt)
  def forward_and_grad():
    a, k = xt.detach().requires_grad_(), kt.detach().requires_grad_()
    (torch.nn.functional.conv3d(a, k) * pt).sum().backward()
  times = {}
  for name, fn in (("forward_s", forward), ("forward_and_grad_s", forward_and_grad)):
    fn()
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t0)
    times[name] = float(np.median(runs))
  return {**times, "output": forward().numpy().transpose(0, 2, 3, 4, 1)}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--convs", default=DEFAULT_CONVS,
                      help="comma list of b x d x h x w : kd x kh x kw : cin-cout")
  parser.add_argument("--forms", default=",".join(FORMS))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  parser.add_argument("--torch", default="auto", choices=["auto", "off"],
                      help="auto: time PyTorch's conv3d too where it imports")
  args = parser.parse_args(argv)
  forms = [f for f in args.forms.split(",") if f]
  for form in forms:
    if form not in FORMS:
      parser.error(f"unknown form {form!r}: one of {', '.join(FORMS)}")
  peers = TORCH_FORMS if args.torch == "auto" and torch_available() else ()
  convs = [parse_conv(s) for s in args.convs.split(",") if s]
  out = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "repeats": args.repeats, "convs": []}
  path = result_files.results_path("conv_forms", out["device"], args.out_dir)
  print(f"{'conv':34s} {'form':19s} {'forward':>10s} {'fwd+grad':>10s} {'rel. error':>10s}")
  for x_shape, k_shape in convs:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal(k_shape, np.float32) / np.sqrt(np.prod(k_shape[:4])))
    with jax.default_matmul_precision("highest"):
      reference = np.asarray(jax.jit(FORMS["native"])(x, kernel))
    probe = jnp.asarray(rng.standard_normal(reference.shape, np.float32))
    name = "x".join(map(str, x_shape[:4])) + f" {'x'.join(map(str, k_shape[:3]))} " \
        f"{k_shape[3]}->{k_shape[4]}"
    row = {"input": list(x_shape), "kernel": list(k_shape), "forms": {}}
    for form in forms:
      fn = FORMS[form]
      forward = aot_timing.compile_and_time(fn, (x, kernel), args.repeats)
      grad = aot_timing.compile_and_time(  # the probe an argument, not a constant to fold
          jax.grad(lambda a, k, p, fn=fn: jnp.sum(fn(a, k) * p), argnums=(0, 1)),
          (x, kernel, probe), args.repeats)
      error = float(np.abs(np.asarray(forward.outputs) - reference).max()
                    / np.abs(reference).max())
      row["forms"][form] = {"forward_s": forward.step_s, "forward_and_grad_s": grad.step_s,
                            "max_relative_error": error}
      print(f"{name:34s} {form:19s} {forward.step_s * 1e3:8.1f}ms {grad.step_s * 1e3:8.1f}ms "
            f"{error:10.1e}", flush=True)
    for form in peers:
      timed = time_torch(np.asarray(x), np.asarray(kernel), np.asarray(probe),
                         form == "torch_channels_last", args.repeats)
      error = float(np.abs(timed.pop("output") - reference).max() / np.abs(reference).max())
      row["forms"][form] = {**timed, "max_relative_error": error}
      print(f"{name:34s} {form:19s} {timed['forward_s'] * 1e3:8.1f}ms "
            f"{timed['forward_and_grad_s'] * 1e3:8.1f}ms {error:10.1e}", flush=True)
    if peers:  # ours against the faster PyTorch layout (> 1: ours faster)
      best = {k: min(row["forms"][p][k] for p in peers)
              for k in ("forward_s", "forward_and_grad_s")}
      for form in forms:
        timing = row["forms"][form]
        timing["over_torch"] = {k: best[k] / timing[k] for k in best}
      print(f"{'':34s} ours / torch: " + ", ".join(
          f"{f} {row['forms'][f]['over_torch']['forward_s']:.2f}x fwd "
          f"{row['forms'][f]['over_torch']['forward_and_grad_s']:.2f}x both" for f in forms))
    out["convs"].append(row)
    result_files.write_json(path, out, quiet=True)  # after every conv: a cut run keeps its rows
  result_files.announce(path)


if __name__ == "__main__":
  main()
