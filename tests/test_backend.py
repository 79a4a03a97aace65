"""config.backend: XLA flags per backend, dtype choice, bad values, start-up line."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax import backend
from stt_jax import config as config_lib
from stt_jax.errors import UserError
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_FLAG = backend.DEFAULT_XLA_FLAGS["gpu"][0]


def test_xla_flags_per_backend_and_the_environment_wins():
  assert backend.merged_xla_flags("", "cpu", "") == backend.YNN_CPU_FLAG
  assert backend.merged_xla_flags("", "tpu", "") == ""
  assert backend.merged_xla_flags("", "cuda", "") == GPU_FLAG
  assert backend.merged_xla_flags("", "rocm", "--xla_dump_to=/tmp/d") == \
      f"{GPU_FLAG} --xla_dump_to=/tmp/d"
  # platform not known yet: every backend's defaults (XLA:CPU ignores GPU ones)
  assert GPU_FLAG in backend.merged_xla_flags("", "", "")
  # a flag the user exported keeps its value; others are appended once
  name = GPU_FLAG.split("=")[0]
  present = f"--xla_force_host_platform_device_count=2 {name}=false"
  merged = backend.merged_xla_flags(present, "gpu", f"{name}=true --xla_dump_to=/x")
  assert merged == f"{present} --xla_dump_to=/x"
  # the config's own value of a default flag replaces the default
  ynn_reductions_on = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
  assert backend.merged_xla_flags("", "cpu", ynn_reductions_on) == ynn_reductions_on


def test_ynnpack_convolutions_off_on_a_cpu_where_jaxlib_has_the_flag():
  # an older XLA aborts on a flag it does not know: none added there
  assert backend.default_xla_flags((0, 9))["cpu"] == ()
  assert backend.default_xla_flags((0, 10))["cpu"] == (backend.YNN_CPU_FLAG,)
  assert backend.default_xla_flags((0, 12))["cpu"] == (backend.YNN_CPU_FLAG,)
  # the user's own setting of the flag wins
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
  assert backend.merged_xla_flags(mine, "cpu", "") == mine
  on = lambda flags: backend.ynn_convolutions_on({"XLA_FLAGS": flags})
  assert not on(backend.YNN_CPU_FLAG)
  assert not on("--xla_cpu_experimental_ynn_fusion_type=")  # every library fusion off
  assert not on("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")
  assert on(mine) and on("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
  assert on(f"{backend.YNN_CPU_FLAG} {mine}")  # the last one counts
  assert on("--xla_force_host_platform_device_count=2")  # jaxlib's default (0.10.2 pinned)
  environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert backend.apply_default_xla_flags(environ) == (
      f"--xla_force_host_platform_device_count=2 {backend.YNN_CPU_FLAG}")
  assert environ["XLA_FLAGS"].endswith(backend.YNN_CPU_FLAG)


_COMPILED_CONV2D = """
import jax, jax.numpy as jnp
from jax import lax
x, w = jnp.zeros((2, 16, 16, 24)), jnp.zeros((3, 3, 24, 24))
conv = lambda a, k: lax.conv_general_dilated(
    a, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print("__ynn" in jax.jit(conv).lower(x, w).compile().as_text())
"""

# the deformable conv's bilinear blend: a weighted sum over the 4 corners
_COMPILED_REDUCTION = """
import jax, jax.numpy as jnp
x, w = jnp.zeros((4096, 4, 16)), jnp.zeros((4096, 4))
blend = lambda a, b: jnp.sum(a * b[:, :, None], axis=1)
print("__ynn" in jax.jit(blend).lower(x, w).compile().as_text())
"""


@pytest.mark.parametrize("program", [_COMPILED_CONV2D, _COMPILED_REDUCTION],
                         ids=["conv2d_24_wide", "corner_sum"])
def test_the_flag_reaches_xla_and_convs_and_reductions_are_xlas_own(program):
  """With the CPU defaults no YNNPACK fusion in the compiled program; without
  the flag jaxlib 0.10.2 puts each in one (so the check can fail: a jaxlib
  that ignores the flag shows up here)."""
  found = {}
  for case, ynn_flag in (("defaults", backend.YNN_CPU_FLAG), ("jaxlib's", "")):
    flags = " ".join([f for f in os.environ["XLA_FLAGS"].split()
                      if not f.startswith("--xla_cpu_experimental_ynn_fusion_type")]
                     + [ynn_flag])
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=flags))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found[case] = proc.stdout.split()[-1]
  assert found == {"defaults": "False", "jaxlib's": "True"}


def test_compute_dtype_auto_is_float32_on_cpu():
  assert backend.compute_dtype("auto") == jnp.float32
  assert backend.compute_dtype("bfloat16") == jnp.bfloat16


@pytest.mark.parametrize("key,value,match", [
    ("platform", "cpus", "config.backend.platform"),
    ("matmul_precision", "fast", "config.backend.matmul_precision"),
    ("xla_flags", 3, "config.backend.xla_flags"),
    ("heap_arenas", -1, "config.backend.heap_arenas"),
    ("heap_arenas", "two", "config.backend.heap_arenas"),
    ("compilation_cache", "", "config.backend.compilation_cache: must be auto, off"),
    ("compilation_cache_gb", 0.0, "config.backend.compilation_cache_gb"),
])
def test_bad_backend_values_are_named(key, value, match):
  cfg = config_lib.default_config()
  with cfg.backend.ignore_type():
    cfg.backend[key] = value
  with pytest.raises(UserError, match=match):
    backend.configure(cfg.backend)


def test_bad_attention_implementation_is_named():
  cfg = config_lib.default_config()
  cfg.model.attention.implementation = "flash"
  with pytest.raises(UserError, match="model.attention.implementation"):
    config_lib.validate(cfg)
  for ok in ("auto", "xla", "heads_major", "cudnn", "pallas"):
    cfg.model.attention.implementation = ok
    cfg.model.attention.temporal_implementation = ok
    config_lib.validate(cfg)
  cfg.model.attention.temporal_implementation = "flash"
  with pytest.raises(UserError, match="model.attention.temporal_implementation"):
    config_lib.validate(cfg)
  cfg.model.attention.temporal_implementation = "auto"
  cfg.model.attention.chunks = 0
  with pytest.raises(UserError, match="model.attention.chunks"):
    config_lib.validate(cfg)


def test_pallas_attention_off_a_gpu_or_on_several_devices_is_pointed_out():
  import jax  # pylint: disable=g-import-not-at-top
  assert backend.attention_notes("auto") == []
  notes = backend.attention_notes("pallas")  # tests run on CPUs
  assert len(notes) == 1 and "interpreter" in notes[0] and "use auto" in notes[0]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  several = backend.attention_notes("pallas", mesh)
  assert len(several) == (2 if mesh.devices.size > 1 else 1)
  assert mesh.devices.size == 1 or "partitioning" in several[1]


def test_bad_normalisation_is_named():
  cfg = config_lib.default_config()
  cfg.model.norm = "batch"
  with pytest.raises(UserError, match="config.model.norm: must be one of"):
    config_lib.validate(cfg)
  cfg.model.norm = "group"
  config_lib.validate(cfg)  # 4 groups divide (28, 36, 48, 64, 80)
  cfg.model.norm_groups = 8
  with pytest.raises(UserError, match=r"config.model.norm_groups: 8 must divide every width"):
    config_lib.validate(cfg)


def test_bad_input_scale_is_named():
  cfg = config_lib.default_config()
  for bad in ((1, 2), (1, 0, 2), (1, 1.5, 1.5)):
    cfg.model.input_scale = bad
    with pytest.raises(UserError, match=r"config.model.input_scale: needs 3 whole factors"):
      config_lib.validate(cfg)
  cfg.model.input_scale = (1, 2, 2)
  config_lib.validate(cfg)


def _main(*flags, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                         *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def test_a_platform_this_machine_lacks_is_one_line(tmp_path):
  out = _main(f"--workdir={tmp_path / 'r'}", "--config.backend.platform=tpu")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot start JAX backend"), out.stderr
  assert "platform='tpu'" in lines[0]
  assert not os.path.exists(tmp_path / "r")


def test_start_line_names_backend_devices_processes_and_mesh(tmp_path):
  """export of a run that does not exist: the start-up line comes first, then
  the one-line refusal."""
  out = _main(f"--workdir={tmp_path}", "--mode=export",
              env_extra={"XLA_FLAGS": xla_flags(2)})
  first = out.stdout.splitlines()[0]
  assert first == ("backend cpu: 2 device(s) (cpu) in 1 process(es), 2 local, "
                   "mesh {'data': 2, 'model': 1}"), out.stdout + out.stderr
  assert out.returncode == 2 and "holds no checkpoints" in out.stderr


def test_the_compilation_cache_folder_auto_off_or_given(tmp_path):
  environ = {"XDG_CACHE_HOME": str(tmp_path)}
  auto = backend.compilation_cache_dir("auto", environ)
  assert os.path.dirname(auto) == str(tmp_path / "stt_jax" / "xla")
  assert auto == backend.compilation_cache_dir("auto", environ)  # one folder per CPU kind
  assert backend.compilation_cache_dir("auto", {"HOME": "/h"}).startswith(
      os.path.expanduser("~/.cache/stt_jax/xla/"))
  # JAX reads $JAX_COMPILATION_CACHE_DIR itself: left to it
  assert backend.compilation_cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "/c"}) is None
  assert backend.compilation_cache_dir("off", environ) is None
  assert backend.compilation_cache_dir(str(tmp_path / "mine"), environ) == str(tmp_path / "mine")
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  cfg = config_lib.default_config()
  cfg.backend.compilation_cache = str(blocked / "cache")
  with pytest.raises(UserError, match=r"config.backend.compilation_cache: cannot write to "
                                      r".*a_file/cache; give a writable folder, or off"):
    backend.configure(cfg.backend)


_COMPILE_TWICE = """
import sys, jax, jax.numpy as jnp
from stt_jax import backend, config
cfg = config.default_config()
backend.configure(cfg.backend)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.0)
print(float(f(jnp.arange(64.0).reshape(8, 8)).sum()))
"""


def test_a_second_run_loads_what_the_first_compiled(tmp_path):
  """With auto and no $JAX_COMPILATION_CACHE_DIR: the first run writes the
  program under ~/.cache (here $XDG_CACHE_HOME), the second reads it (the
  bounded cache stamps an entry's access time on each read, never on a
  repeated write) and computes the same."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = lambda: subprocess.run([sys.executable, "-c", _COMPILE_TWICE], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
  first = run()
  assert first.returncode == 0, first.stderr
  folder = backend.compilation_cache_dir("auto", env)
  entries = lambda: sorted(n for n in os.listdir(folder) if n.endswith("-cache"))
  written = entries()
  assert any(n.startswith("jit__lambda") for n in written), written
  stamp = lambda: {n: (pathlib.Path(folder) / n).read_bytes()
                   for n in os.listdir(folder) if n.endswith("-atime")}
  before = stamp()
  assert set(before) == {n.replace("-cache", "-atime") for n in written}  # bounded: stamped
  second = run()
  assert second.returncode == 0 and second.stdout == first.stdout, second.stderr
  assert entries() == written
  after = stamp()
  assert any(after[n] != before[n] for n in before if n.startswith("jit__lambda"))
