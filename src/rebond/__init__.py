"""Rebond: the hospital information system core that keeps care going when the IT fails."""

__version__ = "0.1.0"
