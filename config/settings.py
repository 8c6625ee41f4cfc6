"""Settings, read from the environment only (see docs/settings.md).

Defaults run on one machine with no servers: SQLite under var/, kombu's filesystem broker
under var/, and development secrets generated once into var/. With DJANGO_DEBUG off the
secrets must come from the environment: production never runs on a generated key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import dj_database_url
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from config import routing, timeouts, translations
from portals import logging as product_logging

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DJANGO_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number") from exc


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from exc


DEBUG = env_bool("DJANGO_DEBUG", False)


def dev_secret(env_name: str, filename: str, make: Callable[[], str]) -> str:
    """The secret from the environment; in development only, one generated once into var/."""
    value = env_str(env_name)
    if value:
        return value
    if not DEBUG:
        raise ImproperlyConfigured(
            f"{env_name} is required when DJANGO_DEBUG is off. Development secrets are generated "
            f"into var/ only with DJANGO_DEBUG=1."
        )
    path = VAR_DIR / filename
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = dev_secret("DJANGO_SECRET_KEY", "secret_key", get_random_secret_key)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# The worked example of an app (example/: a deal tab, event handlers, a frontend endpoint): for
# development, tests and the stand-in. Off by default: it is never bound on customer portals unless asked.
BITRIX24_EXAMPLE_APP = env_bool("BITRIX24_EXAMPLE_APP", False)
BITRIX24_APPS = [app for app in env_list("BITRIX24_APPS") if app != "example"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_celery_beat",
    "axes",
    "portals",
    "events",
    "install",
    "api",
    # The app built on this project: its Django app(s), registering event handlers and placement views
    # in their `bitrix24.py` (see portals.registry) and frontend endpoints in their `frontend.py`.
    *BITRIX24_APPS,
]
if BITRIX24_EXAMPLE_APP:
    INSTALLED_APPS.append("example")

# The proxies whose X-Forwarded-For is believed (portals.sources): the right-most address that is not one of
# them is a request's source. gunicorn reads the same variable. "*" believes anyone: development only.
FORWARDED_ALLOW_IPS = env_list("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
if "*" in FORWARDED_ALLOW_IPS and not DEBUG:
    raise ImproperlyConfigured(
        "FORWARDED_ALLOW_IPS=* believes any client's X-Forwarded-For: with DJANGO_DEBUG off, list your proxies"
    )
for _proxy in FORWARDED_ALLOW_IPS:
    try:
        if _proxy != "*":
            ipaddress.ip_network(_proxy, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(
            f"FORWARDED_ALLOW_IPS: {_proxy!r} is not an address or a network"
        ) from _exc

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from STATIC_ROOT, before anything else touches the request (WhiteNoise's docs ask for it
    # right after the security middleware).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Where the request comes from, for the budgets of unverified requests (portals.sources).
    "portals.middleware.RequestSource",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Pages shown inside a portal opt out with xframe_options_exempt and send a
    # Content-Security-Policy frame-ancestors naming that portal instead.
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Token renewals needed by a request are carried out by a Celery worker (portals/middleware.py).
    "portals.middleware.RenewalsInWorkers",
    # A domain error (a configuration error, Bitrix24 refusing a call, no usable tokens …) gets its answer from
    # the one table, portals.answers, instead of a 500.
    "portals.middleware.DomainErrorAnswers",
    # django-axes: refuses logins while a username + address is locked out (last, as its docs ask).
    "axes.middleware.AxesMiddleware",
]

# Admin login throttling (django-axes): after AXES_FAILURE_LIMIT wrong passwords for one username from one
# address, that pair is locked out for AXES_COOLOFF_TIME, counted in the database so that every web process
# agrees. Per username *and* address: an attacker elsewhere cannot lock a member of staff out.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env_int("DJANGO_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("DJANGO_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# The client address as the budgets see it (behind the proxies in FORWARDED_ALLOW_IPS).
AXES_CLIENT_IP_CALLABLE = "portals.sources.axes_client_ip"
AXES_RESET_ON_SUCCESS = True

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # Project-wide overrides of Django's own templates (every admin list, third-party ones included, says
        # when it is empty); searched before the apps' templates.
        "DIRS": [BASE_DIR / "config" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "install.context.bitrix24",
            ],
        },
    },
]

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite has no row locks: IMMEDIATE transactions take the database's write lock at BEGIN,
    # which serialises token rotation across the web, worker and beat processes of one machine.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30}
else:
    # A database host that accepts connections and never answers must not hang a request (or a
    # renewal's store) for ever: give up connecting after DATABASE_CONNECT_TIMEOUT seconds, and drop a
    # connection whose sent data stays unacknowledged for as long (libpq's tcp_user_timeout).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "connect_timeout": env_int("DATABASE_CONNECT_TIMEOUT", 5),
            "tcp_user_timeout": env_int("DATABASE_CONNECT_TIMEOUT", 5) * 1000,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
    )
    # Behind PgBouncer in transaction mode a server-side cursor may outlive its transaction's server
    # connection: Django reads in one go instead (docs/scaling.md).
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = env_bool(
        "DATABASE_DISABLE_SERVER_SIDE_CURSORS", False
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
# The app's pages follow the portal user's LANG in these; placement titles are bound in each (LANG_ALL).
LANGUAGES = [("en", "English"), ("ru", "Русский"), ("de", "Deutsch")]
# Catalogs (<app>/locale/*/LC_MESSAGES/django.po) are compiled into var/ when they change: nothing
# generated lives beside the sources, and no gettext tools are needed (config/translations.py).
LOCALE_PATHS = translations.compile_catalogs(BASE_DIR, VAR_DIR)
USE_TZ = True

STATIC_URL = "static/"
# Where `collectstatic` gathers the static files (the image does it when it is built) and from where the
# application serves them itself (WhiteNoise: compressed, with hashed names cached for a year); no proxy
# has to. Under var/ by default: nothing generated lives beside the sources.
STATIC_ROOT = Path(env_str("DJANGO_STATIC_ROOT", str(VAR_DIR / "static")))
# Empty until collectstatic (WhiteNoise warns without it); read-only in the image, where it is there already.
with contextlib.suppress(OSError):
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # WhiteNoise's compressed, hashed storage; before `collectstatic` a file is linked under its own name.
    "staticfiles": {"BACKEND": "config.staticfiles.StaticFilesStorage"},
}

# Bitrix24 posts forms of modest size; anything larger is refused with a 400 before parsing.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DJANGO_MAX_BODY_BYTES", 256 * 1024)
DATA_UPLOAD_MAX_NUMBER_FIELDS = 1000

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Bitrix24 -------------------------------------------------------------------------------
BITRIX24_CLIENT_ID = env_str("BITRIX24_CLIENT_ID")
BITRIX24_CLIENT_SECRET = env_str("BITRIX24_CLIENT_SECRET")
# The stand-in's credentials (config/development.sh) are for development: a server with debug off that
# trusted them would trust a fake Bitrix24 that anyone on the machine can start.
STANDIN_CLIENT_ID = "app.standin"
if BITRIX24_CLIENT_ID == STANDIN_CLIENT_ID and not DEBUG:
    raise ImproperlyConfigured(
        f"BITRIX24_CLIENT_ID={STANDIN_CLIENT_ID} is the Bitrix24 stand-in's: with DJANGO_DEBUG off, set your "
        "app's own BITRIX24_CLIENT_ID and BITRIX24_CLIENT_SECRET (Bitrix24: Developer resources, your app)"
    )
BITRIX24_OAUTH_SERVERS = [
    url.rstrip("/")
    for url in env_list("BITRIX24_OAUTH_SERVERS", "https://oauth.bitrix.info,https://oauth.bitrix24.tech")
]
BITRIX24_PORTAL_DOMAINS = env_list(
    "BITRIX24_PORTAL_DOMAINS",
    "*.bitrix24.com,*.bitrix24.ru,*.bitrix24.de,*.bitrix24.eu,*.bitrix24.es,*.bitrix24.fr,*.bitrix24.it,"
    "*.bitrix24.pl,*.bitrix24.uk,*.bitrix24.in,*.bitrix24.cn,*.bitrix24.jp,*.bitrix24.kz,*.bitrix24.by,"
    "*.bitrix24.ua,*.bitrix24.com.br,*.bitrix24.com.tr,*.bitrix24.id,*.bitrix24.vn,*.bitrix24.site,"
    "*.bitrix24.shop,*.bitrix24.tech",
)
BITRIX24_ALLOW_HTTP = env_bool("BITRIX24_ALLOW_HTTP", False)
# The certificate authorities trusted for Bitrix24 hosts, a PEM file, instead of the system's bundle (the
# stand-in's local CA in development with HTTPS; a company's proxy CA on some on-premise portals). Proxy and
# CA variables of the environment are never read for this traffic, so this is the one way to change it.
BITRIX24_CA_BUNDLE = env_str("BITRIX24_CA_BUNDLE")
if BITRIX24_CA_BUNDLE and not Path(BITRIX24_CA_BUNDLE).is_file():
    raise ImproperlyConfigured(
        f"BITRIX24_CA_BUNDLE={BITRIX24_CA_BUNDLE!r} is not a file (a PEM bundle of CAs)"
    )
BITRIX24_PUBLIC_URL = env_str("BITRIX24_PUBLIC_URL").rstrip("/")
BITRIX24_TOKEN_KEYS = env_list("BITRIX24_TOKEN_KEYS") or [
    dev_secret("BITRIX24_TOKEN_KEYS", "token_keys", lambda: Fernet.generate_key().decode())
]
BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = env_int("BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS", 28)
BITRIX24_RENEW_MARGIN_DAYS = env_int("BITRIX24_RENEW_MARGIN_DAYS", 7)
# Outbound HTTP: seconds to connect / to read, and the OAuth client's retry policy.
BITRIX24_HTTP_TIMEOUT = (
    env_float("BITRIX24_CONNECT_TIMEOUT", timeouts.CONNECT_TIMEOUT_DEFAULT),
    env_float("BITRIX24_READ_TIMEOUT", 20.0),
)
# The token endpoint gets a long read timeout: a refresh whose answer is lost has usually been
# carried out by the server, and the single-use refresh token is gone with it. Process managers wait
# for one such attempt before they kill (config.timeouts.stop_grace_seconds).
BITRIX24_OAUTH_TIMEOUT = (
    env_float("BITRIX24_CONNECT_TIMEOUT", timeouts.CONNECT_TIMEOUT_DEFAULT),
    env_float("BITRIX24_OAUTH_READ_TIMEOUT", timeouts.OAUTH_READ_TIMEOUT_DEFAULT),
)
BITRIX24_OAUTH_ATTEMPTS = env_int("BITRIX24_OAUTH_ATTEMPTS", 4)
# app.info about a token we were handed (inbound requests, the app page's API calls) is asked once, with
# this read timeout: its sender waits, and anyone can send one.
BITRIX24_VERIFY_READ_TIMEOUT = env_float("BITRIX24_VERIFY_READ_TIMEOUT", 10.0)
# Verifications that Bitrix24 refused, per source (portals.sources) and minute, before more requests from
# that source are answered 429 without asking: a forger cannot make the backend hammer the OAuth server,
# and junk naming a portal never makes another source's genuine requests fail.
BITRIX24_UNVERIFIED_BUDGET = env_int("BITRIX24_UNVERIFIED_BUDGET", 20)
# ...and from all sources together, per minute; half of it is kept for sources that were verified
# successfully in the last day (Bitrix24's own servers, returning users), whatever strangers send.
BITRIX24_UNVERIFIED_TOTAL = env_int("BITRIX24_UNVERIFIED_TOTAL", 600)
BITRIX24_OAUTH_BACKOFF = env_float("BITRIX24_OAUTH_BACKOFF", 0.5)
# Proactive sweep: it hands out at most this many due pairs a run (every 15 minutes by default), the
# most urgent first, so that thousands of portals due at once reach the OAuth server over several runs;
# one worker task renews BITRIX24_RENEW_BATCH of them, one after the other.
BITRIX24_RENEW_PER_SWEEP = env_int("BITRIX24_RENEW_PER_SWEEP", 5000)
BITRIX24_RENEW_BATCH = env_int("BITRIX24_RENEW_BATCH", 25)
# A handed-out batch holds its pairs this long while queued (portals.batches); past it, unstarted, the beat
# tick gives them back to the sweep and hands them out again.
BITRIX24_RENEW_BATCH_LEASE_SECONDS = env_int("BITRIX24_RENEW_BATCH_LEASE_SECONDS", 600)
# A pair whose access token has less than this left is renewed before it is handed out.
BITRIX24_ACCESS_TOKEN_MIN_SECONDS = env_int("BITRIX24_ACCESS_TOKEN_MIN_SECONDS", 60)
# The longest a web request waits for a Celery worker to renew a token it needs before answering 503
# (web requests never call the token endpoint themselves); gunicorn's worker timeout is derived from
# it (config/gunicorn.py).
BITRIX24_WEB_TOKEN_WAIT_SECONDS = env_int("BITRIX24_WEB_TOKEN_WAIT_SECONDS", timeouts.WEB_TOKEN_WAIT_DEFAULT)
# How long a renewal whose answer arrived keeps trying to store it while the database is unreachable
# (the new pair waits in the second copy meanwhile; see portals.journal).
# Each renewal's answer is kept (encrypted, Redis and local files) this long after it is stored, the pair's
# latest only: `recover_after_restore` puts it back after a database restore older than it. 0 keeps none.
BITRIX24_RENEWAL_COPY_DAYS = env_float("BITRIX24_RENEWAL_COPY_DAYS", 7.0)
BITRIX24_STORE_RETRY_SECONDS = env_int("BITRIX24_STORE_RETRY_SECONDS", 300)
# A wanted action (event bindings, a staff renewal) is queued when recorded; the beat sweep queues it
# again when it is still open this long after (its message was lost, or never sent).
BITRIX24_WANTED_GRACE_SECONDS = env_int("BITRIX24_WANTED_GRACE_SECONDS", 60)

# REST calls to portals: Bitrix24's leaky bucket per portal (2/s, burst 50; Enterprise 5/s, 250,
# set per portal in the admin), and how long a call may wait for the operating-time limit to reset.
BITRIX24_RATE_LIMIT = env_float("BITRIX24_RATE_LIMIT", 2.0)
BITRIX24_RATE_BURST = env_int("BITRIX24_RATE_BURST", 50)
BITRIX24_QUERY_LIMIT_RETRIES = env_int("BITRIX24_QUERY_LIMIT_RETRIES", 5)
BITRIX24_OPERATING_WAIT_MAX = env_int("BITRIX24_OPERATING_WAIT_MAX", 600)
# The inbound log keeps its rows this many days (0: for ever); a beat task deletes older ones.
INBOUND_LOG_RETENTION_DAYS = env_int("INBOUND_LOG_RETENTION_DAYS", 30)
# Events bound with event.bind after install and update (ONAPPUNINSTALL always), besides those the app's
# handlers register (portals.registry); these are only logged.
BITRIX24_EVENTS = [name.upper() for name in env_list("BITRIX24_EVENTS")]
# Bitrix24's JS library for the app's pages (BX24.init, getAuth, callMethod, installFinish): Bitrix24's
# own in production; the stand-in serves a small one of its own, so pages work offline against it.
BITRIX24_JS_URL = env_str("BITRIX24_JS_URL", "//api.bitrix24.com/api/v1/")
# Offline bindings carry this key, and the app's own writes from event handlers pass it, so that the
# portal does not queue the app's own changes (a cycle). Empty: bound without one (portals whose plan has
# no connectors).
BITRIX24_AUTH_CONNECTOR = env_str("BITRIX24_AUTH_CONNECTOR")
# The app's events (events app): how many one portal may deliver per minute and keep waiting at once
# (more are refused with 429 and not stored), how often a failing handler is retried (doubling from the
# base delay), how long a handler may run, and how long handled and failed events are kept.
BITRIX24_EVENTS_PER_MINUTE = env_int("BITRIX24_EVENTS_PER_MINUTE", 300)
BITRIX24_EVENT_BACKLOG = env_int("BITRIX24_EVENT_BACKLOG", 5000)
BITRIX24_EVENT_RETRIES = env_int("BITRIX24_EVENT_RETRIES", 5)
BITRIX24_EVENT_RETRY_SECONDS = env_int("BITRIX24_EVENT_RETRY_SECONDS", 30)
BITRIX24_EVENT_HANDLER_SECONDS = env_int("BITRIX24_EVENT_HANDLER_SECONDS", 120)
# At most this many handlers of one portal run at once; workers take due events round robin across portals.
BITRIX24_HANDLERS_PER_PORTAL = env_int("BITRIX24_HANDLERS_PER_PORTAL", 2)
# The longest a handler's REST call waits for its portal's rate limit; past it the event is put back with
# the slot's time and the worker takes other work (portals.governor.waiting_at_most). Half a second: with
# 2 s, workers asleep for three flooding portals' buckets delayed another portal's first event 20 times
# over (bench/noisy_neighbour.py, docs/benchmarks.md).
BITRIX24_HANDLER_RATE_WAIT_SECONDS = env_float("BITRIX24_HANDLER_RATE_WAIT_SECONDS", 0.5)
BITRIX24_EVENT_RETENTION_DAYS = env_int("BITRIX24_EVENT_RETENTION_DAYS", 7)
# A confirmed uninstall with CLEAN=1 deletes the tokens at once and the portal's data this many days later,
# so that a reinstall (or a customer who uninstalled by mistake) meanwhile finds it all.
BITRIX24_PURGE_DELAY_DAYS = env_int("BITRIX24_PURGE_DELAY_DAYS", 7)
# While the database is away, /events/ deliveries wait in the spool (portals.spool): Redis, else files under
# DJANGO_VAR_DIR/spool/. Bounds: in bytes, per delivery, and per source address and per portal; deliveries
# nothing has proved yet (install and update events, verified when the database returns) have tighter ones.
BITRIX24_SPOOL_MAX_BYTES = env_int("BITRIX24_SPOOL_MAX_BYTES", 64 * 1024 * 1024)
BITRIX24_SPOOL_MAX_ENTRY_BYTES = env_int("BITRIX24_SPOOL_MAX_ENTRY_BYTES", 64 * 1024)
BITRIX24_SPOOL_PER_SOURCE = env_int("BITRIX24_SPOOL_PER_SOURCE", 20000)
BITRIX24_SPOOL_PER_PORTAL = env_int("BITRIX24_SPOOL_PER_PORTAL", 2000)
BITRIX24_SPOOL_UNVERIFIED_PER_SOURCE = env_int("BITRIX24_SPOOL_UNVERIFIED_PER_SOURCE", 50)
BITRIX24_SPOOL_UNVERIFIED_PER_PORTAL = env_int("BITRIX24_SPOOL_UNVERIFIED_PER_PORTAL", 5)
BITRIX24_FAILED_EVENT_RETENTION_DAYS = env_int("BITRIX24_FAILED_EVENT_RETENTION_DAYS", 30)
# Portals with offline handlers are asked for their queue this often even without an ONOFFLINEEVENT
# notification (a notification lost while the backend was down).
BITRIX24_OFFLINE_PULL_SECONDS = env_int("BITRIX24_OFFLINE_PULL_SECONDS", 300)
# The Bitrix24 stand-in for trying the app by hand (`bin/manage bitrix24_standin`) listens on fixed ports:
# bin/run's backend trusts them while no BITRIX24_CLIENT_ID is set (config/development.sh, same figures),
# so either side can be restarted without new settings.
BITRIX24_STANDIN_OAUTH_PORT = env_int("BITRIX24_STANDIN_OAUTH_PORT", 8001)
BITRIX24_STANDIN_PORTAL_PORT = env_int("BITRIX24_STANDIN_PORTAL_PORT", 8002)
# The stand-in serves HTTPS with a local CA kept under DJANGO_VAR_DIR/standin/tls (bin/run then trusts that CA
# through BITRIX24_CA_BUNDLE, config/development.sh).
BITRIX24_STANDIN_HTTPS = env_bool("BITRIX24_STANDIN_HTTPS", False)

# --- Celery ---------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
CELERY_FS_BROKER_DIR = VAR_DIR / "celery-broker"
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "visibility_timeout": 3600,
        # A Redis that is down or hung must fail a publish in seconds: the work is recorded in the
        # database first and the sweep queues it again (portals.tasks.publish).
        "socket_timeout": 2,
        "socket_connect_timeout": 2,
        # A worker takes from the first of its queues that has a task (custody.now before custody): a
        # renewal a web request waits for never waits behind a sweep's batches.
        "queue_order_strategy": "config.routing:KindOrder",
    }
else:
    # The filesystem transport works across the web, worker and beat processes of one machine
    # (memory:// would not): the product runs with no broker server at all.
    for sub in ("out", "processed", "control"):
        (CELERY_FS_BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_FS_BROKER_DIR / "out"),
        "data_folder_out": str(CELERY_FS_BROKER_DIR / "out"),
        "processed_folder": str(CELERY_FS_BROKER_DIR / "processed"),
        # kombu's default is "control" relative to the working directory: it would litter the checkout.
        "control_folder": str(CELERY_FS_BROKER_DIR / "control"),
        "store_processed": False,
    }
# One queue name per deployment, so two deployments (or two CI runs) sharing a Redis never
# take each other's tasks.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "bitrix24")
# Custody apart from the app's work: `${CELERY_QUEUE}.custody.now`, `.custody` and `.app`, each task's
# queue named in config/routing.py. A worker serves the queues its -Q names in that order, first one first.
CELERY_TASK_ROUTES = ("config.routing.route_task",)
CELERY_TASK_QUEUES = routing.queues(CELERY_TASK_DEFAULT_QUEUE)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
# One quick retry when publishing: callers record their work before publishing, so a broker that is
# away is waited for by the beat sweep, not by the request.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 300)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 240)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# django-celery-beat's schedule (in the database), sending only while this beat holds the lease: a second
# beat started by mistake sends nothing (portals.beat).
CELERY_BEAT_SCHEDULER = "portals.beat:LeaderScheduler"
# How long the beat holding the lease keeps it without renewing (it renews at every tick, every few seconds):
# a second beat takes over within it and a tick once the holder is gone.
BITRIX24_BEAT_LEASE_SECONDS = env_float("BITRIX24_BEAT_LEASE_SECONDS", 30.0)
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)

# --- Cache ---------------------------------------------------------------------------------
# Shared by every process (verified frontend tokens, the REST client's operating-time figures):
# Redis when REDIS_URL is set, else files under var/ (shared by the processes of one machine).
# Never the in-process default, which each worker would keep to itself.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # Two deployments sharing one Redis have different queue names: their keys differ too.
            "KEY_PREFIX": CELERY_TASK_DEFAULT_QUEUE,
            # The cache only saves work: a Redis that is away must cost a second, not a hang.
            "OPTIONS": {"socket_timeout": 1, "socket_connect_timeout": 1},
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

# --- REST framework -------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Staff: a token from `manage.py drf_create_token <username>` or a session (the admin's login,
    # for the browsable API). Token first: its WWW-Authenticate header makes "not logged in" a 401.
    # The app's own frontend endpoints authenticate otherwise (api.authentication).
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    # DRF's JSON parser, with `[` x 100,000 answered 400 instead of a RecursionError's 500.
    "DEFAULT_PARSER_CLASSES": [
        "api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "api.exceptions.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Bitrix24 app backend API",
    "VERSION": "1.0.0",
    "DESCRIPTION": (
        "Staff endpoints (session or `Authorization: Token …`, staff users only): portals and their "
        "token health, renewals, support calls, health. Frontend endpoints under /api/app/ (the app "
        "page in the portal's iframe): `X-Bitrix24-Auth` (the AUTH_ID) and `X-Bitrix24-Member-Id`, "
        "verified with Bitrix24's app.info. Every error is `{error, error_description}`, with "
        "`fields` for invalid input."
    ),
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema maps the staff API: staff only, like the API itself.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAdminUser"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/",
    "ENUM_NAME_OVERRIDES": {
        "PortalStateEnum": "portals.models.PortalState",
        "PairStateEnum": "portals.models.PairState",
        "AppStatusEnum": "portals.models.AppStatus",
        "RenewalTriggerEnum": "portals.models.RenewalTrigger",
        "RenewalOutcomeEnum": "portals.models.RenewalOutcome",
    },
}

# --- Logging --------------------------------------------------------------------------------
# DJANGO_LOG_FORMAT=json: one JSON object a line (time, level, logger, pid, message, exc_info), for a log
# collector; redacted as a whole, extra fields included (portals.logging.JsonFormatter).
LOG_FORMAT = env_str("DJANGO_LOG_FORMAT", "plain").lower()
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"DJANGO_LOG_FORMAT={LOG_FORMAT!r} is not plain or json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "portals.logging.RedactTokensFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {
            "()": "portals.logging.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(process)d %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
            "timestamp": "time",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["redact"]},
    },
    "root": {"handlers": ["console"], "level": env_str("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        # urllib3 logs full URLs at DEBUG; refresh calls carry tokens in the query string.
        "urllib3": {"level": "WARNING"},
        # django-axes announces itself at INFO in every process and command; its lockouts are WARNING.
        "axes": {"level": "WARNING"},
        # The development server's access log: request lines with query strings (a launch's AUTH_ID and
        # REFRESH_ID when a page is opened by GET). Django gives it a handler of its own, without our
        # filter: the redacting one instead.
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}

# --- Metrics and the error tracker ------------------------------------------------------------
# Every process of this machine (web, worker, beat) counts into its own file in this folder, and /metrics
# adds them up (portals.metrics). prometheus_client reads the variable once, when first imported: every
# entry point (manage.py, wsgi, celery) loads these settings before that. Set empty, each process keeps
# its counts to itself (right for one process only). bin/run empties the folder at each start.
METRICS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "metrics")).strip()
if METRICS_DIR:
    METRICS_DIR = str(Path(METRICS_DIR).resolve())
    Path(METRICS_DIR).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR
else:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
# /metrics answers only a scraper presenting this as a bearer token; unset, /metrics is a 404.
BITRIX24_METRICS_TOKEN = env_str("BITRIX24_METRICS_TOKEN")
# Errors to Sentry (or a compatible tracker) when set: Django and Celery, no personal data, no request
# bodies or local variables, every string redacted (portals.logging.start_error_tracker).
SENTRY_DSN = env_str("SENTRY_DSN")
if SENTRY_DSN:
    product_logging.start_error_tracker(SENTRY_DSN)
