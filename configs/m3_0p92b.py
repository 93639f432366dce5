"""The 0.92B model of the paper's ablation (Fig. 11): L=40, H=32, head dim 64 (0.923B non-embedding)."""
from m3jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "m3_0p92b"
    m = cfg.model
    m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 40, 32, 8, 64
    m.hidden_size = m.mlp_dim = 2048
    cfg.memory.num_layers = 20  # the first half, as in the 2.4B model
    cfg.memory.vq_factory = "OPQ16x64-Residual2x14-PQ8x10"  # 14-byte codes as in the paper, for 64-dim vectors
    return cfg
