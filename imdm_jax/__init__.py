"""imdm-jax: masked diffusion language models (MDLM) and the Infinite Mask Diffusion Model in JAX."""
