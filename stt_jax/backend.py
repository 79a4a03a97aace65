"""Backend settings of a run (config section `backend`) and its start-up log.

`configure` must run before anything asks JAX for devices: the platform list
and XLA_FLAGS are read once, when the first backend starts. The per-backend
defaults ("auto") live here so that one config runs unchanged on a CPU, CUDA
or ROCm GPUs and TPUs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform

from stt_jax import memory_use
from stt_jax.errors import UserError

PLATFORMS = ("auto", "cpu", "cuda", "rocm", "gpu", "tpu")
MATMUL_PRECISIONS = ("default", "high", "highest")

# XLA:CPU hands 2D convolutions to YNNPACK by default (jaxlib 0.10: the
# default library fusions are individual_convolution, individual_dot and
# reduce). On the 2-core EPYC (AVX2) these run 4-8x slower than XLA's own
# (Eigen) convolutions, forward and gradient, and the CPU form of every 3D
# conv here is a sum of 2D convs: the baseline's train step at widths 28-80
# took 2.1 s with them, 0.9 s without (docs/architecture.md "YNNPACK's
# convolutions on a CPU"). Its reductions go too (session 46): the softmax
# and deformable-conv sums it took ran slower than XLA's own loops (the
# binned STT-UNET's forward 1.31x faster without, forward + gradient 1.14x;
# the baseline's forward 1.29x, but forward + gradient 0.90x: bench/
# ynn_reductions.py, docs/architecture.md "Unrolled keys, and YNNPACK's
# reductions off, on CPUs"). Its matrix products stay. The flag exists from
# jaxlib 0.10 (an older XLA would abort on a flag it does not know).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_CPU_FLAG = f"{YNN_FUSION_FLAG}=-individual_convolution,-reduce"
YNN_FLAG_SINCE = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def default_xla_flags(jaxlib_version: tuple[int, ...] | None = None) -> dict[str, tuple[str, ...]]:
  """XLA flags added on each backend unless the user's XLA_FLAGS or the
  config give the same flag. GPU: the latency-hiding scheduler overlaps the
  gradient all-reduce of data parallel training with the backward pass.
  CPU: XLA's own convolutions and reductions instead of YNNPACK's (above)."""
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  return {
      "gpu": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
      "cpu": (YNN_CPU_FLAG,) if version >= YNN_FLAG_SINCE else (),
      "tpu": (),
  }


DEFAULT_XLA_FLAGS = default_xla_flags()


def _check(backend_cfg) -> None:
  def need(ok: bool, key: str, message: str) -> None:
    if not ok:
      raise UserError(f"config.backend.{key}: {message}")
  need(backend_cfg.platform in PLATFORMS, "platform",
       f"must be one of {PLATFORMS}, got {backend_cfg.platform!r}")
  need(backend_cfg.matmul_precision in MATMUL_PRECISIONS, "matmul_precision",
       f"must be one of {MATMUL_PRECISIONS}, got {backend_cfg.matmul_precision!r}")
  need(isinstance(backend_cfg.xla_flags, str), "xla_flags",
       f"must be a string of flags, got {backend_cfg.xla_flags!r}")
  arenas = backend_cfg.heap_arenas
  need(isinstance(arenas, int) and not isinstance(arenas, bool) and arenas >= 0,
       "heap_arenas", f"must be an integer >= 0 (0: glibc's default), got {arenas!r}")
  need(isinstance(backend_cfg.compilation_cache, str) and backend_cfg.compilation_cache,
       "compilation_cache", f"must be auto, off or a folder, got "
       f"{backend_cfg.compilation_cache!r}")
  need(backend_cfg.compilation_cache_gb > 0, "compilation_cache_gb",
       f"must be > 0, got {backend_cfg.compilation_cache_gb}")


def _family(platform: str) -> str:
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def merged_xla_flags(present: str, platforms: str, extra: str) -> str:
  """XLA_FLAGS for a run on `platforms` (JAX_PLATFORMS syntax; "" or "auto":
  not known yet, so every backend's defaults, which the others ignore): the
  defaults, then `extra` (config.backend.xla_flags, whose flags replace a
  default of the same name); a flag already in `present` (the user's
  environment) keeps its value there."""
  families = {_family(p) for p in platforms.split(",") if p and p != "auto"}
  families = families or set(DEFAULT_XLA_FLAGS)
  # the config's flags replace a default of the same name (its value, not ours)
  mine = {f.split("=")[0] for f in extra.split()}
  flags = [f for fam in sorted(families) for f in DEFAULT_XLA_FLAGS.get(fam, ())
           if f.split("=")[0] not in mine]
  flags += extra.split()
  kept = present.split()
  names = {f.split("=")[0] for f in kept}
  for f in flags:
    name = f.split("=")[0]
    if name not in names:
      kept.append(f)
      names.add(name)
  return " ".join(kept)


def apply_default_xla_flags(environ=os.environ) -> str:
  """Adds the defaults of the backends in $JAX_PLATFORMS (every backend's
  when unset) to $XLA_FLAGS, as `configure` does for a run: for programs
  that start JAX without a config (benchmarks, the test suite). Call it
  before the first backend starts; returns the new XLA_FLAGS."""
  environ["XLA_FLAGS"] = merged_xla_flags(environ.get("XLA_FLAGS", ""),
                                          environ.get("JAX_PLATFORMS", ""), "")
  return environ["XLA_FLAGS"]


def ynn_convolutions_on(environ=os.environ) -> bool:
  """Whether XLA:CPU hands 2D convolutions to YNNPACK in this process: the
  last --xla_cpu_experimental_ynn_fusion_type in $XLA_FLAGS, else jaxlib's
  default (on from jaxlib 0.10)."""
  setting = None
  for flag in environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == YNN_FUSION_FLAG:
      setting = value
  if setting is None:
    return _jaxlib_version() >= YNN_FLAG_SINCE
  types = [t.strip().lower() for t in setting.split(",") if t.strip()]
  if any(t.startswith(("+", "-")) for t in types):  # changes to jaxlib's default set
    return "-individual_convolution" not in types
  return "individual_convolution" in types


def _cpu_key() -> str:
  """This host's architecture and a hash of its CPU feature flags: cached
  executables hold host code built for the CPU that compiled them, and a
  home folder shared by a cluster's nodes would otherwise hand one kind of
  node's programs to another."""
  flags = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  return f"{platform.machine() or 'cpu'}-{hashlib.sha1(flags.encode()).hexdigest()[:10]}"


def compilation_cache_dir(setting: str, environ=os.environ) -> str | None:
  """The folder config.backend.compilation_cache names, or None: off, or
  left to JAX (auto while $JAX_COMPILATION_CACHE_DIR is set, which JAX reads
  itself)."""
  if setting == "off":
    return None
  if setting != "auto":
    return os.path.abspath(os.path.expanduser(setting))
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "stt_jax", "xla", _cpu_key())


