"""The audit store: issued cards, clinician feedback, the review summary, the JWT replay cache, the background
audit writer and retention (see `engine`'s docstring for the design)."""

from .engine import (
    OUTCOMES,
    FeedbackEntry,
    IssuedCard,
    Outcome,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownCard,
    answered_cards,
    feedback,
    issued_cards,
    jwt_replay,
    metadata,
    suppressed_cards,
)
from .writer import AuditWriter, prune_forever

__all__ = ["OUTCOMES", "AuditWriter", "FeedbackEntry", "IssuedCard", "Outcome", "Store", "StoreError",
           "StoreUnavailable", "UnknownCard", "answered_cards", "feedback", "issued_cards", "jwt_replay", "metadata",
           "prune_forever", "suppressed_cards"]
