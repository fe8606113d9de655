"""The dual-path model on a stock transformers VLM: the sequence layout, dual-path attention
and its registration with transformers, the latent tokens, and the CrystaL objective."""
