"""~75M non-embedding parameters: the GPU experiment size. Vocabulary of the default data."""
from m3jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "small"
    m = cfg.model
    m.vocab_size = 16000
    m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim = 12, 768, 12, 4, 64
    m.mlp_dim = 2048
    cfg.memory.num_layers = 6
    cfg.data.seq_len = 1024
    cfg.memory.vq_factory = "OPQ16x64-Residual2x14-PQ8x10"  # 14-byte codes as in the paper, for 64-dim vectors
    cfg.data.continual_sequences = 65536  # retrieval for a subset: stage 2 is the short stage
    return cfg
