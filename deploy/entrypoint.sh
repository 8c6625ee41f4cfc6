#!/bin/sh
# The image's one entry point (run under `tini -g`, which passes a stop signal to the whole process group):
# the first argument says which process of the product this container is. Every one of them reads its
# settings from the environment (docs/settings.md).
#
#   web              gunicorn with config/gunicorn.py (PORT, default 8000)
#   worker-custody   the custody worker: renewals, uninstall confirmations (queues .custody.now, .custody, bare)
#   worker-app       the app's worker: event handlers, offline pulls, bindings syncs (queue .app)
#   beat             the scheduler: exactly one per deployment
#   migrate          apply the database migrations (run it before the rest on every deploy)
#   manage ARGS      any manage.py command: createsuperuser, renew_tokens, bitrix24_sync, rotate_token_keys …
#   health-web | health-worker | health-beat   the containers' health checks
set -eu
cd /app
queue="${CELERY_QUEUE:-bitrix24}"
concurrency="${CELERY_CONCURRENCY:-4}"
role="${1:-web}"
[ "$#" -gt 0 ] && shift
case "$role" in
  web)
    exec gunicorn -c config/gunicorn.py config.wsgi "$@" ;;
  worker-custody)
    exec celery -A config worker --loglevel INFO --hostname "custody@%h" --concurrency "$concurrency" \
      -Q "$queue.custody.now,$queue.custody,$queue" "$@" ;;
  worker-app)
    exec celery -A config worker --loglevel INFO --hostname "app@%h" --concurrency "$concurrency" \
      -Q "$queue.app" "$@" ;;
  beat)
    # The schedule lives in the database (django-celery-beat): nothing to keep in the container.
    exec celery -A config beat --loglevel INFO "$@" ;;
  migrate)
    exec python manage.py migrate --noinput "$@" ;;
  manage)
    exec python manage.py "$@" ;;
  health-web)
    exec python -c "import os, sys, urllib.request
try:
    urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=5)
except Exception as exc:
    sys.exit(str(exc))" ;;
  health-worker)
    # This container's worker answers a ping (it serves its queues, its broker connection works).
    exec celery -A config inspect ping --timeout 10 -d "$1@$(hostname)" ;;
  health-beat)
    exec python manage.py beat_health ;;
  *)
    echo "unknown role '$role': web, worker-custody, worker-app, beat, migrate, manage …" >&2
    exit 64 ;;
esac
