"""conftest's MUST_RUN: where a stage sets ENTSKIP_REQUIRE_TIMM=1 (or ENTSKIP_REQUIRE_CUDA_BUILD=1),
a skipped test of its file fails; "needs a CUDA GPU" stays a skip on a machine without one.

The hook is driven directly with a skipped report of each kind.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import conftest


def _outcome(file_name: str, reason: str) -> str:
    """The outcome ``conftest.pytest_runtest_makereport`` leaves on a report skipped for ``reason``."""
    report = types.SimpleNamespace(skipped=True, outcome="skipped", longrepr=(file_name, 1, f"Skipped: {reason}"))
    hook = conftest.pytest_runtest_makereport(types.SimpleNamespace(path=Path("tests") / file_name), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(types.SimpleNamespace(get_result=lambda: report))
    return report.outcome


@pytest.mark.parametrize("var, file_name", sorted(conftest.MUST_RUN.items()))
def test_required_files_fail_their_skips(monkeypatch, var, file_name):
    monkeypatch.delenv(var, raising=False)
    assert _outcome(file_name, "could not import 'timm'") == "skipped"
    monkeypatch.setenv(var, "1")
    assert _outcome(file_name, "could not import 'timm'") == "failed"
    assert _outcome(file_name, "needs a CUDA GPU") == ("failed" if torch.cuda.is_available() else "skipped")
    assert _outcome("test_ops.py", "could not import 'timm'") == "skipped"
