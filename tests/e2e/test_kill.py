"""A short kill test on the real embedded model: three SIGKILLs, one per operation.

``bench/killtest.py --kills 50`` is the full run; this keeps CI exercising the same code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

KILLTEST = Path(__file__).resolve().parents[2] / "bench" / "killtest.py"


def test_killing_remember_sleep_and_forget_loses_nothing_committed(fresh_model, written_folders):
    spec = importlib.util.spec_from_file_location("killtest", KILLTEST)
    killtest = importlib.util.module_from_spec(spec)
    sys.modules["killtest"] = killtest  # its dataclasses look their module up
    spec.loader.exec_module(killtest)
    backend, source = fresh_model  # this process reads the folders with the run's model
    checker = killtest.Checker(source, backend)
    result = killtest.run(
        kills=3, seed=1, log=lambda line: None, checker=checker, start=written_folders[3]
    )
    assert result["summary"]["kills"] == 3
    assert killtest.summary_line(result).endswith(
        "folders that failed to open: 0, committed memories lost: 0, recall changed: 0"
    ), result
