"""Offline jobs: extract activations, train SAEs, build worlds and bundles."""
