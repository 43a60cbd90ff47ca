"""Card detail length over the scenario corpus: how much a clinician reads in a narrow EHR side panel.

`.venv/bin/python bench/cardtext.py [ROOT]` starts `python -m cds` (dev mode) from ROOT (default: this checkout,
with ROOT's own .venv), posts every scenario of this checkout's fixtures/scenarios/ to the path it names (the
legacy order-hook URL by default) and prints the characters of each card's `detail`: median, 90th percentile,
maximum, and the median of the typical card (one piece of evidence, one mesotherapy order).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
from conftest import free_port, with_dates  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "CDS_ENV": "dev", "CDS_LOG_LEVEL": "WARNING",
                "CDS_DATA_DIR": tempfile.mkdtemp(prefix="cds-cardtext-")})
    proc = subprocess.Popen([str(root / ".venv/bin/python"), "-m", "cds"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        lengths, typical = [], []
        for path in sorted((HERE / "fixtures/scenarios").glob("*.json")):
            scenario = with_dates(json.loads(path.read_text(encoding="utf-8")))
            if "request" not in scenario:
                continue
            url = base + scenario.get("path", "/cds-services/mesotherapy-contraindications")
            response = httpx.post(url, json=scenario["request"], timeout=10)
            if response.status_code != 200:
                continue
            for card in response.json()["cards"]:
                n = len(card["detail"])
                lengths.append(n)
                if card["detail"].count("\n- ") <= 1:  # one piece of evidence (listed, or on the Found line)
                    typical.append(n)
        q = statistics.quantiles(lengths, n=10)
        sys.stdout.write(json.dumps({"root": str(root), "cards": len(lengths), "median": statistics.median(lengths),
                          "p90": q[-1], "max": max(lengths), "typical_cards": len(typical),
                          "typical_median": statistics.median(typical)}) + "\n")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
