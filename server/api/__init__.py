"""OpenAI-compatible HTTP endpoints: one package per endpoint (protocol, serving, router)."""
