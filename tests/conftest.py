"""Shared fixtures: a small crop of the bundled CT and a runner for the real ``dosebench`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dosebench.core.data import sample_ct

#: Voxel ranges of the crop (start, stop) per axis of the bundled 122 x 101 x 30 CT (3 mm voxels):
#: the whole body cross-section in-plane (the abdomen spans ~112 x 89 voxels, so a central 64 x 56
#: window would cut through it), 8 central slices. The offsets are non-zero, so the crop's origin
#: differs from the bundled CT's and outputs must carry the crop's own affine to pass.
CROP = ((1, 117), (3, 99), (11, 19))

#: Seconds one CLI call may take: numba compiles the kernels on first use (~15 s, cached after).
CLI_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def cropped_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 116 x 96 x 8 crop of the bundled CT (int16 HU, correct affine) as a NIfTI file."""
    source = nib.load(str(sample_ct()))
    data = np.asarray(source.dataobj)
    (i0, i1), (j0, j1), (k0, k1) = CROP
    crop = np.ascontiguousarray(data[i0:i1, j0:j1, k0:k1]).astype(np.int16)

    # The body (largest connected component above -300 HU) must lie inside the crop, not touch its sides.
    labels, n = ndimage.label(crop > -300)
    assert n >= 1
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    body = np.argwhere(labels == int(np.argmax(sizes)) + 1)
    assert body[:, :2].min() > 0 and np.all(body[:, :2].max(axis=0) < np.array(crop.shape[:2]) - 1), \
        "the crop cuts through the body"

    affine = np.array(source.affine, dtype=np.float64)
    affine[:, 3] = source.affine @ np.array([i0, j0, k0, 1.0])
    image = nib.Nifti1Image(crop, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = tmp_path_factory.mktemp("input") / "ct_crop.nii.gz"
    nib.save(image, str(path))
    return path


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # Plain, unwrapped text whatever the caller's terminal settings are.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli("run", "--input", ...)`` runs ``python -m dosebench.cli ...`` as a real subprocess
    (in a scratch working directory) and returns the CompletedProcess with text stdout/stderr."""
    workdir = tmp_path_factory.mktemp("cli-cwd")

    def run(*args: str | os.PathLike[str], timeout: float = CLI_TIMEOUT_S,
            executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        command = (executable or [sys.executable, "-m", "dosebench.cli"]) + [str(a) for a in args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir,
                              env=_cli_env(), check=False)

    return run


# -- the service system: a throwaway PostgreSQL database and a dedicated Redis database ---------------

#: Where the test servers are (CI starts both): the PostgreSQL maintenance database and Redis.
POSTGRES_ADMIN_URL = os.environ.get("DOSEBENCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("DOSEBENCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _unavailable(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a missing server is a failure, never a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the service tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_url() -> str:
    """A fresh PostgreSQL database ``dosebench_test_<random>`` for each test module, dropped after: no
    module sees another's rows (a schedule left enabled, a job its reaper would send, a cohort holding
    a study another module deletes)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"dosebench_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem means "not available"
        admin.dispose()
        _unavailable(f"PostgreSQL at {make_url(POSTGRES_ADMIN_URL).render_as_string()} is not reachable: "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from dosebench.core.db import session_factory

    for factory_url in (url,):
        try:
            session_factory(factory_url).kw["bind"].dispose()
        except Exception:  # noqa: BLE001
            pass
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The dedicated Redis database of the tests (DOSEBENCH_TEST_REDIS_URL, default db 15). It is not
    flushed as a whole: test sessions running at the same time share it, each under its own key prefix
    (the ``broker_key_prefix`` fixture), and each deletes only its own keys."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        _unavailable(f"Redis at {REDIS_TEST_URL} is not reachable: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    return REDIS_TEST_URL


@pytest.fixture(scope="session")
def broker_key_prefix(redis_url: str) -> str:
    """A key prefix of this test session's own (DOSEBENCH_BROKER_KEY_PREFIX), its keys flushed before and after."""
    import uuid

    import redis

    prefix = f"dosebench-test-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(redis_url)

    def flush() -> None:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)

    flush()
    yield prefix
    flush()
    client.close()
