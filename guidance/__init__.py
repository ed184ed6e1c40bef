"""Guidance: steering a base model's next-token logits with guide models.

Engine-independent. `server -> guidance -> models -> torch`: nothing here imports
the HTTP layer, and only `guidance.adapters.vllm` imports vLLM.
"""
