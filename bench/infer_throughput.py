"""Inference (forward on sliding-window batches) throughput, stt_jax against
the PyTorch peer (see bench/vs_torch.py); the whole segment path (read ->
model -> blend -> write) is bench/segment_throughput.py.

  .venv/bin/python bench/infer_throughput.py [--cases=paper,small] [--dtypes=...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_torch  # noqa: E402

if __name__ == "__main__":
  vs_torch.main(kinds=("infer",))
