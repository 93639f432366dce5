"""Ahead-of-time compilation for TPU slices from a host without TPUs (`m3jax compile`)."""
