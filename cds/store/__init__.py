"""The audit store: issued cards, clinician feedback, the review summary, the JWT replay cache, the background
audit writer and retention.

    engine.py     the database: engine, SQLite/PostgreSQL setup, transactions and locks, errors
    tables.py     the schema, defined once (the migrations are checked against it)
    migrations/   alembic revisions, run at start-up under a lock (and the pre-alembic databases' stamping)
    cards.py      issued cards and the sink they are written through
    feedback.py   feedback, the answered-card memory, the summary and the dashboard's queries
    replay.py     the JWT replay cache
    retention.py  deleting what is older than the retention period
    writer.py     the background audit writer (off the request path) and its spool file
    store.py      `Store`, the one object callers use
"""

from .cards import CardSink, IssuedCard
from .engine import StoreError, StoreUnavailable, UnknownCard
from .feedback import OUTCOMES, FeedbackEntry, Outcome
from .retention import prune_forever
from .store import Store
from .tables import answered_cards, feedback, issued_cards, jwt_replay, metadata, suppressed_cards
from .writer import AuditWriter

__all__ = ["OUTCOMES", "AuditWriter", "CardSink", "FeedbackEntry", "IssuedCard", "Outcome", "Store", "StoreError",
           "StoreUnavailable", "UnknownCard", "answered_cards", "feedback", "issued_cards", "jwt_replay", "metadata",
           "prune_forever", "suppressed_cards"]
