"""Two-stage cached-embedding pipeline: extract frozen-backbone features once, train heads on the cache."""

__version__ = "0.1.0"
