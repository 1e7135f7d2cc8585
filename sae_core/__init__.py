"""Sparse autoencoders for vision-language models: modules, training, metrics, storage."""
