"""Data layer: the keystep contract, readers/writers for the community formats, transforms, collation."""

from harness.data.episode import Episode, Keystep
from harness.data.errors import DataError
from harness.data.meta import DatasetMeta

__all__ = ["DataError", "DatasetMeta", "Episode", "Keystep"]
