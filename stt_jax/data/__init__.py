"""stt_jax.data."""
