"""Helpers for the tests of the segmenters' child processes: a fake child module in place of the real
one, and whether a process is still alive."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest


def install_fake_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend, module_name: str, body: str) -> None:
    """Make ``backend`` (a module with a ``CHILD_MODULE``) run ``body`` as its child: a module of that
    name in a new folder on the child's PYTHONPATH, run with the child's argv."""
    package = tmp_path / "fakechild"
    package.mkdir()
    (package / f"{module_name}.py").write_text(textwrap.dedent(body))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setattr(backend, "CHILD_MODULE", module_name)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:  # ProcessLookupError included
        return False
