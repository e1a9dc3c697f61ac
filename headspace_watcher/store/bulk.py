"""Many rows as ONE JSON parameter, for statements that read them with ``json_to_recordset``.

Why not one array parameter per column (``unnest``): the driver dumps and quotes every array
element on its own, ~1 µs each, and a catch-up of many small files sends ~100,000 of them
(13 columns per session row, twice per session). One JSON document of the same rows costs a
quarter of that, client and server together, whatever the number of columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson


def json_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a JSON array of objects (``datetime`` as ISO 8601, with its offset).

    Raises ValueError (what a row's own values may cause: the writer's refusal path) for a
    value JSON cannot carry: a string with a lone surrogate, an integer beyond 64 bits. A
    string with NUL is carried and refused by PostgreSQL, as a text parameter would be.
    """
    try:
        return orjson.dumps(rows).decode()
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"row not encodable as JSON: {exc}") from None


def recordset(types: Mapping[str, str], param: str = "rows") -> str:
    """``json_to_recordset(CAST(:rows AS json)) AS r(col type, …)``, columns in ``types``
    order, the rows in the parameter ``param``.

    A join with a table must look its rows up by ``= ANY(ARRAY(SELECT key FROM …))``, not
    by a plain join: the planner takes a recordset for 100 rows and hashes it against a
    sequential scan of the whole table, which a catch-up of thousands of files makes cost
    more with every batch.
    """
    columns = ", ".join(f"{name} {sql_type}" for name, sql_type in types.items())
    return f"json_to_recordset(CAST(:{param} AS json)) AS r({columns})"
