"""What ships for deploying (Dockerfile, compose.yaml, the systemd units) says what the product needs: the
stop grace before any kill, SIGINT to a worker's whole group, one beat, migrations first, health per service."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml

from config import timeouts

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "web", "worker-custody", "worker-app", "beat")


def _seconds(value: str) -> int:
    found = re.fullmatch(r"(\d+)(s|m)?", str(value))
    assert found, value
    return int(found[1]) * (60 if found[2] == "m" else 1)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_gives_every_worker_the_stop_grace_and_more(compose):
    """`python -m config.timeouts` prints the grace a refresh in hand may take; a kill before it loses the portal."""
    services = compose["services"]
    grace = timeouts.stop_grace_seconds()
    for name in ("web", "worker-custody", "worker-app"):
        assert _seconds(services[name]["stop_grace_period"]) >= grace + 10, name


def test_compose_runs_migrations_first_one_beat_and_a_health_check_per_service(compose):
    services = compose["services"]
    assert set(APP_SERVICES) <= set(services)
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    for name in ("web", "worker-custody", "worker-app", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "replicas" not in services[name].get("deploy", {})
    checks = {
        name: tuple(services[name]["healthcheck"]["test"])
        for name in ("web", "worker-custody", "worker-app", "beat")
    }
    assert len(set(checks.values())) == 4  # each its own
    assert checks["worker-custody"][-2:] == ("health-worker", "custody")
    # Redis keeps what it holds across a restart (broker messages, renewal copies).
    assert "--appendonly" in services["redis"]["command"]


def test_compose_workers_share_the_renewal_copies_folder(compose):
    services = compose["services"]
    for name in ("worker-custody", "worker-app", "web"):
        assert "appvar:/var/lib/bitrix24" in services[name]["volumes"]
    assert "DJANGO_VAR_DIR=/var/lib/bitrix24" in (ROOT / "Dockerfile").read_text().replace(" ", "")


def test_the_image_stops_gracefully_as_a_non_root_user_with_one_entry_point():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "STOPSIGNAL SIGINT" in dockerfile
    assert 'ENTRYPOINT ["tini", "-g", "--", "/app/deploy/entrypoint.sh"]' in dockerfile
    assert re.search(r"^USER app$", dockerfile, re.M)
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", dockerfile, re.M)
    assert dockerfile.count("\nFROM ") == 2  # build, then a final stage without compilers or caches
    assert "collectstatic" in dockerfile


def test_the_entry_point_serves_the_same_queues_as_the_process_manager():
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    supervisord = (ROOT / "config" / "supervisord.conf").read_text()
    assert '-Q "$queue.custody.now,$queue.custody,$queue"' in entrypoint
    assert (
        "-Q %(ENV_CELERY_QUEUE)s.custody.now,%(ENV_CELERY_QUEUE)s.custody,%(ENV_CELERY_QUEUE)s" in supervisord
    )
    assert '-Q "$queue.app"' in entrypoint


@pytest.mark.parametrize("unit", ["bitrix24-worker-custody", "bitrix24-worker-app"])
def test_systemd_stops_a_worker_with_sigint_to_its_group_after_the_grace(unit):
    service = _unit(unit)
    assert service["KillSignal"] == "SIGINT"
    assert service["KillMode"] == "control-group"
    assert int(service["TimeoutStopSec"]) >= timeouts.stop_grace_seconds() + 10


def test_systemd_web_and_beat():
    web, beat = _unit("bitrix24-web"), _unit("bitrix24-beat")
    assert "migrate" in web["ExecStartPre"] and "config/gunicorn.py" in web["ExecStart"]
    assert int(web["TimeoutStopSec"]) >= timeouts.stop_grace_seconds()
    assert beat["ExecStart"].endswith("celery -A config beat --loglevel INFO")


def test_the_example_env_file_holds_no_secret_and_names_known_settings():
    docs = (ROOT / "docs" / "settings.md").read_text()
    for line in (ROOT / ".env.example").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.split("=", 1)
        assert f"`{name}`" in docs or name == "POSTGRES_PASSWORD", name
        if any(word in name for word in ("SECRET", "KEY", "PASSWORD")):
            assert value == "", f"{name} must be empty in the example"


def _unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((ROOT / "deploy" / "systemd" / f"{name}.service").read_text())
    return parser["Service"]


def test_the_image_installs_the_runtime_requirements_only():
    """The Dockerfile keeps requirements.txt up to its "# Tests and checks" line: everything the product
    imports is above it, no test or docs tool is."""
    text = (ROOT / "requirements.txt").read_text()
    assert "\n# Tests and checks\n" in text
    runtime, _tools = text.split("\n# Tests and checks\n", 1)
    names = {line.split("==")[0].split("[")[0].lower() for line in runtime.splitlines() if "==" in line}
    assert {
        "django",
        "djangorestframework",
        "celery",
        "gunicorn",
        "whitenoise",
        "psycopg",
        "requests",
    } <= names
    assert not {"pytest", "mypy", "mkdocs", "playwright"} & names
    assert "sed '/^# Tests and checks/,$d'" in (ROOT / "Dockerfile").read_text()


def test_gunicorn_refuses_a_worker_timeout_shorter_than_the_web_wait():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "config" / "gunicorn.py")
    assert spec and spec.loader
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    least = timeouts.web_request_timeout_seconds()
    assert conf.timeout == least and conf.timeout_problem(conf.timeout) == ""
    assert "raise --timeout to at least 30" in conf.timeout_problem(10)
    assert conf.graceful_timeout >= timeouts.stop_grace_seconds()


@pytest.mark.system
def test_gunicorn_does_not_start_with_a_contradicting_timeout(tmp_path):
    import subprocess
    import sys

    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_DEBUG": "1",
        "DJANGO_VAR_DIR": str(tmp_path),
        "PORT": "0",
        "GUNICORN_CMD_ARGS": "--timeout 10",
    }
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "gunicorn's worker timeout (10 s) is shorter than a request may wait" in done.stderr


@pytest.mark.django_db
def test_beat_health_follows_what_beat_recorded():
    from datetime import timedelta

    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.utils import timezone
    from django_celery_beat.models import PeriodicTask

    sweep = PeriodicTask.objects.get(task="events.tasks.sweep_events")  # created by a migration
    with pytest.raises(CommandError, match=r"has not sent events\.tasks\.sweep_events since ever"):
        call_command("beat_health")
    PeriodicTask.objects.filter(pk=sweep.pk).update(last_run_at=timezone.now() - timedelta(minutes=4))
    call_command("beat_health")  # beat records its sends every three minutes: still fine
    PeriodicTask.objects.filter(pk=sweep.pk).update(last_run_at=timezone.now() - timedelta(minutes=7))
    with pytest.raises(CommandError, match="has not sent"):
        call_command("beat_health")


def test_supervisord_gives_every_worker_the_stop_grace_bin_run_computes():
    """bin/run's supervisord: each worker's stopwaitsecs is the grace `python -m config.timeouts` prints
    (bin/run exports it), so a refresh in hand is never killed by the process manager."""
    conf = (ROOT / "config" / "supervisord.conf").read_text()
    run = (ROOT / "bin" / "run").read_text()
    assert "BITRIX24_STOP_GRACE_SECONDS=$(.venv/bin/python -m config.timeouts)" in run
    assert "export BITRIX24_STOP_GRACE_SECONDS" in run
    programs = {block.split("]", 1)[0]: block for block in conf.split("[program:")[1:]}
    for name in ("worker-custody", "worker-app"):
        assert "stopsignal=INT" in programs[name], name
        assert "stopasgroup=true" in programs[name], name
        assert "stopwaitsecs=%(ENV_BITRIX24_STOP_GRACE_SECONDS)s" in programs[name], name
