"""The canonical tables every stage reads and writes (Arrow schemas, versioned).

Events are the one input format: whatever a source looks like (synthetic generator, MovieLens,
Online Retail, Amazon reviews, your own logs), it is converted into this table first. Everything
downstream (ingest, pretraining, evaluation, serving) reads only these schemas.

Bump ``SCHEMA_VERSION`` on any change to a schema below; manifests record it and readers check it.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.0"

TS_TYPE = pa.timestamp("us", tz="UTC")
CATEGORY_TYPE = pa.list_(pa.string())

# One row per event. Required columns are non-nullable; the ingest validator enforces it row by row.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),  # stable user key, any string
        pa.field("ts", TS_TYPE, nullable=False),  # when it happened, UTC, microseconds
        pa.field("service", pa.string(), nullable=False),  # product/domain: shopping, search, news...
        pa.field("text", pa.string(), nullable=False),  # the textualized event (title, query...)
        pa.field("item_id", pa.string(), nullable=True),  # item key within the service, if any
        pa.field("category", CATEGORY_TYPE, nullable=True),  # hierarchical path, root first
        pa.field("value", pa.float64(), nullable=True),  # rating, quantity, price...
    ],
    metadata={"userfm.schema": "events", "userfm.schema_version": SCHEMA_VERSION},
)

EVENT_COLUMNS = tuple(EVENT_SCHEMA.names)
REQUIRED_COLUMNS = tuple(f.name for f in EVENT_SCHEMA if not f.nullable)
OPTIONAL_COLUMNS = tuple(f.name for f in EVENT_SCHEMA if f.nullable)

# Rows the ingest validator rejects keep their raw content (as JSON) and a reason.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),  # file the row came from
        pa.field("reason", pa.string()),  # machine-readable code, see validate.REASONS
        pa.field("detail", pa.string()),  # human-readable: names the field and the bad value
        pa.field("raw", pa.string()),  # the row as it was read, JSON-encoded
    ],
    metadata={"userfm.schema": "quarantine", "userfm.schema_version": SCHEMA_VERSION},
)

SPLITS = ("train", "val", "test")

# One row per (user, scope): scope "all" is the user's combined history over every service,
# scope "<service>" is that service alone. Lists are time-sorted, oldest first, and hold the most
# recent ``max_events`` events; ``n_events`` counts all of the user's events in that scope.
SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train / val / test, by hash of user_id
        pa.field("scope", pa.string(), nullable=False),  # "all" or a service name
        pa.field("n_events", pa.int64(), nullable=False),  # events before truncation
        pa.field("ts", pa.list_(TS_TYPE)),
        pa.field("service", pa.list_(pa.string())),
        pa.field("text", pa.list_(pa.string())),
        pa.field("item_id", pa.list_(pa.string())),
        pa.field("category", pa.list_(CATEGORY_TYPE)),
        pa.field("value", pa.list_(pa.float64())),
    ],
    metadata={"userfm.schema": "sequences", "userfm.schema_version": SCHEMA_VERSION},
)

ALL_SCOPE = "all"


def check_events(table: pa.Table) -> pa.Table:
    """Return ``table`` with exactly the canonical event columns and types, or raise ValueError.

    Extra columns are dropped; missing optional columns are added as nulls; a missing required column
    or a column that cannot be cast is an error naming the column.
    """
    cols = []
    for field in EVENT_SCHEMA:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"events table has no required column {field.name!r}")
            cols.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table.column(field.name)
        try:
            cols.append(col.cast(field.type) if col.type != field.type else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {exc}") from exc
    return pa.Table.from_arrays(cols, schema=EVENT_SCHEMA)


def empty_events() -> pa.Table:
    """An events table with no rows."""
    return EVENT_SCHEMA.empty_table()
