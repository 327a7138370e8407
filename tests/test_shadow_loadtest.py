"""The isolation load test still runs (tiny and without timing claims: figures go in notes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "loadtest" / "shadow_isolation.py"


def test_shadow_isolation_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rate", "50", "--seconds", "0.5", "--rounds", "1",
         "--json"],
        capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    conditions = result["conditions"]
    assert set(conditions) == {"off", "down", "slow"}
    assert all(c["errors"] == 0 and c["requests"] == 25 for c in conditions.values())
    assert conditions["down"]["shadow_errors"] + conditions["down"]["dropped"] == 25
    assert conditions["off"]["mirrored"] == 0
    assert result["gateway_rss_mib"]["peak"] > 0
