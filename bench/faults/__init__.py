"""Faults bench/soak injects into a server: put this directory on its PYTHONPATH (sitecustomize.py)."""
