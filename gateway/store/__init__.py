"""Time-series stores: the Store boundary, line protocol, InfluxDB 1.x/2.x, SQLite, memory, batching."""

from gateway.store.base import (
    Aggregate,
    Point,
    Query,
    RejectedPointsError,
    RetryableStoreError,
    Row,
    Store,
    StoreError,
)
from gateway.store.batcher import BatchWriter
from gateway.store.influx_v1 import InfluxV1Store
from gateway.store.influx_v2 import InfluxV2Store
from gateway.store.lineprotocol import LineProtocolError, encode_batch, encode_point
from gateway.store.memory import MemoryStore, NullStore
from gateway.store.sqlite import SqliteStore

__all__ = [
    "Aggregate",
    "BatchWriter",
    "InfluxV1Store",
    "InfluxV2Store",
    "LineProtocolError",
    "MemoryStore",
    "NullStore",
    "Point",
    "Query",
    "RejectedPointsError",
    "RetryableStoreError",
    "Row",
    "SqliteStore",
    "Store",
    "StoreError",
    "encode_batch",
    "encode_point",
]
