"""Thin per-engine adapters over `guidance.batch.GuidanceBatch`."""
