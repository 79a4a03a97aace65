"""stt_jax.infer."""
