"""The main job: ``python -m rnnt_xla`` checks the built-in batch against the reference."""

from __future__ import annotations

import subprocess
import sys


def test_main_job_checks_against_the_reference():
    result = subprocess.run([sys.executable, "-m", "rnnt_xla", "check", "--repeats", "1"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "-> OK" in result.stdout
    assert "fwd+bwd" in result.stdout
