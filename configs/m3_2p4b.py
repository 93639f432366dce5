"""Memory3-2.4B (SPEC 2): 44 layers, 40/8 heads of dim 80, memory in layers 0..21."""
from m3jax.config import base_config


def get_config():
    cfg = base_config()  # the base is this model's shape
    cfg.name = "m3_2p4b"
    return cfg
