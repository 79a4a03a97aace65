"""stt_jax.models."""
