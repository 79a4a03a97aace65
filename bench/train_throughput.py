"""Train-step throughput, stt_jax against the PyTorch peer (see bench/vs_torch.py).

  .venv/bin/python bench/train_throughput.py [--cases=paper,small] [--dtypes=...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_torch  # noqa: E402

if __name__ == "__main__":
  vs_torch.main(kinds=("train",))
