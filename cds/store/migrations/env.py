"""Alembic's environment for the audit store.

At start-up `cds.store.migrations.upgrade` passes its own connection (already inside the transaction that holds
the migration lock) in `config.attributes["connection"]`; the migrations then run in that transaction. Run from
the `alembic` command line instead (`alembic -x url=sqlite:///data/cds.sqlite3 current`), it connects to the
`url` given with `-x` (a synchronous driver URL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from cds.store.migrations import include_object
from cds.store.tables import metadata


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, include_object=include_object,
                      compare_type=True)
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database with -x url=... (a synchronous SQLAlchemy URL)")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()
