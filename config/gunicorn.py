"""gunicorn's settings in production: `gunicorn -c config/gunicorn.py config.wsgi` (docs/production.md,
"Running in production"). Every figure can still be overridden on the command line or in GUNICORN_CMD_ARGS."""

import multiprocessing
import os
import sys
from pathlib import Path

# gunicorn loads this file by path: make the project importable for config.timeouts.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import timeouts

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

# Sync workers: one request per process, so a renewal made for a request runs on the main thread,
# where portals.stopping can hold a stop until the new pair is stored. Requests mostly wait on
# Bitrix24, not on the CPU; past a dozen processes per machine, add machines rather than workers.
worker_class = "sync"
workers = int(os.environ.get("WEB_CONCURRENCY", "0")) or min(2 * multiprocessing.cpu_count() + 1, 12)

# A request may wait BITRIX24_WEB_TOKEN_WAIT_SECONDS for a token renewal and then still do its own
# work; a worker silent for longer than that is stuck, and the master replaces it. (The kill is a
# SIGKILL: a timeout shorter than one OAuth attempt could cut a refresh in half, so requests must
# never wait for longer than BITRIX24_WEB_TOKEN_WAIT_SECONDS.)
timeout = timeouts.web_request_timeout_seconds()

# On a stop (SIGTERM, or a restart's SIGHUP) a worker finishes the request in hand. Requests never
# refresh tokens themselves (portals/middleware.py hands renewals to Celery workers), so this is the
# same grace the process manager gives (config/supervisord.conf stopwaitsecs), with room to spare.
graceful_timeout = timeouts.stop_grace_seconds()

# The TLS-terminating proxy sets X-Forwarded-Proto (Django trusts it: SECURE_PROXY_SSL_HEADER).
# gunicorn trusts forwarded headers only from these addresses; when the proxy is on another host,
# set FORWARDED_ALLOW_IPS to its address(es). Never "*" on a port the internet can reach directly.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# No access log here: the proxy keeps one, and request lines may carry query strings that
# portals.logging's token filter (on Django's loggers) never sees.


def on_starting(server):  # type: ignore[no-untyped-def]
    """Refuse to start with a worker timeout shorter than a request may wait for a token renewal (set on the
    command line or in GUNICORN_CMD_ARGS over the figure above): gunicorn would kill the worker mid-request
    and the client get gunicorn's own HTML 500 instead of the product's 503 with Retry-After."""
    problem = timeout_problem(server.cfg.timeout)
    if problem:
        server.log.error(problem)
        raise SystemExit(problem)


def timeout_problem(worker_timeout: float) -> str:
    """Why `worker_timeout` contradicts the web wait, or "" when it does not."""
    least = timeouts.web_request_timeout_seconds()
    if worker_timeout and worker_timeout < least:
        return (
            f"gunicorn's worker timeout ({worker_timeout:g} s) is shorter than a request may wait for a token "
            f"renewal (BITRIX24_WEB_TOKEN_WAIT_SECONDS={timeouts.web_token_wait_seconds()} + "
            f"{timeouts.WEB_REQUEST_MARGIN_SECONDS} s): raise --timeout to at least {least} or lower the wait"
        )
    return ""
