"""OpenAI-compatible chat, completions and embeddings: wire types, router, logic."""
