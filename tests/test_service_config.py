"""Service settings, the Celery configuration and the service commands (no servers needed)."""

from __future__ import annotations

import sqlite3

import pytest
from pydantic import ValidationError

from dosebench.core.celery_app import GPU_QUEUES, STAGE_TASKS, TASK_QUEUES, celery_config
from dosebench.core.db import MIGRATIONS
from dosebench.core.service_cli import worker_argv
from dosebench.core.settings import QUEUES, Settings


def test_settings_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DOSEBENCH_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("DOSEBENCH_DATABASE_URL", "postgresql+psycopg://u@db/dosebench")
    settings = Settings()
    assert settings.max_attempts == 5 and settings.database_url.startswith("postgresql")
    assert settings.storage_url.startswith("file:///") and settings.upload_limit_bytes == 2 * 1024**3
    assert settings.broker_url == "redis://127.0.0.1:6379/0"


def test_the_visibility_timeout_must_exceed_every_hard_limit() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT_S .* must exceed the reconstruct hard"):
        Settings(visibility_timeout_s=4000)
    with pytest.raises(ValidationError, match="SEGMENT_SOFT_TIME_LIMIT_S .* must be below"):
        Settings(segment_soft_time_limit_s=5000)
    with pytest.raises(ValidationError, match="STALE_AFTER_S"):
        Settings(stale_after_s=5, heartbeat_interval_s=10)
    settings = Settings()
    assert all(settings.time_limits(q)[1] < settings.visibility_timeout_s for q in QUEUES)


def test_celery_configuration() -> None:
    settings = Settings(visibility_timeout_s=9999, reaper_interval_s=7)
    config = celery_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["broker_transport_options"]["visibility_timeout"] == 9999
    assert config["result_backend_transport_options"]["visibility_timeout"] == 9999
    assert {q.name for q in config["task_queues"]} == set(QUEUES)
    assert {config["task_routes"][STAGE_TASKS[s]]["queue"] for s in STAGE_TASKS} == set(QUEUES)
    assert config["task_routes"]["dosebench.acquire"]["queue"] == "simulate"
    assert config["task_routes"]["dosebench.evaluate"]["queue"] == "evaluate"
    for task, queue in TASK_QUEUES.items():
        soft, hard = settings.time_limits(queue)
        assert config["task_annotations"][task] == {"soft_time_limit": soft, "time_limit": hard}
    assert "global_keyprefix" not in config["broker_transport_options"]
    prefixed = celery_config(Settings(broker_key_prefix="site-a:"))
    assert prefixed["broker_transport_options"]["global_keyprefix"] == "site-a:"
    assert prefixed["result_backend_transport_options"]["global_keyprefix"] == "site-a:"
    assert config["beat_schedule"]["reap"] == {"task": "dosebench.reap", "schedule": 7, "options": {"expires": 7}}


def test_the_tasks_are_registered() -> None:
    import dosebench.reconstructor.tasks  # noqa: F401
    import dosebench.segmenter.tasks  # noqa: F401
    import dosebench.simulator.tasks  # noqa: F401
    from dosebench.core.celery_app import app

    assert set(TASK_QUEUES) <= set(app.tasks)


def test_gpu_queues_serve_one_task_per_process() -> None:
    assert set(GPU_QUEUES) == {"reconstruct", "segment"}
    argv = worker_argv("simulate,reconstruct", concurrency=2)
    assert argv[argv.index("--max-tasks-per-child") + 1] == "1"
    assert argv[argv.index("--queues") + 1] == "simulate,reconstruct"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert "--max-tasks-per-child" not in worker_argv("simulate,evaluate")
    assert "--beat" in worker_argv("evaluate", beat=True)
    with pytest.raises(ValueError, match="unknown queues"):
        worker_argv("simulate,gpu")


def test_migrations_are_packaged() -> None:
    assert (MIGRATIONS / "env.py").is_file() and (MIGRATIONS / "script.py.mako").is_file()
    assert (MIGRATIONS / "versions" / "0001_initial.py").is_file()


def test_db_upgrade_command(run_cli, tmp_path) -> None:
    database = tmp_path / "sub" / "service.db"
    result = run_cli("db", "upgrade", "--url", f"sqlite:///{database}")
    assert result.returncode == 0, result.stderr
    tables = {row[0] for row in sqlite3.connect(database).execute("select name from sqlite_master where type='table'")}
    assert {"studies", "jobs", "stages", "artifacts", "metrics", "api_tokens", "alembic_version"} <= tables
    assert run_cli("db", "upgrade", "--url", f"sqlite:///{database}").returncode == 0  # idempotent


def test_worker_command_refuses_unknown_queues(run_cli) -> None:
    result = run_cli("worker", "--queues", "simulate,nope")
    assert result.returncode == 2 and "unknown queues" in result.stderr


def test_each_task_reaches_exactly_its_queue() -> None:
    from dosebench.core.celery_app import app

    for task, queue in TASK_QUEUES.items():
        route = app.amqp.router.route({}, task)
        assert route["queue"].name == queue
        assert route["queue"].exchange.name == queue and route["queue"].routing_key == queue
    bindings = {(q.exchange.name, q.routing_key) for q in app.conf.task_queues}
    assert len(bindings) == len(QUEUES)  # no two queues share a binding (a message would go to both)
