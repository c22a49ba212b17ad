"""The error a feature raises when an optional package it needs is not installed."""


class MissingDependency(ImportError):
    """An optional package is missing; the message says what to install. Still an ``ImportError`` for callers
    that catch that, and reported by the commands as one error line (a setup to fix, not a crash)."""
