"""--override key=value for the bench scripts, as --config.key=value is for
stt_jax.main."""

from __future__ import annotations

import ast


def apply_overrides(cfg, overrides) -> None:
  """Sets "key=value" entries (Python literals, else strings) on an existing
  config key, then checks the whole config as stt_jax.main does: a missing
  key, a missing "=" or a bad value is a one-line SystemExit (here, not in a
  worker after minutes of work)."""
  from stt_jax.config import validate  # pylint: disable=g-import-not-at-top
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  for item in overrides:
    key, sep, text = item.partition("=")
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in filter(None, parent.split(".")):
      node = node.get(part) if hasattr(node, "get") else None
    if not sep or node is None or not hasattr(node, "get") or leaf not in node:
      raise SystemExit(f"--override {item!r}: want key=value with an existing config key")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[leaf] = value
  try:
    validate(cfg)
  except UserError as e:
    raise SystemExit(f"--override: {e}") from None
