"""Offline workflows around the server: training guide models for a base model and evaluating them.

Dependencies point one way: ``workflows -> server -> guidance -> models``. Rollouts run on
the server's own engine wrapper (``server.engine.Engine``); evaluation drives a running
``alignserve serve`` over HTTP, as a user would.
"""
