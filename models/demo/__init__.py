"""The reproducible demo: an arithmetic task with an exact reward, a
character-level tokenizer, and a small Llama base model trained on CPU."""
