"""jaxvid: text-to-video diffusion transformers in JAX."""

__version__ = "0.1.0"