def _use_compilation_cache(backend_cfg, jax) -> None:
  directory = compilation_cache_dir(backend_cfg.compilation_cache)
  if directory is None:
    return
  try:
    os.makedirs(directory, exist_ok=True)
    writable = os.access(directory, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  # JAX bounds the cache under a file lock, with the filelock package
  locking = importlib.util.find_spec("filelock") is not None
  if not (writable and locking):
    if backend_cfg.compilation_cache == "auto":
      return  # a read-only home, a bare environment: compile every time
    raise UserError("config.backend.compilation_cache: " + (
        f"cannot write to {directory}; give a writable folder, or off" if not writable
        else "needs the filelock package (requirements.txt); install it, or off"))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_compilation_cache_max_size",
                    int(backend_cfg.compilation_cache_gb * 2**30))


def configure(backend_cfg) -> None:
  """Applies config.backend to the process (before the first JAX backend
  starts; raises UserError on a bad value or when it is too late)."""
  _check(backend_cfg)
  # first: arenas already handed to running threads stay
  memory_use.limit_heap_arenas(backend_cfg.heap_arenas)
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = xla_bridge.backends_are_initialized()
  if backend_cfg.platform != "auto":
    if started:
      raise UserError("config.backend.platform must be set before JAX starts a backend")
    jax.config.update("jax_platforms", backend_cfg.platform)
  present = os.environ.get("XLA_FLAGS", "")
  platforms = (backend_cfg.platform if backend_cfg.platform != "auto"
               else os.environ.get("JAX_PLATFORMS", ""))
  merged = merged_xla_flags(present, platforms, backend_cfg.xla_flags)
  if merged != present:
    if started:
      raise UserError("config.backend.xla_flags must be set before JAX starts a backend")
    os.environ["XLA_FLAGS"] = merged
  if backend_cfg.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", backend_cfg.matmul_precision)
  _use_compilation_cache(backend_cfg, jax)


def start(backend_cfg) -> None:
  """Starts the backend now, turning a platform this machine lacks into one line."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.devices()
  except RuntimeError as e:
    raise UserError(f"cannot start JAX backend (config.backend.platform="
                    f"{backend_cfg.platform!r}, JAX_PLATFORMS="
                    f"{os.environ.get('JAX_PLATFORMS', '')!r}): "
                    f"{str(e).splitlines()[0]}") from e


def compute_dtype(name: str):
  """model.compute_dtype -> a jnp dtype; 'auto' is bfloat16 where the
  hardware has fast bfloat16 matrix units (GPU, TPU) and float32 on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return jnp.dtype(name)


def attention_notes(implementation: str, mesh=None) -> list[str]:
  """What model.attention.implementation=pallas means on this machine, one
  line per caveat (none on one GPU, where it is meant to run)."""
  import jax  # pylint: disable=g-import-not-at-top
  if implementation != "pallas":
    return []
  notes = []
  if jax.default_backend() != "gpu":
    notes.append("model.attention.implementation=pallas: no GPU here, so Pallas' "
                 "interpreter runs the fused attention (right numbers, far slower); "
                 "use auto off GPUs")
  if mesh is not None and mesh.devices.size > 1:
    notes.append("model.attention.implementation=pallas: the fused attention has no "
                 "partitioning rule yet, so each device may run it on the whole batch; "
                 "use auto with several devices")
  return notes


def describe(mesh=None) -> str:
  """One line: backend, device kinds, processes, local devices, mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  text = (f"backend {jax.default_backend()}: {len(devices)} device(s) "
          f"({', '.join(kinds)}) in {jax.process_count()} process(es), "
          f"{jax.local_device_count()} local")
  if mesh is not None:
    text += f", mesh {dict(mesh.shape)}"
  return text
