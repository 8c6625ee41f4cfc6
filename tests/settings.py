"""Settings for the test suite: the product's settings with fixed test secrets.

DATABASE_URL and REDIS_URL come from the environment as in production (CI points them at
PostgreSQL and Redis); without them the suite runs on SQLite and the filesystem broker.
"""

import os
import tempfile

os.environ.setdefault("DJANGO_DEBUG", "0")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-not-for-production-0123456789abcdef")
# A fixed Fernet key: tests read raw rows and must be able to tell ciphertext from clear text.
os.environ.setdefault("BITRIX24_TOKEN_KEYS", "q2hzsxbhUbMIlPOnDWHHbvR_TNAocF_4oY3VqE8FZv0=")
os.environ.setdefault("BITRIX24_CLIENT_ID", "app.test")
os.environ.setdefault("BITRIX24_CLIENT_SECRET", "test-secret")
# The system lane runs in several processes (pytest-xdist), each with its own test database. Each also gets
# its own var/ folder (renewal copies, the filesystem broker, caches, bin/run's supervisord socket) and its
# own Celery queue and Redis key prefix, so one process's workers never take another's tasks. Done once, in
# the test process (the xdist controller exports its var/ to the processes it starts): children inherit
# what it chose, and a child given another queue keeps it.
_xdist = os.environ.get("PYTEST_XDIST_WORKER", "")
if _xdist and not os.environ.get("BITRIX24_TEST_WORKER_SETUP"):
    os.environ["DJANGO_VAR_DIR"] = tempfile.mkdtemp(prefix=f"b24-test-var-{_xdist}-")
    os.environ["CELERY_QUEUE"] = f"{os.environ.get('CELERY_QUEUE', 'bitrix24')}-{_xdist}"
    os.environ["BITRIX24_TEST_WORKER_SETUP"] = "1"
os.environ.setdefault("DJANGO_VAR_DIR", tempfile.mkdtemp(prefix="b24-test-var-"))

from config.settings import *  # noqa: E402, F403

# Tests do not wait for production backoffs.
BITRIX24_OAUTH_BACKOFF = 0.01
BITRIX24_HTTP_TIMEOUT = (2.0, 5.0)
# Short unless a test's child process asks for the production figure (a 40 s OAuth answer).
BITRIX24_OAUTH_TIMEOUT = (2.0, float(os.environ.get("BITRIX24_OAUTH_READ_TIMEOUT", "5")))
BITRIX24_VERIFY_READ_TIMEOUT = float(os.environ.get("BITRIX24_VERIFY_READ_TIMEOUT", "5"))
# An app built on the project, as an author would add one (its handlers register only when a test asks).
INSTALLED_APPS = [*INSTALLED_APPS, "tests.eventapp"]  # noqa: F405
# The example app's templates and frontend endpoint are there in every test; its handlers and placement
# register only where a test asks (portals.registry.replaced(example.bitrix24.register)), so that the
# other tests bind and handle only their own.
if "example" not in INSTALLED_APPS:
    INSTALLED_APPS.append("example")
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not shared memory: the live server and worker threads each open their own connection.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(os.environ["DJANGO_VAR_DIR"], "test.sqlite3")}  # noqa: F405
