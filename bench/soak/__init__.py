"""The soak and fault run (`python -m bench.soak`; bench/soak/cli.py says what it does)."""
