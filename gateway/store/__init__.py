"""Time-series stores: the Store boundary, line protocol, InfluxDB 1.x/2.x, SQLite, memory, batching.

The backends load on first use (PEP 562 `__getattr__`): influxdb-client alone costs ~0.2 s of import
time, which every `tidegate` command would otherwise pay.
"""

from importlib import import_module
from typing import Any

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

_LAZY = {
    "BatchWriter": "gateway.store.batcher",
    "InfluxV1Store": "gateway.store.influx_v1",
    "InfluxV2Store": "gateway.store.influx_v2",
    "LineProtocolError": "gateway.store.lineprotocol",
    "encode_batch": "gateway.store.lineprotocol",
    "encode_point": "gateway.store.lineprotocol",
    "MemoryStore": "gateway.store.memory",
    "NullStore": "gateway.store.memory",
    "Spool": "gateway.store.spool",
    "SpoolStats": "gateway.store.spool",
    "SqliteStore": "gateway.store.sqlite",
}

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
    "Spool",
    "SpoolStats",
    "SqliteStore",
    "Store",
    "StoreError",
    "encode_batch",
    "encode_point",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
