"""Wall time of one evaluation run of a three-study cohort through the real service (figures, not a test).

``python -m benchmarks.cohort_evaluation [--protocol demo] [--doses 0.2,0.4,0.6,0.8,1.0]``

Needs PostgreSQL and Redis (DOSEBENCH_TEST_POSTGRES_URL / DOSEBENCH_TEST_REDIS_URL, as the tests). Makes a
throwaway database, three studies (10-slice slabs of the bundled CT), starts one ``dosebench worker``
(solo pool: one stage at a time; numba uses every core inside it) and one ``dosebench beat``, warms the
worker up with a tiny run (numba compiles on first use), then times ``start_run`` to the stored Table 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.scratch_database import scratch_database
from dosebench.core import cohorts
from dosebench.core.data import sample_ct
from dosebench.core.db import RUNNING, session_factory, upgrade_database
from dosebench.core.doses import parse_doses
from dosebench.core.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get("DOSEBENCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DOSEBENCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SLABS = ((0, 10), (10, 20), (20, 30))


def _slabs(folder: Path) -> list[Path]:
    source = nib.load(str(sample_ct()))
    data = np.asarray(source.dataobj)
    paths = []
    for k0, k1 in SLABS:
        affine = np.array(source.affine, dtype=np.float64)
        affine[:, 3] = source.affine @ np.array([0, 0, k0, 1.0])
        image = nib.Nifti1Image(np.ascontiguousarray(data[:, :, k0:k1]).astype(np.int16), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        paths.append(folder / f"slab_{k0}_{k1}.nii.gz")
        nib.save(image, str(paths[-1]))
    return paths


def _wait(settings: Settings, run_id: str, timeout_s: float) -> tuple[float, object]:
    started = time.perf_counter()
    with session_factory(settings.database_url)() as session:
        while time.perf_counter() - started < timeout_s:
            run = cohorts.advance_run(session, run_id, settings.storage_url)
            if run.state != RUNNING:
                return time.perf_counter() - started, run
            time.sleep(0.5)
    raise TimeoutError(f"run {run_id} not finished after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="demo")
    parser.add_argument("--doses", default="0.2,0.4,0.6,0.8,1.0")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    with scratch_database(POSTGRES_ADMIN_URL) as (name, database_url):
        processes: list[subprocess.Popen] = []
        with tempfile.TemporaryDirectory(prefix="dosebench-bench-") as scratch:
            root = Path(scratch)
            (root / "storage").mkdir()
            values = {"DATABASE_URL": database_url, "BROKER_URL": REDIS_URL, "BROKER_KEY_PREFIX": f"{name}:",
                      "STORAGE_URL": f"file://{root / 'storage'}", "EVALUATION_INTERVAL_S": "2"}
            settings = Settings(**{k.lower(): v for k, v in values.items()})
            env = dict(os.environ, **{f"DOSEBENCH_{k}": v for k, v in values.items()})
            try:
                upgrade_database(database_url)
                from dosebench.core import celery_app

                celery_app.configure(settings)
                for command in (["worker", "--queues", "simulate,reconstruct,segment,evaluate", "--pool", "solo"],
                                ["beat", "--schedule", str(root / "beat.schedule")]):
                    processes.append(subprocess.Popen([sys.executable, "-m", "dosebench.cli", *command], env=env,
                                                      cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                      start_new_session=True))
                enqueue = lambda job_id: celery_app.enqueue_ready(job_id, settings)  # noqa: E731
                with session_factory(database_url)() as session:
                    ids = [cohorts.store_study(session, p, settings.storage_url, name=p.stem).id for p in _slabs(root)]
                    warm = cohorts.create_cohort(session, "warm-up", ids[:1])
                    cohort = cohorts.create_cohort(session, "three", ids)
                    run, _ = cohorts.start_run(session, warm, cohorts.EvaluationRequest(protocol="tiny", doses=(0.5,)),
                                               enqueue)
                _wait(settings, run.id, args.timeout)
                load_before = os.getloadavg()
                with session_factory(database_url)() as session:
                    request = cohorts.EvaluationRequest(protocol=args.protocol, doses=tuple(parse_doses(args.doses)))
                    run, _ = cohorts.start_run(session, cohort, request, enqueue)
                seconds, run = _wait(settings, run.id, args.timeout)
                load_after = os.getloadavg()
                print(f"cohort of 3 studies ({', '.join(f'{k1 - k0} slices' for k0, k1 in SLABS)} of the bundled CT), "
                      f"protocol {args.protocol}, doses {args.doses}: {seconds:.1f} s wall, run {run.state}, "
                      f"{run.counts.get('succeeded')} of 3 succeeded; {os.cpu_count()} cores; "
                      f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
                print(f"Table 1 (all labels): {run.table1.get('full_dose', {}).get('all')}")
            finally:
                for process in processes:
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGTERM)
                        process.wait(timeout=30)
                from dosebench.core import celery_app

                celery_app.configure()
                session_factory(database_url).kw["bind"].dispose()


if __name__ == "__main__":
    main()
