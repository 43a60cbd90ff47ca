"""The audit store against SQLite (a file in tmp_path) and a real PostgreSQL server (see tests/pg.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from cds.metrics import REGISTRY, render_latest
from cds.store import (
    FeedbackEntry,
    IssuedCard,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownCard,
    feedback,
    issued_cards,
    jwt_replay,
    metadata,
    migrations,
)
from cds.store import cards as cards_module
from cds.store.replay import MAX_BATCH

import pg

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="session")
def pg_server() -> pg.PgServer:
    return pg.server()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/not-yet/cds.sqlite3"  # the directory is created at open
        return
    server: pg.PgServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


def card(uuid: str, rule: str = "pregnancy", version: int = 3, **kw: Any) -> IssuedCard:
    fields: dict[str, Any] = {"uuid": uuid, "rule_id": rule, "rule_version": version, "indicator": "critical",
                              "hook": "order-sign", "hook_instance": f"hi-{uuid}", "patient_pseudonym": "ps-1",
                              "issued_at": T0, "suggestion_uuids": [f"{uuid}-s1", f"{uuid}-s2"]}
    fields.update(kw)
    return IssuedCard(**fields)


def accepted(uuid: str, at: datetime = T0, suggestions: list[str] | None = None) -> FeedbackEntry:
    return FeedbackEntry(card_uuid=uuid, outcome="accepted", outcome_timestamp=at,
                         accepted_suggestions=[f"{uuid}-s1"] if suggestions is None else suggestions)


def overridden(uuid: str, reason: str | None = None, at: datetime = T0, comment: str | None = None) -> FeedbackEntry:
    return FeedbackEntry(card_uuid=uuid, outcome="overridden", outcome_timestamp=at, override_reason_code=reason,
                         override_reason_system="https://example.org/cds/override-reasons" if reason else None,
                         user_comment=comment)


async def count_rows(store: Store, table: sa.Table) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


# ---------------------------------------------------------------------------------------------- basics

@pytest.mark.anyio
async def test_record_and_summary_counts_exact(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.record_cards([card(f"p3-{i}") for i in range(5)])
        await store.record_cards([card(f"p2-{i}", version=2) for i in range(2)])
        await store.record_cards([card(f"b1-{i}", rule="bleeding-risk", version=1, indicator="warning")
                                  for i in range(3)])
        await store.record_cards([card("p3-0")])  # recorded again: ignored
        cet = timezone(timedelta(hours=1))
        new = await store.record_feedback([
            accepted("p3-0"), accepted("p3-1"), accepted("p3-2", at=T0.astimezone(cet)),
            overridden("p3-3", "negative-pregnancy-test"), overridden("p3-4", "negative-pregnancy-test"),
            overridden("p3-0", "not-pregnant-confirmed", at=T0 + timedelta(minutes=5)),  # 2nd entry, same card
            overridden("p2-0"),  # no reason given
            overridden("b1-0", "benefit-outweighs-risk", comment="discussed with patient"),
        ])
        assert new == 8
        assert await store.summary() == {"rules": [
            {"rule": "bleeding-risk", "version": "1", "issued": 3, "silent": 0, "accepted": 0, "overridden": 1,
             "override_reasons": {"benefit-outweighs-risk": 1}, "suppressed": 0},
            {"rule": "pregnancy", "version": "2", "issued": 2, "silent": 0, "accepted": 0, "overridden": 1,
             "override_reasons": {}, "suppressed": 0},
            {"rule": "pregnancy", "version": "3", "issued": 5, "silent": 0, "accepted": 3, "overridden": 3,
             "override_reasons": {"negative-pregnancy-test": 2, "not-pregnant-confirmed": 1}, "suppressed": 0},
        ]}
        async with store.engine.connect() as conn:
            row = (await conn.execute(sa.select(issued_cards).where(issued_cards.c.uuid == "p3-1"))).one()
            assert row.issued_at == T0 and row.issued_at.tzinfo is not None
            assert json.loads(row.suggestion_uuids) == ["p3-1-s1", "p3-1-s2"]
            ts = (await conn.execute(sa.select(feedback.c.outcome_timestamp)
                                     .where(feedback.c.card_uuid == "p3-2"))).scalar_one()
            assert ts == T0 and ts.utcoffset() == timedelta(0)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_empty_store_summary_and_ping(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        assert await store.ping() is True
        assert await store.summary() == {"rules": []}
        assert await store.schema_version() == migrations.LATEST
        await store.record_cards([])
        assert await store.record_feedback([]) == 0


async def all_cards(store: Store) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(sa.select(issued_cards).order_by(issued_cards.c.uuid))).mappings().all())


@pytest.fixture(params=["json_each", "executemany"])
def sqlite_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """On SQLite, the card sink's two ways: the batch as one JSON parameter, or (a SQLite without its JSON
    functions) `executemany`. PostgreSQL always takes `executemany`."""
    if request.param == "executemany":
        monkeypatch.setattr(cards_module, "sqlite_json", lambda: False)
    return str(request.param)


@pytest.mark.anyio
async def test_large_card_batch_is_stored_whole_and_exact(db_url: str, sqlite_way: str) -> None:
    """Over one INSERT's rows (1,000 on SQLite), a uuid twice in one batch: every row once, each value in place,
    as SQLAlchemy itself binds it, whichever way the sink writes. Through `json_each`, a batch is one statement:
    one step of SQLite, so the sink's thread waits for the GIL a few times a batch, not once a row (cards.py)."""
    if sqlite_way == "json_each" and db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL writes through executemany only")
    inserts: list[tuple[bool, bool]] = []  # each card INSERT run on the sink's thread: (json_each, executemany)

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.startswith("INSERT INTO issued_cards"):
            inserts.append(("json_each(" in statement, executemany))

    async with await Store.open(db_url) as store:
        if store.thread_engine is not None:  # a SQLite file: the sink's thread runs on this engine
            sa.event.listen(store.thread_engine, "before_cursor_execute", seen)
        batch = [card(f"L{i:04d}", rule=f"rule-{i % 7}", version=1 + i % 4, indicator=("info", "warning")[i % 2],
                      hook_instance=f"hi-{i}" if i % 11 else f"hi-{i} «é» \"q\" \\ \n",  # JSON's escapes
                      patient_pseudonym=None if i % 5 == 0 else f"ps-{i}",
                      issued_at=T0 + timedelta(seconds=i), suggestion_uuids=[f"L{i}-s"] * (i % 3),
                      repeat_key=None if i % 3 == 0 else f"rk-{i}", silent=i % 4 == 0)
                 for i in range(1201)]
        await store.record_cards([*batch, card("L0007", rule="not-stored")])  # L0007 again, in the same call
        rows = await all_cards(store)
        await store.record_cards([card(f"L{i:04d}", rule="not-stored") for i in range(995, 1005)])  # ignored
        assert await all_cards(store) == rows
        sqlite = store.engine.dialect.name == "sqlite"
        kinds = set()
        if sqlite:
            async with store.engine.connect() as conn:
                kinds = set((await conn.exec_driver_sql(
                    "SELECT typeof(uuid), typeof(rule_version), typeof(patient_pseudonym), typeof(issued_at), "
                    "typeof(suggestion_uuids), typeof(repeat_key), typeof(silent) FROM issued_cards")).all())
    assert len(rows) == 1201
    for c, row in zip(batch, rows, strict=True):
        assert (row["uuid"], row["rule_id"], row["rule_version"], row["indicator"], row["hook"],
                row["hook_instance"], row["patient_pseudonym"]) == (
                    c.uuid, c.rule_id, c.rule_version, c.indicator, c.hook, c.hook_instance, c.patient_pseudonym)
        assert row["issued_at"] == c.issued_at
        assert json.loads(row["suggestion_uuids"]) == list(c.suggestion_uuids)
        assert (row["repeat_key"], row["silent"]) == (c.repeat_key, c.silent)
    if sqlite:  # stored as SQLAlchemy itself binds them, whatever way the sink writes
        assert kinds == {("text", "integer", p, "text", "text", k, "integer")
                         for p in ("text", "null") for k in ("text", "null")}
        json_each = sqlite_way == "json_each"
        assert inserts == [(json_each, not json_each)] * 2  # one statement for each of the two batches


