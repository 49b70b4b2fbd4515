"""Latency of ``GET /v1/jobs/{id}`` under many pollers: ``python -m benchmarks.api_latency``.

Starts ``dosebench serve`` on 127.0.0.1 (a free port) against a throwaway PostgreSQL database
``dosebench_bench_<random>`` (dropped afterwards), writes one job row with its stage rows, then runs
``--concurrency`` pollers (default 50) that share ``--requests`` GETs (default 2000) of that job, and
prints the latency percentiles and the throughput. Then the cost of one dashboard poll of the job list
(``GET /v1/jobs?stages=true`` over ``--list-jobs`` jobs): a full 200 answer against the idle poll the
dashboard sends (``updated_since`` + ``If-None-Match``, answered 304), in ms and bytes on the wire
(status line, headers and body). Loopback only; figures are printed, never asserted.

Environment: DOSEBENCH_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from benchmarks.scratch_database import scratch_database

ADMIN_URL = os.environ.get("DOSEBENCH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seed(url: str, n_jobs: int = 1) -> tuple[str, str]:
    """A token and ``n_jobs`` queued jobs (with their stage rows) in the database at ``url``; the first's id."""
    from dosebench.api.tokens import create_token
    from dosebench.core import jobs
    from dosebench.core.db import session_factory, upgrade_database
    from dosebench.core.protocol import load_protocol
    from dosebench.stages import JobSpec

    upgrade_database(url)
    token = create_token(url, "benchmark")
    with session_factory(url)() as session:
        study = jobs.add_study(session, name="bench", input_uri="file:///nonexistent/input.nii.gz", kind="nifti",
                               checksum="0" * 64, bytes=0, header_summary={})
        spec = JobSpec(input_url=study.input_uri, doses=[0.2, 0.4, 0.6, 0.8], protocol=load_protocol("tiny"))
        job_id = jobs.create_job(session, study, spec, requested_by="benchmark").id
        for _ in range(n_jobs - 1):
            jobs.create_job(session, study, spec, requested_by="benchmark")
    session_factory(url).kw["bind"].dispose()
    return token, job_id


async def _poll(base: str, token: str, job_id: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=30) as client:
        async def poller() -> None:
            for _ in remaining:
                started = time.perf_counter()
                response = await client.get(f"/v1/jobs/{job_id}")
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"GET /v1/jobs/{job_id} -> {response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(poller() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _wire_bytes(response: httpx.Response) -> int:
    status_line = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")
    headers = sum(len(name) + len(value) + 4 for name, value in response.headers.raw)
    return status_line + headers + 2 + len(response.content)


def _poll_cost(base: str, token: str, repeats: int) -> None:
    """One dashboard poll of the job list: full answer vs the idle (304) answer."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        listing = {"stages": "true", "limit": "100"}
        first = client.get("/v1/jobs", params=listing)
        idle = {**listing, "updated_since": first.json()["server_time"]}
        etag = client.get("/v1/jobs", params=idle).headers["ETag"]
        for name, params, headers in (("full list, 200", listing, {}),
                                      ("idle poll (updated_since + If-None-Match)", idle, {"If-None-Match": etag})):
            times, sizes, statuses = [], [], set()
            for _ in range(repeats):
                started = time.perf_counter()
                response = client.get("/v1/jobs", params=params, headers=headers)
                times.append((time.perf_counter() - started) * 1000)
                sizes.append(_wire_bytes(response))
                statuses.add(response.status_code)
            print(f"  {name}: status {sorted(statuses)}, p50 {_percentile(times, 50):.1f} ms, "
                  f"p90 {_percentile(times, 90):.1f} ms, {statistics.median(sizes):.0f} bytes")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="API processes (dosebench serve --workers)")
    parser.add_argument("--list-jobs", type=int, default=50, help="jobs in the database for the list poll")
    parser.add_argument("--list-repeats", type=int, default=200, help="polls per case of the list poll cost")
    args = parser.parse_args()

    with scratch_database(ADMIN_URL) as (_, url):
        server = None
        try:
            token, job_id = _seed(url, args.list_jobs)
            port = _free_port()
            storage = tempfile.mkdtemp(prefix="dosebench-bench-")
            env = {**os.environ, "DOSEBENCH_DATABASE_URL": url, "DOSEBENCH_STORAGE_URL": f"file://{storage}",
                   "DOSEBENCH_BROKER_URL": "memory://"}
            server = subprocess.Popen([sys.executable, "-m", "dosebench.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(port), "--workers", str(args.workers), "--log-level", "warning"],
                                      env=env)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/v1/healthz", timeout=2).status_code in (200, 503):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("dosebench serve did not come up")
                time.sleep(0.2)
            asyncio.run(_poll(base, token, job_id, min(100, args.requests), args.concurrency))  # warm-up
            latencies, wall = asyncio.run(_poll(base, token, job_id, args.requests, args.concurrency))
            ms = [v * 1000 for v in latencies]
            print(f"GET /v1/jobs/{{id}} (a job of 5 doses: 17 stage rows), {args.requests} requests, {args.concurrency} "
                  f"concurrent pollers, {args.workers} API process(es), PostgreSQL, loopback:")
            print(f"  p50 {_percentile(ms, 50):.1f} ms   p90 {_percentile(ms, 90):.1f} ms   "
                  f"p99 {_percentile(ms, 99):.1f} ms   max {max(ms):.1f} ms   mean {statistics.fmean(ms):.1f} ms")
            print(f"  throughput {args.requests / wall:.0f} requests/s ({wall:.2f} s)")
            print(f"GET /v1/jobs?stages=true (the dashboard's poll), {args.list_jobs} jobs, {args.list_repeats} sequential "
                  f"polls per case; load average {os.getloadavg()[0]:.1f}:")
            _poll_cost(base, token, args.list_repeats)
        finally:
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()


if __name__ == "__main__":
    main()
