"""Model presets, one per row of the paper's ablation Tables 3-5.

Pick one with a config file argument, e.g.
  --config=configs/mitoem_r.py:stt        (Table 3 "+ SST")
  --config=configs/demo_stt.py:fusion_add (Table 4 "addition")
"""

from __future__ import annotations

from stt_jax.errors import UserError

# name: (attention design, fusion, denoise, adversarial weight, paper row)
PRESETS = {
    "baseline": ("none", "deform", False, 0.0, "Table 3 Baseline"),
    "stt": ("split", "deform", True, 0.0, "Table 3 + SST"),
    "stt_adv": ("split", "deform", True, 0.5, "Table 3 + SST + L_fg-bg (final model)"),
    "fusion_add": ("split", "add", True, 0.0, "Table 4 addition"),
    "fusion_concat": ("split", "concat", True, 0.0, "Table 4 concat"),
    "fusion_deform": ("split", "deform", True, 0.0, "Table 4 def-conv"),
    "spatial_then_temporal": ("spatial_then_temporal", "deform", True, 0.0,
                              "Table 5 spatial-temporal (cascade)"),
    "temporal_then_spatial": ("temporal_then_spatial", "deform", True, 0.0,
                              "Table 5 temporal-spatial (cascade)"),
    "split": ("split", "deform", True, 0.0, "Table 5 split (ours)"),
}


def apply_preset(cfg, name: str):
  """Sets the model/loss fields of `name` on cfg (in place) and returns it."""
  if name not in PRESETS:
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
  design, fusion, denoise, adversarial, _ = PRESETS[name]
  cfg.model.attention.design = design
  cfg.model.attention.fusion = fusion
  cfg.model.denoise.enabled = denoise
  cfg.loss.adversarial_weight = adversarial
  return cfg
