"""Serving measurements: what steering costs at generation (transformers and vLLM)."""
