"""Output paths that are never replaced silently."""

from __future__ import annotations

import os
import shutil

from stt_jax.errors import UserError


def clear_for_output(path: str, overwrite: bool) -> str:
  """Returns the absolute path, after removing what is there if `overwrite`.

  An existing file or non-empty folder without `overwrite` is a UserError;
  nothing is deleted then.
  """
  path = os.path.abspath(path)
  exists = os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))
  if exists and not overwrite:
    raise UserError(f"{path} already exists; pass --overwrite to replace it "
                    "or choose another output")
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
  return path
