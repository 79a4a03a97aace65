"""bench/vs_torch.py's worker protocol: rows saved as they come, no waiting
on a worker (or its children) after its result."""

import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top

# a stand-in worker: a child that keeps the pipe open (as Inductor's compile
# workers do), two rows, its result, then a long shutdown
_LINGERING = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
for i in range(2):
  print("ROW " + json.dumps({"i": i}), flush=True)
print("RESULT " + json.dumps({"done": True}), flush=True)
time.sleep(60)
"""


def _child_pid(captured: str) -> int:
  return int(next(l for l in captured.splitlines() if l.startswith("child")).split()[1])


def test_rows_arrive_one_by_one_and_a_lingering_worker_is_stopped(monkeypatch, capsys):
  monkeypatch.setattr(vs_torch, "EXIT_GRACE_S", 1)
  rows = []
  start = time.monotonic()
  result = vs_torch.read_worker([sys.executable, "-c", _LINGERING], on_row=rows.append)
  took = time.monotonic() - start
  os.kill(_child_pid(capsys.readouterr().out), signal.SIGKILL)
  assert result == {"done": True}
  assert rows == [{"i": 0}, {"i": 1}]
  assert took < 30, took  # neither the worker's sleep nor its child's pipe waited on


def test_a_worker_cut_off_keeps_the_rows_it_sent(capsys):
  script = ("import json, os\n"
            "print('ROW ' + json.dumps({'i': 0}), flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
  rows = []
  with pytest.raises(RuntimeError, match="failed"):
    vs_torch.read_worker([sys.executable, "-c", script], on_row=rows.append)
  assert rows == [{"i": 0}]
  assert "ROW" not in capsys.readouterr().out  # rows go to on_row, not the log


def test_a_worker_that_fails_after_its_result_is_an_error():
  script = "print('RESULT ' + '{}', flush=True)\nraise SystemExit(3)\n"
  with pytest.raises(RuntimeError, match="exit 3"):
    vs_torch.read_worker([sys.executable, "-c", script])


def test_other_output_is_passed_through(capsys):
  script = "print('compiling ...', flush=True)\nprint('RESULT ' + '{\"a\": 1}', flush=True)\n"
  assert vs_torch.read_worker([sys.executable, "-c", script]) == {"a": 1}
  assert "compiling ..." in capsys.readouterr().out


def test_overrides_reach_our_config_and_typos_are_refused():
  cfg, _ = vs_torch._bench_setup(
      (8, 64, 64), 2, "float32", model="stt", build=False,
      overrides=("model.attention.deform_gradient=tap_major", "model.attention.kv_grid=8",
                 "model.attention.implementation=xla"))
  assert cfg.model.attention.deform_gradient == "tap_major"
  assert cfg.model.attention.kv_grid == 8 and cfg.model.attention.implementation == "xla"
  for bad in ("model.attention.deform_sorted=True", "model.attention", "nope.kv_grid=1"):
    with pytest.raises(SystemExit, match="existing config key"):
      vs_torch._bench_setup((8, 64, 64), 2, "float32", model="stt", build=False,
                            overrides=(bad,))
  with pytest.raises(SystemExit, match="config.model.attention.deform_gradient: must be one of"):
    vs_torch._bench_setup((8, 64, 64), 2, "float32", model="stt", build=False,
                          overrides=("model.attention.deform_gradient=sort",))


def test_overrides_travel_to_the_worker_and_into_the_file_name(monkeypatch, tmp_path):
  specs = []

  def fake_spawn(argv, env=None):
    del env
    spec = __import__("json").loads(argv[1].partition("=")[2])
    specs.append(spec)
    return {"device": "Fake GPU", "platform": "gpu", "devices": 1, "jax": "0",
            "matmul_bf16_flops": None, "rows": [{"framework": "jax", "step_s": 1.0}]}

  monkeypatch.setattr(vs_torch, "_spawn", fake_spawn)
  monkeypatch.setattr(vs_torch, "ROOT", str(tmp_path))
  monkeypatch.setitem(sys.modules, "torch", None)  # no peer: ours only
  monkeypatch.setattr(vs_torch, "_print", lambda *a: None)
  vs_torch.run(("train",), ["tiny"], ("float32",), 1, models=("stt",), check="skip",
               flops="skip", overrides=("model.attention.deform_gradient=tap_major",))
  assert specs[0]["overrides"] == ["model.attention.deform_gradient=tap_major"]
  assert os.listdir(tmp_path / "bench" / "results") == [
      "vs_torch-train-stt-deform_gradient_tap_major-fake_gpu.json"]


def test_no_modes_times_ours_alone_and_chunks_name_the_file(monkeypatch, tmp_path):
  """--modes= spawns no peer worker (and no check) even where PyTorch is
  importable; a chunked STT-UNET's rows go to their own file."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  workers = []

  def fake_spawn(argv, env=None, on_row=None):
    del env, on_row
    workers.append(argv[0])
    return {"device": "Fake GPU", "platform": "gpu", "devices": 1, "jax": "0",
            "matmul_bf16_flops": None, "rows": [{"framework": "jax", "step_s": 1.0}]}

  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "torch" else real_find_spec(name, *a))
  monkeypatch.setattr(vs_torch, "_spawn", fake_spawn)
  monkeypatch.setattr(vs_torch, "ROOT", str(tmp_path))
  monkeypatch.setattr(vs_torch, "_print", lambda *a: None)
  vs_torch.run(("train",), ["tiny"], ("float32",), 1, modes=("",), models=("stt",), chunks=4,
               flops="skip")
  assert workers == ["--worker=jax"]
  assert os.listdir(tmp_path / "bench" / "results") == [
      "vs_torch-train-stt-chunks_4-fake_gpu.json"]


