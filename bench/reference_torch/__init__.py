"""PyTorch peers of stt_jax's networks, used only as benchmark references."""
