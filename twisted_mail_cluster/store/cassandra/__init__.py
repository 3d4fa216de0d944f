"""The Cassandra backend of the store contract."""

from .store import CassandraStore

__all__ = ["CassandraStore"]
