"""A model that trains in minutes on one CPU (CI and the demo). Same structure, smaller numbers."""
from m3jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "tiny"
    m = cfg.model
    m.vocab_size = 2048  # SentencePiece with byte fallback needs ~400 ids before its first merge
    m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim = 4, 64, 4, 2, 16
    m.mlp_dim = 128
    m.remat = "none"
    m.dtype = "float32"
    mem = cfg.memory
    mem.num_layers = 2
    mem.chunk_len = 16
    mem.reference_len = 32
    mem.tokens_per_head = 4
    cfg.data.seq_len = 128
    cfg.memory.vq_factory = "OPQ4x16-Residual2x6-PQ4x6"  # small codebooks: tiny banks train on few vectors
    cfg.data.continual_sequences = 2048  # retrieval for a subset: stage 2 is the short stage
    # a slice of the real data, so `make demo` fits in 15 minutes on a 2-core CPU
    cfg.data.max_corpus_documents = 20_000  # sources interleave, so every source is in the slice
    cfg.data.max_knowledge_documents = 30_000
    cfg.data.tokenizer_sentences = 200_000
    return cfg
