"""Folding steering into weights: fusion into norms and Linears (``fusion``), in-memory fused
norms (``fused_norm``), GGUF files (``gguf``), and the family tables (``families``)."""
