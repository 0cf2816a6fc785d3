"""The OpenAI-compatible HTTP server (`flatout serve`)."""
