"""stt_jax.metrics."""
