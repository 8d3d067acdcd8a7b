"""Alembic environment. tunerd runs migrations itself (db.engine.upgrade) with a connection it
already holds in a transaction; `alembic -c db/alembic.ini upgrade head` also works, using
$TUNERD_DB or the default SQLite file."""

from alembic import context

from tunerd.db import engine as _engine
from tunerd.db.tables import Base

config = context.config


def _run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=str(_engine.parse_url(config.get_main_option("sqlalchemy.url") or None)),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    eng = _engine.create(config.get_main_option("sqlalchemy.url") or None)
    with eng.connect().execution_options(**{_engine.WRITE: True}) as conn, conn.begin():
        _run(conn)
    eng.dispose()
