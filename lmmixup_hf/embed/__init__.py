"""Sentence embeddings (cached) and k-nearest-neighbour search (exact, faiss, HNSW)."""
