# syntax=docker/dockerfile:1
# One image for every process of the product: web, the two kinds of worker, beat and one-off commands
# (deploy/entrypoint.sh names them). docs/production.md, "Running in production", says how to run it.
#
#   docker build -t bitrix24-backend .
#   docker build --build-arg BASE=local/python:3.11-bookworm -t bitrix24-backend .   (a base of your own)
#
# BASE: a Debian-based image with Python 3.11 (and its venv module). The default is the official slim one.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
COPY requirements.txt /app/requirements.txt
# The runtime part of requirements.txt only (up to its "# Tests and checks" line): no test or docs tools in
# the image. Wheels first: no compiler is needed, and none reaches the final stage.
RUN sed '/^# Tests and checks/,$d' /app/requirements.txt > /tmp/runtime.txt \
 && /opt/venv/bin/pip install --prefer-binary -r /tmp/runtime.txt
COPY . /app
WORKDIR /app
# The static files, gathered and compressed once, at build (WhiteNoise serves them). Throw-away settings:
# collectstatic reads no secret and touches no database.
RUN DJANGO_DEBUG=0 DJANGO_SECRET_KEY=collectstatic-only BITRIX24_TOKEN_KEYS=ZmFrZS1rZXktZm9yLWNvbGxlY3RzdGF0aWMtb25seS0= \
    DJANGO_VAR_DIR=/tmp/var DJANGO_STATIC_ROOT=/app/static PROMETHEUS_MULTIPROC_DIR= \
    /opt/venv/bin/python manage.py collectstatic --noinput --verbosity 0 \
 && rm -rf /tmp/var /app/var /app/.git /app/tests /app/bench /app/docs /app/.ci \
 && find /app /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
# tini as PID 1 forwards a stop signal to the whole process group (-g): a worker stops only after the
# refresh in hand is stored (docs: the stop grace). The local Debian base has it; the slim one gets it here.
RUN command -v tini >/dev/null || { apt-get update && apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*; } \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/bitrix24 && chown app /var/lib/bitrix24
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_VAR_DIR=/var/lib/bitrix24 DJANGO_STATIC_ROOT=/app/static \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics PORT=8000
WORKDIR /app
USER app
# The renewal copies (the second copy of a refresh answer) and the process's own files: a volume the
# workers share.
VOLUME ["/var/lib/bitrix24"]
EXPOSE 8000
# SIGINT: Celery's warm shutdown (finish the task in hand); gunicorn stops gracefully on it too.
STOPSIGNAL SIGINT
ENTRYPOINT ["tini", "-g", "--", "/app/deploy/entrypoint.sh"]
CMD ["web"]