@pytest.mark.anyio
async def test_unknown_card_rejects_the_whole_batch(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        await store.record_cards([card("a"), card("b")])
        with pytest.raises(UnknownCard) as info:
            await store.record_feedback([accepted("a"), overridden("never-issued", "x"), accepted("b")])
        assert info.value.uuid == "never-issued"
        assert await count_rows(store, feedback) == 0
        assert (await store.summary())["rules"][0]["accepted"] == 0
        # the valid part goes through once posted on its own
        assert await store.record_feedback([accepted("a"), accepted("b")]) == 2


@pytest.mark.anyio
async def test_invalid_entries_are_refused_before_writing(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        await store.record_cards([card("a")])
        with pytest.raises(ValueError, match="feedback outcome must be one of"):
            await store.record_feedback([accepted("a"), FeedbackEntry("a", "maybe", T0)])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.record_feedback([accepted("a", at=datetime(2026, 3, 1, 9, 30))])  # naive
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.record_cards([card("n", issued_at=datetime(2026, 3, 1))])
        assert await count_rows(store, feedback) == 0
        assert await count_rows(store, issued_cards) == 1


@pytest.mark.anyio
async def test_duplicate_feedback_is_stored_once(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        await store.record_cards([card("a"), card("b")])
        entry = accepted("a", suggestions=["a-s1", "a-s2"])
        assert await store.record_feedback([entry, entry]) == 1  # twice in one batch
        assert await store.record_feedback([entry]) == 0  # posted again
        same = accepted("a", at=T0.astimezone(timezone(timedelta(hours=-5))), suggestions=["a-s2", "a-s1"])
        assert await store.record_feedback([same]) == 0  # same instant, other offset, other order
        assert await store.record_feedback([overridden("b", "r1", comment="first")]) == 1
        assert await store.record_feedback([overridden("b", "r1", comment="edited")]) == 0  # comment: same entry
        # entries that differ in any identifying field are distinct
        assert await store.record_feedback([
            accepted("a", suggestions=["a-s1"]),
            accepted("a", at=T0 + timedelta(microseconds=1), suggestions=["a-s1", "a-s2"]),
            overridden("b", "r2"),
            overridden("b"),
        ]) == 4
        assert await count_rows(store, feedback) == 6
        rules = (await store.summary())["rules"]
        assert rules == [{"rule": "pregnancy", "version": "3", "issued": 2, "silent": 0,
                          "accepted": 3, "overridden": 3,
                          "override_reasons": {"r1": 1, "r2": 1}, "suppressed": 0}]


# ----------------------------------------------------------------------------------- replay cache (JWT jti)

@pytest.mark.anyio
async def test_claim_jti(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        now = time.time()
        assert await store.claim_jti("iss|jti-1", now + 300) is True
        assert await store.claim_jti("iss|jti-1", now + 300) is False
        assert await store.claim("iss|jti-1", now + 600) is False  # ReplayCache protocol name
        assert await store.claim("iss|jti-2", now + 300) is True
        # an expired claim can be claimed again, and then holds until its new expiry
        assert await store.claim_jti("iss|old", now + 0.3) is True
        assert await store.claim_jti("iss|old", now + 300) is False
        await asyncio.sleep(0.5)
        assert await store.claim_jti("iss|old", time.time() + 300) is True
        assert await store.claim_jti("iss|old", time.time() + 300) is False

    # expired rows are purged opportunistically (at most once a minute per store, so on a fresh one)
    async with await Store.open(db_url) as store:
        await store.claim_jti("iss|gone", time.time() - 1)
    async with await Store.open(db_url) as store:
        before = await count_rows(store, jwt_replay)
        assert await store.claim_jti("iss|jti-3", time.time() + 300) is True
        assert await count_rows(store, jwt_replay) == before  # "iss|gone" deleted, "iss|jti-3" added


@pytest.mark.anyio
async def test_concurrent_claims_each_win_once(db_url: str) -> None:
    """Claims made together are written together (replay.py): more than one INSERT's worth (MAX_BATCH), each key
    claimed once, the same key twice at once claimed by one of the two, and all refused when sent again."""
    async with await Store.open(db_url) as store:
        now = time.time()
        keys = [f"iss|c{i}" for i in range(MAX_BATCH + 100)]
        first = await asyncio.gather(*(store.claim(k, now + 300) for k in [*keys, "iss|c7"]))
        assert first[:-1] == [True] * len(keys)
        assert first[-1] is False  # c7 twice in one batch: the second is a replay of the first
        again = await asyncio.gather(*(store.claim(k, now + 300) for k in keys[::50]))
        assert again == [False] * len(keys[::50])
        assert await count_rows(store, jwt_replay) == len(keys)


@pytest.mark.anyio
async def test_claims_during_an_outage_all_fail() -> None:
    """Every claim of a batch the store cannot write gets the store's error (FallbackReplayCache then falls back
    to its own memory), and the next claim tries the store again."""
    store = await Store.open("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere", migrate=False,
                             connect_timeout_s=1)  # nothing listens on port 1
    try:
        outcomes = await asyncio.gather(*(store.claim(f"iss|o{i}", time.time() + 300) for i in range(20)),
                                        return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        with pytest.raises(StoreUnavailable):
            await store.claim("iss|o0", time.time() + 300)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_claims_while_a_sqlite_file_is_locked_all_fail(tmp_path: Path) -> None:
    """In a SQLite file the claims are written on the store's write thread (`run_writing`): while another connection
    holds the write lock past the busy timeout, every claim of the batch gets StoreUnavailable, and once the lock
    is released the next claim is written."""
    path = tmp_path / "cds.sqlite3"
    async with await Store.open(f"sqlite+aiosqlite:///{path}", busy_timeout_s=0.2) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # the write lock, held
            outcomes = await asyncio.gather(*(store.claim(f"iss|l{i}", time.time() + 300) for i in range(20)),
                                            return_exceptions=True)
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await store.claim("iss|l0", time.time() + 300) is True
        assert await count_rows(store, jwt_replay) == 1


@pytest.mark.anyio
async def test_reads_do_not_wait_for_a_sqlite_write_lock(tmp_path: Path) -> None:
    """Reads run on the store's read thread in a WAL snapshot (`run_reading`, BEGIN DEFERRED): while another
    connection holds the write lock past the busy timeout, the answered-card refresh and the summary still answer."""
    path = tmp_path / "cds.sqlite3"
    async with await Store.open(f"sqlite+aiosqlite:///{path}", busy_timeout_s=0.2) as store:
        await store.record_cards([card("c1", repeat_key="rk-1")])
        await store.record_feedback([accepted("c1")])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            answered = await store.answered_since(datetime.now(UTC) - timedelta(hours=1))
            assert [key for key, _ in answered] == ["rk-1"]
            assert (await store.summary())["rules"][0]["accepted"] == 1
        finally:
            other.close()


# -------------------------------------------------------------------------- restart and abrupt termination

@pytest.mark.anyio
async def test_close_and_reopen_loses_nothing(db_url: str) -> None:
    async def first() -> dict[str, Any]:
        store = await Store.open(db_url)
        await store.record_cards([card(f"c{i}") for i in range(10)])
        await store.record_feedback([accepted(f"c{i}") for i in range(4)]
                                    + [overridden(f"c{i}", "r") for i in range(4, 7)])
        await store.claim_jti("k", time.time() + 600)
        summary = await store.summary()
        await store.close()
        return summary

    async def second(expected: dict[str, Any]) -> None:
        async with await Store.open(db_url) as store:
            assert await store.summary() == expected
            assert await store.claim_jti("k", time.time() + 600) is False
            assert await store.record_feedback([accepted("c0")]) == 0  # dedup survives the restart

    expected = await first()
    assert expected["rules"][0]["accepted"] == 4
    await second(expected)


KILLED_WRITER = textwrap.dedent("""
    import asyncio, sys, time
    from datetime import UTC, datetime
    from cds.store import FeedbackEntry, IssuedCard, Store

    async def main(url):
        store = await Store.open(url)
        now = datetime.now(UTC)
        for i in range(50):
            await store.record_cards([IssuedCard(f"k{i}", "pregnancy", 3, "critical", "order-sign", "hi", None,
                                                 now, [])])
            await store.record_feedback([FeedbackEntry(f"k{i}", "accepted", now)])
        await store.claim_jti("killed-jti", time.time() + 600)
        print("done", flush=True)
        await asyncio.sleep(3600)  # killed here, without closing anything

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.integration  # a writer process killed mid-flight
@pytest.mark.anyio
async def test_killed_process_loses_no_committed_write(db_url: str) -> None:
    with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, db_url], cwd=ROOT, env=_child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:  # closes the pipes
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.strip() == "done", proc.stderr.read() if proc.stderr else ""
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    async with await Store.open(db_url) as store:
        rules = (await store.summary())["rules"]
        assert rules == [{"rule": "pregnancy", "version": "3", "issued": 50, "silent": 0,
                          "accepted": 50, "overridden": 0,
                          "override_reasons": {}, "suppressed": 0}]
        assert await store.claim_jti("killed-jti", time.time() + 600) is False


# ------------------------------------------------------------------------------------ concurrent processes

WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    from datetime import UTC, datetime, timedelta
    from cds.store import FeedbackEntry, IssuedCard, Store

    T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

    async def main(url, w, n_cards, n_keys):
        store = await Store.open(url)  # all workers at once, on a database nobody has migrated yet
        print("ready", flush=True)
        sys.stdin.readline()  # wait for "go", so that every worker writes at the same time
        started = time.perf_counter()
        await store.record_cards([IssuedCard(f"w{w}-{j}", "concurrency", 1, "info", "order-select", f"h{w}",
                                             None, T0, []) for j in range(10)])
        shared = [FeedbackEntry(f"c{i}", "accepted", T0 + timedelta(seconds=i), [f"c{i}-s1"])
                  for i in range(n_cards)]
        own = [FeedbackEntry(f"c{i}", "overridden", T0 + timedelta(seconds=1000 + 100 * w + i), [],
                             f"r{w % 3}", "https://example.org/reasons", f"worker {w}") for i in range(n_cards)]
        entries = [e for pair in zip(shared, own) for e in pair]
        new = 0
        for k in range(0, len(entries), 5):
            batch = entries[k:k + 5]
            new += await store.record_feedback(batch)
            new += await store.record_feedback(batch)  # every batch posted twice
        claims = [f"jti-{k}" for k in range(n_keys) if await store.claim_jti(f"jti-{k}", time.time() + 600)]
        elapsed = time.perf_counter() - started
        await store.close()
        print(json.dumps({"new": new, "claims": claims, "elapsed": elapsed}), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
""")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.integration  # eight writer processes
@pytest.mark.anyio
async def test_concurrent_writer_processes_count_every_entry_once(db_url: str) -> None:
    workers, n_cards, n_keys = 8, 20, 50
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, db_url, str(w), str(n_cards), str(n_keys)],
                              cwd=ROOT, env=_child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    try:
        for p in procs:  # each has opened (and raced to migrate) the fresh database
            line = p.stdout.readline() if p.stdout else ""
            assert line.strip() == "ready", p.stderr.read() if p.stderr else ""

        async def issue() -> None:
            async with await Store.open(db_url) as store:
                await store.record_cards([card(f"c{i}", rule="pregnancy" if i % 2 == 0 else "bleeding-risk",
                                               version=3 if i % 2 == 0 else 1) for i in range(n_cards)])

        await issue()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            with p:  # waits for it and closes its pipes
                pass

    distinct = n_cards + workers * n_cards  # shared "accepted" entries + each worker's own "overridden" ones
    assert sum(r["new"] for r in results) == distinct  # each distinct entry inserted by exactly one worker
    claimed = [k for r in results for k in r["claims"]]
    assert sorted(claimed) == sorted(f"jti-{k}" for k in range(n_keys))  # each key won by exactly one worker

    async def check() -> dict[str, Any]:
        async with await Store.open(db_url) as store:
            assert await count_rows(store, feedback) == distinct
            assert await store.schema_version() == migrations.LATEST
            return await store.summary()

    per_rule = n_cards // 2
    reasons = {f"r{m}": per_rule * sum(1 for w in range(workers) if w % 3 == m) for m in range(3)}
    assert await check() == {"rules": [
        {"rule": "bleeding-risk", "version": "1", "issued": per_rule, "silent": 0, "accepted": per_rule,
         "overridden": per_rule * workers, "override_reasons": reasons, "suppressed": 0},
        {"rule": "concurrency", "version": "1", "issued": 10 * workers, "silent": 0, "accepted": 0, "overridden": 0,
         "override_reasons": {}, "suppressed": 0},
        {"rule": "pregnancy", "version": "3", "issued": per_rule, "silent": 0, "accepted": per_rule,
         "overridden": per_rule * workers, "override_reasons": reasons, "suppressed": 0},
    ]}


# ------------------------------------------------------------------------------------------------ migrations

@pytest.mark.anyio
async def test_migrations_upgrade_an_old_schema(db_url: str) -> None:
    async def build_version_1() -> None:
        store = await Store.open(db_url, migrate=False)
        try:
            assert await store.schema_version() == 0
            assert await store.migrate(target=1) == 1
            async with store.engine.begin() as conn:
                tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
                assert {"issued_cards", "feedback"} <= tables and "jwt_replay" not in tables
                columns = await conn.run_sync(lambda c: {col["name"] for col in sa.inspect(c).get_columns("feedback")})
                assert "received_at" not in columns
                # rows written by a release that knew only version 1, through that version's columns
                old_cards = sa.table("issued_cards", *(sa.column(n) for n in (
                    "uuid", "rule_id", "rule_version", "indicator", "hook", "hook_instance", "patient_pseudonym",
                    "issued_at", "suggestion_uuids")))
                old_feedback = sa.table("feedback", *(sa.column(n) for n in (
                    "card_uuid", "outcome", "accepted_suggestions", "override_reason_system",
                    "override_reason_code", "user_comment", "outcome_timestamp", "dedup_key")))
                stamp = T0 if conn.dialect.name == "postgresql" else T0.replace(tzinfo=None)
                await conn.execute(sa.insert(old_cards), [
                    {"uuid": f"old{i}", "rule_id": "pregnancy", "rule_version": 2, "indicator": "critical",
                     "hook": "order-sign", "hook_instance": "h", "patient_pseudonym": None, "issued_at": stamp,
                     "suggestion_uuids": "[]"} for i in range(3)])
                entry = overridden("old0", "negative-pregnancy-test")
                await conn.execute(sa.insert(old_feedback).values(
                    card_uuid="old0", outcome="overridden", accepted_suggestions="[]",
                    override_reason_system=entry.override_reason_system, override_reason_code="negative-pregnancy-test",
                    user_comment=None, outcome_timestamp=stamp, dedup_key=entry.dedup_key()))
        finally:
            await store.close()

    async def upgrade() -> None:
        async with await Store.open(db_url) as store:  # an ordinary start upgrades it
            assert await store.schema_version() == migrations.LATEST
            assert await store.summary() == {"rules": [
                {"rule": "pregnancy", "version": "2", "issued": 3, "silent": 0, "accepted": 0, "overridden": 1,
                 "override_reasons": {"negative-pregnancy-test": 1}, "suppressed": 0}]}
            async with store.engine.connect() as conn:
                received = (await conn.execute(sa.select(feedback.c.received_at))).scalar_one()
                assert received == T0  # backfilled from the outcome time
            # the old entry still deduplicates, new features work on the upgraded database
            assert await store.record_feedback([overridden("old0", "negative-pregnancy-test")]) == 0
            assert await store.record_feedback([accepted("old1")]) == 1
            assert await store.claim_jti("after-upgrade", time.time() + 60) is True
        async with await Store.open(db_url) as store:  # and opening again is a no-op
            assert await store.migrate() == migrations.LATEST
            assert await alembic_revision(store) == migrations.revision_id(migrations.LATEST)
            assert await schema_differences(store) == []

    await build_version_1()
    await upgrade()


def test_migrations_are_numbered_without_gaps() -> None:
    assert list(range(1, migrations.LATEST + 1)) == migrations.VERSIONS
    assert migrations.LATEST >= 5
    chain = {r.revision: r.down_revision for r in migrations.script().walk_revisions()}
    assert chain == {migrations.revision_id(v): (migrations.revision_id(v - 1) if v > 1 else None)
                     for v in migrations.VERSIONS}


async def alembic_revision(store: Store) -> str:
    async with store.engine.connect() as conn:
        return str((await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one())


async def schema_differences(store: Store) -> list[Any]:
    """What alembic's autogenerate would change to make the database match `cds.store.tables` (nothing, we hope)."""
    def compare(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "include_object": migrations.include_object})
        return list(compare_metadata(context, metadata))

    async with store.engine.connect() as conn:
        return await conn.run_sync(compare)


@pytest.mark.anyio
async def test_models_and_migrations_agree(db_url: str) -> None:
    """Upgrading an empty database to the head revision builds exactly the tables the queries use."""
    async with await Store.open(db_url) as store:
        assert await alembic_revision(store) == migrations.revision_id(migrations.LATEST)
        assert await schema_differences(store) == []
        # and the comparison can fail: a column the migrations never added is reported
        extra = sa.Table("issued_cards", sa.MetaData(), *(sa.Column(c.name, c.type) for c in issued_cards.c),
                         sa.Column("not_migrated", sa.Text))

        def compare(conn: sa.Connection) -> list[Any]:
            context = MigrationContext.configure(conn, opts={"include_object": lambda o, n, t, r, c: (
                t != "table" or n == "issued_cards") and (t == "table" or t == "column")})
            return list(compare_metadata(context, extra.metadata))

        async with store.engine.connect() as conn:
            diff = await conn.run_sync(compare)
        assert [(d[0], d[3].name) for d in diff if d[0] == "add_column"] == [("add_column", "not_migrated")]


@pytest.mark.anyio
async def test_database_newer_than_this_release_is_left_as_it_is(db_url: str) -> None:
    """A rolling upgrade: replicas of a newer release migrated the database first (to a revision this code does
    not know). This release starts, leaves the schema alone and works against it (migrations are additive)."""
    async with await Store.open(db_url) as store, store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    async with await Store.open(db_url) as store:
        assert await store.schema_version() == 99
        assert await store.migrate() == 99
        assert await alembic_revision(store) == "0099"
        await store.record_cards([card("a")])
        assert await store.record_feedback([accepted("a")]) == 1


def legacy_runner_schema(conn: sa.Connection, version: int) -> None:
    """A database as the hand-written runner before alembic (cds/migrations/, v0001..v0005) left it at
    `version`: its DDL, copied here verbatim, and its version table."""
    def v1() -> None:
        md = sa.MetaData()
        sa.Table("issued_cards", md,
                 sa.Column("uuid", sa.Text, primary_key=True),
                 sa.Column("rule_id", sa.Text, nullable=False),
                 sa.Column("rule_version", sa.Integer, nullable=False),
                 sa.Column("indicator", sa.String(16), nullable=False),
                 sa.Column("hook", sa.Text, nullable=False),
                 sa.Column("hook_instance", sa.Text, nullable=False),
                 sa.Column("patient_pseudonym", sa.Text),
                 sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
                 sa.Column("suggestion_uuids", sa.Text, nullable=False),
                 sa.Index("ix_issued_cards_rule", "rule_id", "rule_version"),
                 sa.Index("ix_issued_cards_issued_at", "issued_at"))
        sa.Table("feedback", md,
                 sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                           autoincrement=True),
                 sa.Column("card_uuid", sa.Text, sa.ForeignKey("issued_cards.uuid"), nullable=False),
                 sa.Column("outcome", sa.String(16), nullable=False),
                 sa.Column("accepted_suggestions", sa.Text, nullable=False),
                 sa.Column("override_reason_system", sa.Text),
                 sa.Column("override_reason_code", sa.Text),
                 sa.Column("user_comment", sa.Text),
                 sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
                 sa.Column("dedup_key", sa.String(64), nullable=False),
                 sa.CheckConstraint("outcome IN ('accepted', 'overridden')", name="ck_feedback_outcome"),
                 sa.UniqueConstraint("dedup_key", name="uq_feedback_dedup_key"),
                 sa.Index("ix_feedback_card_uuid", "card_uuid"))
        md.create_all(conn)

    def v2() -> None:
        md = sa.MetaData()
        sa.Table("jwt_replay", md, sa.Column("key", sa.Text, primary_key=True),
                 sa.Column("expires_at", sa.Double, nullable=False),
                 sa.Index("ix_jwt_replay_expires_at", "expires_at"))
        md.create_all(conn)

    def v3() -> None:
        column_type = sa.DateTime(timezone=True).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE feedback ADD COLUMN received_at {column_type}"))
        conn.execute(sa.text("UPDATE feedback SET received_at = outcome_timestamp WHERE received_at IS NULL"))

    def v4() -> None:
        conn.execute(sa.text("ALTER TABLE issued_cards ADD COLUMN repeat_key TEXT"))
        md = sa.MetaData()
        sa.Table("answered_cards", md, sa.Column("repeat_key", sa.Text, primary_key=True),
                 sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
                 sa.Index("ix_answered_cards_answered_at", "answered_at"))
        sa.Table("suppressed_cards", md,
                 sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                           autoincrement=True),
                 sa.Column("rule_id", sa.Text, nullable=False),
                 sa.Column("rule_version", sa.Integer, nullable=False),
                 sa.Column("hook", sa.Text, nullable=False),
                 sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=False),
                 sa.Index("ix_suppressed_cards_rule", "rule_id", "rule_version"))
        md.create_all(conn)

    def v5() -> None:
        false = "false" if conn.dialect.name == "postgresql" else "0"
        conn.execute(sa.text(f"ALTER TABLE issued_cards ADD COLUMN silent BOOLEAN NOT NULL DEFAULT {false}"))

    versions = sa.Table("cds_schema_version", sa.MetaData(),
                        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
                        sa.Column("description", sa.Text, nullable=False),
                        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False))
    versions.create(conn)
    for number, step in enumerate((v1, v2, v3, v4, v5)[:version], start=1):
        step()
        conn.execute(sa.insert(versions).values(version=number, description=f"v{number}", applied_at=T0))


