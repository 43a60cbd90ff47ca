"""Write 10,000 issued cards to the audit store and report what it costs (issue 14, step 5: the card sink).

    python bench/store_cards.py [--url sqlite+aiosqlite:////tmp/x.sqlite3] [--cards 10000] [--batch 500]

Cards go in as the audit writer sends them (batches of `--batch`, one `record_cards` call each). Reported:
wall time, this process's CPU time, and the event loop's worst and total lag seen by a 1 ms ticker running
meanwhile (the hook's cost: on SQLite the card writer is a thread, and its Python work holds the GIL that the
event loop needs). Each run uses a fresh database (a new SQLite file, or a new PostgreSQL database).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cds.store import IssuedCard, Store


def cards(n: int, run: int) -> list[IssuedCard]:
    now = datetime.now(UTC)
    return [IssuedCard(f"r{run}-card-{i:06d}", "pregnancy", 3, "critical", "order-sign", f"hi-{i // 3}",
                       f"ps-{i % 97}", now, [f"r{run}-card-{i}-s1", f"r{run}-card-{i}-s2"], f"rk-{i}", i % 10 == 0)
            for i in range(n)]


async def one_run(url: str, n: int, batch: int, run: int) -> dict[str, float]:
    rows = cards(n, run)
    async with await Store.open(url) as store:
        await store.record_cards(cards(10, run + 1000))  # warm up: connections, compiled statements, thread
        lags: list[float] = []
        stop = False

        async def ticker() -> None:
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        lags.clear()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, n, batch):
            await store.record_cards(rows[start:start + batch])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop = True
        await tick
    return {"wall_ms": wall * 1000, "cpu_ms": cpu * 1000, "lag_max_ms": max(lags) * 1000,
            "lag_sum_ms": sum(lags) * 1000, "ticks": len(lags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a database URL (default: a new SQLite file per run)")
    parser.add_argument("--postgresql", action="store_true", help="a new database per run on tests/pg.py's server")
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            url, drop = args.url or f"sqlite+aiosqlite:///{tmp}/run{run}.sqlite3", None
            if args.postgresql:
                import pg

                server = pg.server()
                url = server.create_database()
                drop = server.drop_database
            try:
                results.append(asyncio.run(one_run(url, args.cards, args.batch, run)))
            finally:
                if drop is not None:
                    drop(url)
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"{key:>11}: median {statistics.median(values):8.1f}  min {min(values):8.1f}  "  # noqa: T201
              f"max {max(values):8.1f}")


if __name__ == "__main__":
    main()
