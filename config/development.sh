# The defaults bin/run runs the product with, sourced by bin/run and bin/manage: a command run beside
# bin/run (createsuperuser, the Bitrix24 stand-in) then sees the same database, secrets and Bitrix24
# settings. Whatever the environment already sets wins. Sourced from the repository's root.

export DJANGO_DEBUG=${DJANGO_DEBUG:-1}
export PORT=${PORT:-8000}
export DJANGO_VAR_DIR=${DJANGO_VAR_DIR:-$PWD/var}

# Without the app's own credentials there is nothing in Bitrix24 to talk to: trust the stand-in instead
# (`bin/manage bitrix24_standin`, a fake Bitrix24 on loopback), on fixed ports so that restarting either
# side needs no new settings. These ports are the stand-in's defaults too (config/settings.py).
# Only with debug on: a server with DJANGO_DEBUG=0 never trusts the stand-in (config/settings.py refuses its
# credentials then), it needs the app's own.
case "${DJANGO_DEBUG,,}" in 1 | true | yes | on) debugging=1 ;; *) debugging=0 ;; esac
if [ -z "${BITRIX24_CLIENT_ID:-}" ] && [ "$debugging" = 1 ]; then
  export BITRIX24_STANDIN_OAUTH_PORT=${BITRIX24_STANDIN_OAUTH_PORT:-8001}
  export BITRIX24_STANDIN_PORTAL_PORT=${BITRIX24_STANDIN_PORTAL_PORT:-8002}
  export BITRIX24_CLIENT_ID=app.standin
  export BITRIX24_CLIENT_SECRET=${BITRIX24_CLIENT_SECRET:-standin-secret}
  export BITRIX24_PORTAL_DOMAINS=${BITRIX24_PORTAL_DOMAINS:-127.0.0.1:$BITRIX24_STANDIN_PORTAL_PORT}
  # BITRIX24_STANDIN_HTTPS=1: the stand-in serves HTTPS with a local CA (made once under var/standin/tls), and
  # this backend trusts that CA and no plain HTTP, as in production.
  standin_https=${BITRIX24_STANDIN_HTTPS:-0}
  case "${standin_https,,}" in 1 | true | yes | on) standin_scheme=https ;; *) standin_scheme=http ;; esac
  if [ "$standin_scheme" = https ]; then
    export BITRIX24_CA_BUNDLE=${BITRIX24_CA_BUNDLE:-$DJANGO_VAR_DIR/standin/tls/ca.pem}
    # The backend checks the bundle at start: the stand-in's authority is made now if it was never run.
    if [ ! -f "$BITRIX24_CA_BUNDLE" ]; then
      .venv/bin/python -m standin.tls "$DJANGO_VAR_DIR/standin/tls" >/dev/null
    fi
  else
    export BITRIX24_ALLOW_HTTP=${BITRIX24_ALLOW_HTTP:-1}
  fi
  export BITRIX24_OAUTH_SERVERS=${BITRIX24_OAUTH_SERVERS:-$standin_scheme://127.0.0.1:$BITRIX24_STANDIN_OAUTH_PORT}
  # Event handlers and widgets are bound on the stand-in's portal at each install, as on a real one (the
  # stand-in reaches this backend on loopback). While the stand-in is stopped a binding waits: it is retried
  # with backoff, warned about once, and the install after the stand-in's restart binds again.
  export BITRIX24_PUBLIC_URL=${BITRIX24_PUBLIC_URL:-http://127.0.0.1:$PORT}
  # Bitrix24's JS library as the stand-in serves it, so the app's pages work offline against it.
  export BITRIX24_JS_URL=${BITRIX24_JS_URL:-$standin_scheme://127.0.0.1:$BITRIX24_STANDIN_PORTAL_PORT/api/v1/}
  # The example app (a deal tab, event handlers, a frontend endpoint) on the stand-in's portal only, while
  # no app of your own is named: yours (BITRIX24_APPS=myapp, docs: Build your app) registers the same
  # placement, and two views for one placement refuse to start. BITRIX24_EXAMPLE_APP=1 keeps both.
  if [ -z "${BITRIX24_APPS:-}" ]; then
    export BITRIX24_EXAMPLE_APP=${BITRIX24_EXAMPLE_APP:-1}
  fi
fi