@pytest.mark.parametrize("legacy", [1, 3, 5])
@pytest.mark.anyio
async def test_database_from_before_alembic_is_stamped_and_upgraded(db_url: str, legacy: int) -> None:
    """A database the old hand-written runner created (its `cds_schema_version` table, no alembic table) is
    stamped at the equivalent revision and upgraded from there, by several stores opening it at once."""
    async def build() -> None:
        engine = create_async_engine(db_url)
        if engine.dialect.name == "sqlite":
            Path(make_url(db_url).database or "").parent.mkdir(parents=True, exist_ok=True)
            async with engine.connect() as conn:  # the old store ran its SQLite files in WAL mode too
                await conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(legacy_runner_schema, legacy)
                stamp = T0 if conn.dialect.name == "postgresql" else T0.replace(tzinfo=None)
                await conn.execute(sa.text(
                    "INSERT INTO issued_cards (uuid, rule_id, rule_version, indicator, hook, hook_instance, "
                    "issued_at, suggestion_uuids) VALUES ('old0', 'pregnancy', 2, 'critical', 'order-sign', 'h', "
                    ":at, '[]')"), {"at": stamp})
                entry = overridden("old0", "negative-pregnancy-test")
                received = ", received_at" if legacy >= 3 else ""
                await conn.execute(sa.text(
                    "INSERT INTO feedback (card_uuid, outcome, accepted_suggestions, override_reason_system, "
                    f"override_reason_code, outcome_timestamp, dedup_key{received}) VALUES ('old0', 'overridden', "
                    f"'[]', :system, 'negative-pregnancy-test', :at, :key{', :at' if received else ''})"),
                    {"system": entry.override_reason_system, "at": stamp, "key": entry.dedup_key()})
        finally:
            await engine.dispose()

    async def upgrade() -> None:
        stores = await asyncio.gather(*(Store.open(db_url) for _ in range(4)))  # workers starting together
        try:
            store = stores[0]
            assert await store.schema_version() == migrations.LATEST
            assert await alembic_revision(store) == migrations.revision_id(migrations.LATEST)
            assert await schema_differences(store) == []
            async with store.engine.connect() as conn:
                legacy_rows = (await conn.execute(sa.text("SELECT max(version) FROM cds_schema_version"))).scalar()
                assert legacy_rows == legacy  # the old table is left as it was (see cds/store/migrations)
                received = (await conn.execute(sa.select(feedback.c.received_at))).scalar_one()
                assert received == T0  # backfilled from the outcome time, or as written
            assert await store.summary() == {"rules": [
                {"rule": "pregnancy", "version": "2", "issued": 1, "silent": 0, "accepted": 0, "overridden": 1,
                 "override_reasons": {"negative-pregnancy-test": 1}, "suppressed": 0}]}
            assert await store.record_feedback([overridden("old0", "negative-pregnancy-test")]) == 0  # deduplicated
            await store.record_cards([card("new", repeat_key="rk-new", silent=False)])
            assert await store.record_feedback([accepted("new")]) == 1
            assert await store.claim_jti("after-upgrade", time.time() + 60) is True
        finally:
            for s in stores:
                await s.close()

    await build()
    await upgrade()


