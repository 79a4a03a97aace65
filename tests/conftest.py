"""Shared fixtures. Two simulated CPU devices for the sharding paths."""

import os
import shutil
import tempfile

# Compiling, not running, is most of this suite's time (hundreds of tiny
# programs): LLVM at -O0 compiles them in about half the time and runs them
# no slower at these shapes. XLA's own (HLO) passes are the same at every
# level, so the programs tested are the ones users run; the numbers may differ
# in the last bits, which no test here pins. A level already in XLA_FLAGS wins.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)
# and what every CPU run gets (stt_jax.backend: XLA's convolutions, not YNNPACK's)
from stt_jax import backend  # noqa: E402  (imports no JAX)
TEST_XLA_FLAGS += backend.DEFAULT_XLA_FLAGS["cpu"]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a command-line run a test starts: `devices` CPU devices,
  compiled as this suite compiles."""
  return " ".join((f"--xla_force_host_platform_device_count={devices}", *TEST_XLA_FLAGS))


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# a flag already set (here: in the environment) keeps its value, as for a run
os.environ["XLA_FLAGS"] = backend.merged_xla_flags(os.environ["XLA_FLAGS"], "cpu",
                                                   " ".join(TEST_XLA_FLAGS))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the command-line runs they start) compile the same tiny
# programs; a compilation cache fresh for each session shares them (whole
# suite on the 2-core dev machine: 13 min 13 s without, 9 min 47 s with). It
# changes no result: a cache hit is the same executable.
# (not setdefault(..., mkdtemp()): that makes a folder in every xdist worker,
# which inherits the controller's, and leaks it)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="stt_jax_test_compile_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402

from stt_jax.data import synthetic  # noqa: E402

SMALL_SPEC = synthetic.SyntheticSpec(shape=(16, 96, 96), num_mitochondria=14,
                                     num_vesicles=30, num_dark_blobs=6)


@pytest.fixture(scope="session")
def small_volume():
  """(image uint8, labels uint32) [16, 96, 96], generated once per session."""
  return synthetic.generate(SMALL_SPEC, seed=3)


@pytest.fixture(scope="session")
def small_zarr(tmp_path_factory, small_volume):
  """Paths {"image", "label"} of the small volume written as zarr."""
  from stt_jax.data import sources
  directory = tmp_path_factory.mktemp("small")
  image, labels = small_volume
  paths = {"image": str(directory / "image.zarr"), "label": str(directory / "labels.zarr")}
  sources.write_array(paths["image"], image)
  sources.write_array(paths["label"], labels)
  return paths


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if hasattr(session.config, "workerinput"):
    return  # an xdist worker: the others may still compile into the shared cache
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(cache).startswith("stt_jax_test_compile_cache_"):
    shutil.rmtree(cache, ignore_errors=True)


SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                           "data"))


def shared_data(*parts: str) -> str:
  """A path under ../shared/data (real EM data, read in place, never
  committed); skips the test, saying why, where that data is absent."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f"real EM data not present: {path} (see ../shared/data/README.md)")
  return path


@pytest.fixture(scope="session")
def urocell_volumes():
  """{name: instance labels [z, y, x] int} of the five UroCell sub-volumes."""
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  folder = shared_data("urocell", "mito", "instance")
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".nii.gz"):
      vol = sources.open_volume(os.path.join(folder, name))
      out[name[:-len(".nii.gz")]] = vol.read([0, 0, 0], vol.shape)
  assert len(out) == 5, f"expected 5 UroCell volumes in {folder}, found {sorted(out)}"
  return out
