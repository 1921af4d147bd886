"""qfsep_jax: 8-bit quantization of depthwise-separable networks (Sheng et al. 2018) in JAX."""