# ---------------------------------------------------------------------------------------------------- outage

@pytest.mark.anyio
async def test_unreachable_database_is_reported_and_counted() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1

    def errors(operation: str) -> float:
        return REGISTRY.get_sample_value("cds_store_errors_total", {"operation": operation}) or 0.0

    # callers catch StoreError for outages; an unknown card is the client's mistake, not an outage
    assert issubclass(StoreUnavailable, StoreError) and not issubclass(UnknownCard, StoreError)

    async def scenario() -> None:
        before = errors("open")
        with pytest.raises(StoreUnavailable):
            await Store.open(url, connect_timeout_s=1)
        assert errors("open") == before + 1
        store = await Store.open(url, migrate=False, connect_timeout_s=1)  # start degraded, connect later
        try:
            assert await store.ping(timeout_s=2) is False
            before = errors("record_cards")
            with pytest.raises(StoreUnavailable):
                await store.record_cards([card("x")])
            assert errors("record_cards") == before + 1
        finally:
            await store.close()

    await scenario()
    body, content_type = render_latest()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b'cds_store_errors_total{operation="record_cards"}' in body


@pytest.mark.anyio
async def test_lazy_open_migrates_on_first_use(db_url: str) -> None:
    async with await Store.open(db_url, migrate=False) as store:
        assert await store.schema_version() == 0
        await store.record_cards([card("a")])
        assert await store.schema_version() == migrations.LATEST
        assert (await store.summary())["rules"][0]["issued"] == 1


@pytest.mark.integration  # PostgreSQL
@pytest.mark.anyio
async def test_store_started_while_database_is_down_catches_up(pg_server: pg.PgServer) -> None:
    url = pg_server.new_database_url()  # not created yet: connections fail as if the server were down

    async def scenario() -> None:
        async with await Store.open(url, migrate=False) as store:
            assert await store.ping() is False
            with pytest.raises(StoreUnavailable):
                await store.record_cards([card("early")])
            await anyio.to_thread.run_sync(pg_server.create_database, url)  # the database comes up
            assert await store.ping() is True
            await store.record_cards([card("late")])  # migrates, then writes
            assert await store.record_feedback([accepted("late")]) == 1
            assert (await store.summary())["rules"][0]["issued"] == 1

    try:
        await scenario()
    finally:
        await anyio.to_thread.run_sync(pg_server.drop_database, url)  # pg's admin calls run their own event loop


@pytest.mark.anyio
async def test_unwritable_sqlite_directory_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(StoreUnavailable):
        await Store.open(f"sqlite+aiosqlite:///{tmp_path}/file/sub/cds.sqlite3")