def _torch_importable(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "torch" else real_find_spec(name, *a))


def test_overrides_reach_the_peer_and_its_check(monkeypatch, tmp_path):
  """model.norm=group changes both networks: the check and the peer's timing
  worker get the override as our worker does."""
  import json  # pylint: disable=g-import-not-at-top
  specs = {}

  def fake_spawn(argv, env=None, on_row=None):
    del env, on_row
    specs[argv[0]] = json.loads(argv[1].partition("=")[2])
    if argv[0] == "--worker=check":
      return {"baseline 8x64x64": {"relative": 1e-7, "gradient_relative": 1e-8}}
    return {"device": "Fake GPU", "platform": "gpu", "devices": 1, "jax": "0",
            "matmul_bf16_flops": None, "rows": [{"framework": "jax", "step_s": 1.0}]}

  _torch_importable(monkeypatch)
  monkeypatch.setattr(vs_torch, "_spawn", fake_spawn)
  monkeypatch.setattr(vs_torch, "ROOT", str(tmp_path))
  monkeypatch.setattr(vs_torch, "_print", lambda *a: None)
  vs_torch.run(("train",), ["tiny"], ("float32",), 1, modes=("eager",), models=("baseline",),
               flops="skip", overrides=("model.norm=group",))
  assert set(specs) == {"--worker=check", "--worker=jax", "--worker=torch"}
  assert all(spec["overrides"] == ["model.norm=group"] for spec in specs.values())
  assert specs["--worker=check"]["models"] == ["baseline"]


def test_a_network_the_peer_cannot_build_is_refused_before_anything_runs(monkeypatch):
  spawned = []
  _torch_importable(monkeypatch)
  monkeypatch.setattr(vs_torch, "_spawn", lambda argv, **kw: spawned.append(argv))
  with pytest.raises(SystemExit, match="^baseline: the PyTorch peer down-samples in-plane only"):
    vs_torch.run(("train",), ["tiny"], ("float32",), 1, modes=("eager",),
                 overrides=("model.downsample_z=(True, False, False, False)",))
  assert not spawned


def test_flops_are_counted_with_each_rows_overrides(monkeypatch):
  seen = []

  def fake_spawn(argv, env=None, on_row=None):
    del env, on_row
    seen.extend(__import__("json").loads(argv[1].partition("=")[2]))
    return {"flops": [2.0e9] * len(seen)}

  monkeypatch.setattr(vs_torch, "_spawn", fake_spawn)
  row = {"framework": "jax", "kind": "train", "patch": [8, 64, 64], "batch": 2,
         "dtype": "float32", "model": "baseline", "step_s": 1.0,
         "overrides": ["model.widths=(16, 24, 32, 48, 64)"]}
  result = {"rows": [row], "device": "cpu", "devices": 1}
  vs_torch.add_flops(result)
  assert seen[0]["overrides"] == ["model.widths=(16, 24, 32, 48, 64)"]
  assert row["flops_per_voxel"] == 2.0e9 / (2 * 8 * 64 * 64)


def test_check_only_writes_its_figures(monkeypatch, tmp_path):
  """--check=only leaves a results file named by models and overrides, as the
  timed runs do, so a README figure of the check has a file behind it."""
  import json  # pylint: disable=g-import-not-at-top

  def fake_spawn(argv, env=None, on_row=None):
    del env, on_row
    assert argv[0] == "--worker=check"
    return {"baseline 8x64x64": {"relative": 5e-6, "gradient_relative": 1e-7}}

  _torch_importable(monkeypatch)
  monkeypatch.setattr(vs_torch, "_spawn", fake_spawn)
  monkeypatch.setattr(vs_torch, "ROOT", str(tmp_path))
  vs_torch.run(("train",), ["tiny"], ("float32",), 1, modes=("eager",), models=("baseline",),
               check="only", overrides=("model.norm=group",))
  (name,) = os.listdir(tmp_path / "bench" / "results")
  assert name == "vs_torch-check-baseline-norm_group-cpu.json"
  saved = json.loads((tmp_path / "bench" / "results" / name).read_text())
  assert saved["equivalence"]["baseline 8x64x64"]["relative"] == 5e-6
  assert saved["overrides"] == ["model.norm=group"]
