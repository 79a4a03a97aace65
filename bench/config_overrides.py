"""--override key=value for the bench scripts, as --config.key=value is for
stt_jax.main."""

from __future__ import annotations

import ast


def apply_overrides(cfg, overrides) -> None:
  """Sets "key=value" entries (Python literals, else strings) on an existing
  config key; a missing key or a missing "=" is a one-line SystemExit."""
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
