"""bench/profile_step.py's trace and HLO parsing, on a small program."""

import glob
import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import profile_step  # noqa: E402  pylint: disable=g-import-not-at-top


def _program():
  def f(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y)
  x = jnp.asarray(np.random.default_rng(0).random((4, 96, 96, 48)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(1).random((3, 3, 48, 48)), jnp.float32)
  return jax.jit(jax.grad(f, argnums=1)), x, k


def test_instructions_are_named_by_what_jax_lowered_into_them():
  fn, x, k = _program()
  names = profile_step.instruction_names(fn.lower(x, k).compile().as_text())
  convs = [v for v in names.values() if v["opcode"] == "convolution"]
  assert convs, "no convolution instruction parsed"
  assert any("conv_general_dilated" in v["op_name"] for v in names.values())
  assert profile_step.primitive("jit(f)/enc1/conv_general_dilated", "fusion") == "convolution"
  assert profile_step.primitive("", "fusion") == "fusion"
  merged = "jit(step)/(transpose(jvp(M))/a/conv_general_dilated:jvp()/reduce_sum)"
  assert profile_step.primitive(merged, "all-reduce") == "all-reduce"
  assert profile_step.primitive("jit(f)/(x/reduce_sum)", "fusion") == "reduce_sum"
  assert profile_step.primitive("jit(f)/enc/jit(elu)", "fusion") == "elu"


def test_instructions_are_put_in_the_module_and_pass_they_came_from():
  scatter = ("jit(train_step)/transpose(jvp(ResUNet))/sst_enc1/sst_enc1._fuse/while/body/"
             "eval_jaxpr/checkpoint/deform_fuse.body/deform_fuse/vmap(jit(_take))/scatter-add")
  assert profile_step.module_of(scatter) == ("ResUNet/sst_enc1/deform_fuse", "backward")
  conv = "jit(train_step)/jvp(ResUNet)/enc0/residual/conv1/conv_general_dilated"
  assert profile_step.module_of(conv) == ("ResUNet/enc0/residual", "forward")
  assert profile_step.module_of("jit(f)/ResUNet/head/conv_general_dilated") == (
      "ResUNet/head", "forward")
  assert profile_step.module_of("jit(train_step)/transpose(jvp(Discriminator))/c1/dot_general"
                                ) == ("Discriminator/c1", "backward")
  assert profile_step.module_of("jit(train_step)/mul") == ("(outside the model)", "forward")
  assert profile_step.module_of("(convolution without metadata, in f.1)")[0] == "(unnamed)"


# Two chunk loops of the same shapes (enc1's and dec1's), as XLA:GPU leaves
# them: it merged their bodies and cloned them back per loop, both clones
# keeping enc1's metadata; each while keeps its own site's op_name
_CLONED_LOOPS = """HloModule m

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT, metadata={op_name="jit(s)/jvp(M)/enc1/enc1._fuse/while/cond/lt"}
}

%fused_sine (q: f32[8]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  ROOT %s = f32[8]{0} sine(%q), metadata={op_name="jit(s)/jvp(M)/enc1/enc1._fuse/while/body/eval_jaxpr/fuse.body/fuse/sin"}
}

%body.clone (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_sine
  %y = f32[8]{0} cosine(%f), metadata={op_name="jit(s)/jvp(M)/enc1/enc1._fuse/while/body/eval_jaxpr/fuse.body/fuse/cos"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y)
}

%body.clone.clone (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %f.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_sine
  %y.1 = f32[8]{0} cosine(%f.1), metadata={op_name="jit(s)/jvp(M)/enc1/enc1._fuse/while/body/eval_jaxpr/fuse.body/fuse/cos"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y.1)
}

ENTRY %main (a: (s32[], f32[8])) -> (s32[], f32[8]) {
  %a = (s32[], f32[8]{0}) parameter(0)
  %w.1 = (s32[], f32[8]{0}) while(%a), condition=%cond.1, body=%body.clone, metadata={op_name="jit(s)/jvp(M)/enc1/enc1._fuse/while"}
  %w.2 = (s32[], f32[8]{0}) while(%w.1), condition=%cond.1, body=%body.clone.clone, metadata={op_name="jit(s)/jvp(M)/dec1/dec1._fuse/while"}
  ROOT %e = f32[8]{0} exponential(%w.2), metadata={op_name="jit(s)/jvp(M)/dec1/exp"}
}
"""


def test_a_cloned_loop_body_is_named_by_its_own_loop():
  names = profile_step.instruction_names(_CLONED_LOOPS)
  assert names["y"]["op_name"].startswith("jit(s)/jvp(M)/enc1/enc1._fuse/while/body/")
  assert names["y.1"]["op_name"] == (
      "jit(s)/jvp(M)/dec1/dec1._fuse/while/body/eval_jaxpr/fuse.body/fuse/cos")
  # a fusion is named through its body, and so by the loop it runs in
  assert profile_step.module_of(names["f"]["op_name"]) == ("M/enc1/fuse", "forward")
  assert profile_step.module_of(names["f.1"]["op_name"]) == ("M/dec1/fuse", "forward")
  assert names["e"]["op_name"] == "jit(s)/jvp(M)/dec1/exp"  # outside any loop: as written


def test_summary_adds_device_time_by_instruction(tmp_path):
  fn, x, k = _program()
  fn(x, k).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      fn(x, k).block_until_ready()
  path = glob.glob(str(tmp_path / "**" / "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = profile_step.device_events(trace)
  assert events and not any("ThunkExecutor" in e["name"] for e in events)
  # every kernel XLA:CPU ran is counted, whichever thread ran it (the CI
  # machine ran the convolutions on PjRt client threads, not the Eigen pool)
  tagged = [e for e in trace["traceEvents"]
            if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
  assert len(events) == len(tagged)
  assert sum(e["dur"] for e in events) == pytest.approx(sum(e["dur"] for e in tagged))
  names = profile_step.instruction_names(fn.lower(x, k).compile().as_text())
  assert {e["args"]["hlo_op"] for e in events} <= set(names)
  result = profile_step.summarize(events, names, steps=2, top=50)
  total = sum(e["dur"] for e in events) / 1e3 / 2
  assert result["device_ms_per_step"] == pytest.approx(total)
  assert sum(r["share"] for r in result["top"]) == pytest.approx(1.0)
  assert sum(r["share"] for r in result["by_primitive"]) == pytest.approx(1.0)
  assert sum(r["share"] for r in result["by_module"]) == pytest.approx(1.0)
  assert len(result["all"]) == len({e["args"]["hlo_op"] for e in events})
  # the convolutions are tagged, but XLA:CPU's Eigen convolutions run
  # asynchronously: their events end at the hand-over, so they need not top
  # the table (the step's wall time shows what no event holds: below)
  assert "convolution" in {r["primitive"] for r in result["by_primitive"]}


def test_wall_time_adds_what_no_event_holds():
  names = {"a": {"opcode": "convolution", "op_name": "jit(f)/conv_general_dilated"}}
  events = [{"name": "a", "dur": 3000.0, "args": {"hlo_op": "a"}}] * 2  # 3 ms each
  result = profile_step.summarize(events, names, steps=2, top=5, wall_ms_per_step=10.0)
  assert result["device_ms_per_step"] == pytest.approx(3.0)
  assert result["wall_ms_per_step"] == 10.0
  assert result["unattributed_ms_per_step"] == pytest.approx(7.0)
  assert profile_step.summarize(events, names, steps=2, top=5,
                                wall_ms_per_step=1.0)["unattributed_ms_per_step"] == 0.0
  assert "wall_ms_per_step" not in profile_step.summarize(events, names, steps=2, top=5)


def test_nested_events_count_their_own_time_only():
  def event(name, ts, dur, tid=1):
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name}}
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      event("while", 0, 100), event("body.conv", 10, 30), event("body.add", 50, 20),
      event("body.inner", 55, 5), event("other", 0, 40, tid=2),
      event("next", 100, 10),  # starts where the loop ends: not nested in it
      {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 500, "name": "ThunkExecutor::Execute"},
  ]}
  dur = {e["name"]: e["dur"] for e in profile_step.device_events(trace)}
  assert dur == {"while": 50, "body.conv": 30, "body.add": 15, "body.inner": 5,
                 "other": 40, "next": 10}


def test_command_buffers_are_switched_off_unless_the_flags_say_otherwise():
  off = "--xla_gpu_enable_command_buffer="
  assert profile_step.without_command_buffers("") == off
  assert profile_step.without_command_buffers("--xla_force_host_platform_device_count=2") == (
      "--xla_force_host_platform_device_count=2 " + off)
  kept = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS"
  assert profile_step.without_command_buffers(kept) == kept
  # XLA rejects unknown flags at backend start: the flag must still exist in
  # this jaxlib, or the GPU profile would die before it measured anything
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=off, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and done.stdout.strip() == "3.0", done.stderr[-500:]
