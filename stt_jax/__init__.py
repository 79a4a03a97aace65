"""stt_jax: STT-UNET 3D mitochondria instance segmentation in JAX/Flax."""

__version__ = "0.1.0"
