"""``benchmarks/bench_family.py`` end to end on a tiny shape: every available implementation runs, they agree
on the loss, and the JSON / Markdown report has the rows and targets (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_family.py"


def test_bench_family_runs_and_the_implementations_agree(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("rich")
    out = tmp_path / "family.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "2,6,3,12", "--repeats", "1", "--max-warmup", "1",
                           "--no-memory", "--no-plots", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["loss"], r["impl"]): r for r in report["results"]}
    assert {loss for loss, _ in rows} == {"tdt", "multiblank", "modified"}
    for loss in ("tdt", "multiblank", "modified"):
        assert rows[(loss, "plain_torch")]["median_s"] > 0
        # The rnnt_xla rows either ran or say why not (this checkout may not have the loss yet).
        for impl in ("rnnt_xla_torch", "rnnt_xla_jax"):
            assert rows[(loss, impl)]["median_s"] or "not available" in rows[(loss, impl)]["error"]
    assert report["loss_disagreements"] == {}
    assert {t["loss"] for t in report["targets"]} == {"tdt", "multiblank", "modified"}
    markdown = out.with_suffix(".md").read_text()
    assert "| tdt | 2,6,3,12+5 | plain_torch |" in markdown and "### Targets" in markdown
