"""Training-time feature cache: encode every image once with the frozen encoder, train from the store."""

from vlmforge.cache.store import DEFAULT_DTYPE, CacheError, FeatureReader, FeatureStore

__all__ = ["DEFAULT_DTYPE", "CacheError", "FeatureReader", "FeatureStore"]
