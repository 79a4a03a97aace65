"""bench/gpu_compile.py's parts that need no CUDA plugin: buffer sizes of
compiled HLO, which instructions write memory, the GPU descriptions, and the
one-line stop where jax cannot compile for a GPU."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import gpu_compile  # noqa: E402  pylint: disable=g-import-not-at-top


def test_shape_bytes_of_arrays_and_tuples():
  assert gpu_compile.shape_bytes("bf16[2,3]{1,0}") == 12
  assert gpu_compile.shape_bytes("(f32[16,160,160,4,9,1]{5,4,3,2,1,0}, s32[10]{0})") == (
      4 * 16 * 160 * 160 * 36 + 40)
  assert gpu_compile.shape_bytes("f32[]") == 4
  assert gpu_compile.shape_bytes("(bf16[4]{0}, u8[0]{0})") == 8  # cuDNN's empty workspace


def test_written_buffers_are_those_outside_fusions_including_loop_bodies():
  def f(x, w):
    y = jnp.sin(x) * 2.0 + 1.0           # elementwise: fused, its inner ops not rows
    y = jax.lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a @ w), y)   # a while body
    return jnp.sum(y, axis=0)
  x = jnp.ones((64, 48), jnp.float32)
  w = jnp.ones((48, 48), jnp.float32)
  hlo = jax.jit(f).lower(x, w).compile().as_text()
  rows = gpu_compile.written_buffers(hlo)
  assert rows == sorted(rows, key=lambda r: -r["bytes_per_call"])
  # the loop's [64, 48] float32 product is written in the body, every step:
  # three times per call (XLA knows the trip count)
  body_rows = [r for r in rows if r["bytes"] == 64 * 48 * 4 and "dot" in r["op_name"]]
  assert body_rows, [(r["instruction"], r["computation"], r["op_name"]) for r in rows]
  assert all(r["runs"] == 3 and r["bytes_per_call"] == 3 * r["bytes"] for r in body_rows)
  # nothing from inside a fusion (those computations are called, not run)
  fused = {line.split()[0].lstrip("%") for line in hlo.splitlines()
           if line.startswith(("%fused", "fused"))}
  assert not {r["computation"] for r in rows} & fused
  assert {r["opcode"] for r in rows}.isdisjoint(gpu_compile._NOT_WRITES)  # pylint: disable=protected-access
  # the output row: sum over axis 0 -> f32[48], once
  assert any(r["bytes"] == 48 * 4 and r["runs"] == 1 for r in rows)
  assert not any(r["in_place"] for r in rows)


def test_a_scan_stacking_its_outputs_is_flagged_as_an_in_place_update():
  def f(x):
    _, ys = jax.lax.scan(lambda c, xi: (c, jnp.sin(xi) * c), 2.0, x)
    return ys
  hlo = jax.jit(f).lower(jnp.ones((4, 1000), jnp.float32)).compile().as_text()
  updates = [r for r in gpu_compile.written_buffers(hlo) if r["in_place"]]
  assert updates and all(r["op_name"].endswith("dynamic_update_slice") for r in updates)


def test_target_descriptions_name_the_device_pallas_and_xla_read():
  for name, target in gpu_compile.TARGETS.items():
    text = gpu_compile.target_config(name)
    assert f'device_description_str: "{target["kind"]}"' in text
    assert f"major: {target['major']} minor: {target['minor']}" in text
    assert f"core_count: {target['sms']}" in text
  assert gpu_compile.TARGETS["h200"]["kind"] == "NVIDIA H200"


def test_without_a_cuda_plugin_it_stops_with_one_line():
  try:
    gpu_compile.gpu_mesh("h200")
  except SystemExit as e:
    message = str(e)
    assert "\n" not in message and 'pip install "jax[cuda13]==' in message
  else:
    pytest.skip("jax's CUDA plugin is installed here: it compiles for a GPU")
