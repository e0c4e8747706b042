"""Downtime packs: per-ward PDFs, regenerated on a schedule, so the paper fallback is minutes old."""
