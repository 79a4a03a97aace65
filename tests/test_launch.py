"""launch/: every script parses (bash -n) and its --dry-run prints the command
each process would run; the container recipes pin the project's jax."""

import glob
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))
MAIN = re.compile(r"-m stt_jax\.main --config=configs/demo\.py --workdir=(\S+)")


def _run(script, *args, env=None):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=ROOT,
                        env=dict(os.environ, **(env or {})), capture_output=True,
                        text=True, timeout=60)


def test_there_are_scripts_for_every_way_to_run():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"local.sh", "processes.sh", "slurm.sbatch", "tpu_pod.sh", "container.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
  out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script,args", [
    ("local.sh", []), ("processes.sh", ["2"]), ("slurm.sbatch", []),
    ("tpu_pod.sh", ["tpu", "zone"]), ("container.sh", ["cuda"]),
    ("segment_parts.sbatch", ["4"]), ("segment_parts.sbatch", ["x", "configs/demo.py"])])
def test_missing_arguments_print_usage(script, args):
  out = _run(script, "--dry-run", *args)
  assert out.returncode == 2 and out.stderr.startswith("usage:"), out.stderr


def test_local_dry_run_and_resume_of_an_existing_run(tmp_path):
  out = _run("local.sh", "--dry-run", "configs/demo.py", str(tmp_path), "--quiet")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().endswith(
      f"-m stt_jax.main --config=configs/demo.py --workdir={tmp_path} --quiet")
  (tmp_path / "stt_jax_run.json").write_text("{}")
  out = _run("local.sh", "--dry-run", "configs/demo.py", str(tmp_path), "--quiet")
  assert f"--workdir={tmp_path} --resume --quiet" in out.stdout
  out = _run("local.sh", "--dry-run", "configs/demo.py", str(tmp_path), "--overwrite")
  assert "--resume" not in out.stdout


def test_processes_dry_run_one_coordinator_distinct_ids():
  # the caller's device count gives way to DEVICES_PER_PROCESS; its other XLA flags stay
  out = _run("processes.sh", "--dry-run", "3", "configs/demo.py", "runs/x",
             "--config.train.steps=5",
             env={"PORT": "23456", "DEVICES_PER_PROCESS": "2",
                  "XLA_FLAGS": "--xla_force_host_platform_device_count=7 --xla_dump_to=/tmp/d"})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith(f"process {i} of 3: ")
    words = shlex.split(line[len(f"process {i} of 3: "):])
    assert words[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                         "--xla_dump_to=/tmp/d"], line
    assert MAIN.search(line) and "--config.train.steps=5" in line
    assert line.endswith(f"--coordinator_address=localhost:23456 --num_processes=3 "
                         f"--process_id={i}")
  gpus = _run("processes.sh", "--dry-run", "2", "configs/demo.py", "runs/x",
              env={"GPUS_PER_PROCESS": "4"}).stdout.splitlines()
  assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in gpus[0]
  assert "CUDA_VISIBLE_DEVICES=4,5,6,7 HIP_VISIBLE_DEVICES=4,5,6,7 " in gpus[1]


def test_slurm_dry_run_follows_the_sbatch_header():
  header = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
  nodes = int(re.search(r"#SBATCH --nodes=(\d+)", header).group(1))
  per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", header).group(1))
  out = _run("slurm.sbatch", "--dry-run", "configs/demo.py", "runs/x")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0] == f"srun --kill-on-bad-exit=1 over {nodes} node(s) x {per_node} task(s):"
  total = nodes * per_node
  assert len(lines) == 1 + total
  for p, line in enumerate(lines[1:]):
    assert line.startswith(f"process {p} of {total}: SLURM_PROCID={p} SLURM_NTASKS={total} ")
    assert MAIN.search(line)
  # inside an allocation the job's own sizes count
  out = _run("slurm.sbatch", "--dry-run", "configs/demo.py", "runs/x",
             env={"SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "2"})
  assert len(out.stdout.strip().splitlines()) == 1 + 6


def test_segment_parts_dry_run_and_array_task_numbering(tmp_path):
  flags = ["--weights=w", "--input=im.zarr", "--output=/shared/seg"]
  out = _run("segment_parts.sbatch", "--dry-run", "3", "configs/demo.py", *flags)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith(f"task {i} of 3: ")
    assert line.endswith("-m stt_jax.main --config=configs/demo.py --mode=segment "
                         f"--weights=w --input=im.zarr --output=/shared/seg --part={i}/3")
  # as an array task (--array=1-4, task 3): part 2 of 4, the command exec'd
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\necho "ran: $*"\n')
  fake.chmod(0o755)
  env = {"PYTHON": str(fake), "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
         "SLURM_ARRAY_TASK_COUNT": "4"}
  out = _run("segment_parts.sbatch", "configs/demo.py", *flags, env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == (
      "ran: -u -m stt_jax.main --config=configs/demo.py --mode=segment --weights=w "
      "--input=im.zarr --output=/shared/seg --part=2/4")
  alone = _run("segment_parts.sbatch", "configs/demo.py", *flags,
               env={"SLURM_ARRAY_TASK_ID": "", "SLURM_ARRAY_TASK_COUNT": ""})
  assert alone.returncode == 2 and "not an array task" in alone.stderr


def test_tpu_pod_dry_run_copies_installs_and_runs_on_all_workers():
  out = _run("tpu_pod.sh", "--dry-run", "my-pod", "us-east5-a", "configs/demo.py",
             "/mnt/runs/r")
  assert out.returncode == 0, out.stderr
  copy, setup, run = out.stdout.strip().splitlines()
  assert copy.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in copy
  jax_pin = re.search(r"^jax==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(),
                      re.M).group(1)
  assert f"'jax[tpu]=={jax_pin}'" in setup and "--worker=all" in setup
  assert "--worker=all" in run and "--distributed=on" in run
  assert "-m stt_jax.main --config=configs/demo.py --workdir=/mnt/runs/r" in run


@pytest.mark.parametrize("kind,device_flag", [("cuda", "--gpus all"),
                                               ("rocm", "--device=/dev/kfd")])
def test_container_dry_run_and_recipe(kind, device_flag):
  out = _run("container.sh", "--dry-run", kind, "configs/demo.py", "runs/d")
  assert out.returncode == 0, out.stderr
  _, build, run = out.stdout.strip().splitlines()
  assert build == f"docker build -f launch/docker/{kind}.Dockerfile -t stt_jax:{kind} ."
  assert device_flag in run and run.endswith(
      f"stt_jax:{kind} --config=configs/demo.py --workdir=runs/d")
  recipe = open(os.path.join(LAUNCH, "docker", f"{kind}.Dockerfile")).read()
  jax_pin = re.search(r"^jax==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(),
                      re.M).group(1)
  assert re.search(rf"^ARG JAX_VERSION={re.escape(jax_pin)}$", recipe, re.M)
  assert 'ENTRYPOINT ["python", "-m", "stt_jax.main"]' in recipe
  for folder in ("stt_jax", "configs"):
    assert re.search(rf"^COPY {folder} {folder}$", recipe, re.M)
