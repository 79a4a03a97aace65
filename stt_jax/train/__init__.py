"""stt_jax.train."""
