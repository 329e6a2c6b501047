"""Django settings. Infrastructure comes from the environment (README lists every
variable); pipeline behaviour comes from ``pipeline.toml`` (``pipeline.config``)."""

from __future__ import annotations

from pathlib import Path

from orchestrator_site.env import env_bool, env_int, env_list, env_str, parse_database_url
from orchestrator_site.errors import ConfigInvalid
from orchestrator_site.logging import configure_logging

BASE_DIR = Path(__file__).resolve().parent.parent

ORCHESTRATOR_ENV = env_str("ORCHESTRATOR_ENV", "development")
if ORCHESTRATOR_ENV not in {"development", "production"}:
    raise ConfigInvalid("ORCHESTRATOR_ENV must be 'development' or 'production'", data={"variable": "ORCHESTRATOR_ENV"})
PRODUCTION = ORCHESTRATOR_ENV == "production"

DEBUG = env_bool("DJANGO_DEBUG", default=not PRODUCTION)
_DEV_SECRET = "dev-only-insecure-secret-key-change-me-0123456789-abcdefghijklmnopqrstuvwxyz"
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "" if PRODUCTION else _DEV_SECRET)
if not SECRET_KEY:
    # A production process must never start on a guessable key.
    raise ConfigInvalid("DJANGO_SECRET_KEY must be set when ORCHESTRATOR_ENV=production", data={"variable": "DJANGO_SECRET_KEY"})
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "orchestrator_site.apps.OrchestratorSiteConfig",
    "pipeline",
    "batches",
]

# The admin's middleware, run for ADMIN_PATHS only (orchestrator_site.middleware):
# everything else the gateway serves (the APIs, /metrics, /health, the playground)
# authenticates by API key and keeps no session, and under ASGI each of these would
# cost thread hops on every request (BENCHMARKS.md).
ADMIN_MIDDLEWARE = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
)
ADMIN_PATHS = ("/admin/", "/api/v1/config")  # the config API is read with a staff session, as the admin
# Django looks for the admin's middleware in MIDDLEWARE; orchestrator_site.E001 checks
# ADMIN_MIDDLEWARE for it instead (orchestrator_site.middleware.check_admin_middleware).
SILENCED_SYSTEM_CHECKS = ["admin.E408", "admin.E409", "admin.E410", "security.W002", "security.W003"]
MIDDLEWARE = [
    "orchestrator_site.middleware.http_metrics",
    "orchestrator_site.middleware.access_log",
    "django.middleware.security.SecurityMiddleware",
    "orchestrator_site.middleware.AdminOnlyMiddleware",
]

ROOT_URLCONF = "orchestrator_site.urls"
WSGI_APPLICATION = "orchestrator_site.wsgi.application"
ASGI_APPLICATION = "orchestrator_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_db = parse_database_url(env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator"))
DATABASES = {
    "default": {
        "ENGINE": "orchestrator_site.db.postgresql",  # Django's, with the django_db_* metrics
        "NAME": _db.name,
        "USER": _db.user,
        "PASSWORD": _db.password,
        "HOST": _db.host,
        "PORT": _db.port,
        # A connection pool (psycopg_pool), not persistent connections: under ASGI each
        # request runs its sync code in a thread of its own, so per-thread persistent
        # connections would pile up, one per request, until the server ran out.
        "CONN_MAX_AGE": 0,
        # The test database's name; two checkouts on one machine must not share it.
        "TEST": {"NAME": env_str("DATABASE_TEST_NAME", "") or None},
        "OPTIONS": {
            "connect_timeout": 5,
            "pool": {
                "min_size": env_int("DATABASE_POOL_MIN", 1),
                "max_size": env_int("DATABASE_POOL_MAX", 20),
                # Seconds to wait for a connection before failing (503 service_unavailable).
                "timeout": env_int("DATABASE_POOL_TIMEOUT_S", 10),
            },
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Daphne serves static files itself in development (ASGIStaticFilesHandler);
# production puts a CDN or reverse proxy in front of STATIC_ROOT.
SERVE_STATIC = env_bool("SERVE_STATIC", default=not PRODUCTION)

# Shared fast state: token streams, request status. Everything under one prefix
# so that several deployments (or the test suite) can share one Redis.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_KEY_PREFIX = env_str("REDIS_KEY_PREFIX", "orch")
# How long a gateway trusts an API key Postgres accepted (pipeline.auth.KeyCache); a
# revocation made elsewhere reaches it within this time. 0: ask Postgres every request.
API_KEY_CACHE_S = env_int("API_KEY_CACHE_S", 5)
# How many tenants get a series of their own in orchestrator_tenant_tokens_total (the
# ones with the most tokens); the rest are counted as tenant="other".
METRICS_TENANT_LABELS = env_int("METRICS_TENANT_LABELS", 20)
REDIS_SOCKET_TIMEOUT_S = float(env_int("REDIS_SOCKET_TIMEOUT_MS", 2000)) / 1000.0
# Connections per Redis client (one sync client per process, one async per event loop);
# past it a caller waits for one, up to the socket timeout.
REDIS_MAX_CONNECTIONS = env_int("REDIS_MAX_CONNECTIONS", 1000)

# --- Observability: /metrics on the gateway; a Celery worker serves its own on this
# port when set (0: none). Tracing is configured by the OTEL_* variables
# (orchestrator_site.telemetry); PROMETHEUS_MULTIPROC_DIR by prometheus_client.
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0)
WORKER_METRICS_ADDR = env_str("WORKER_METRICS_ADDR", "127.0.0.1")

PIPELINE_CONFIG_PATH = env_str("PIPELINE_CONFIG", str(BASE_DIR / "pipeline.toml"))
# The config versions this process follows (pipeline.config.versions): deployments that
# share one database keep theirs apart.
PIPELINE_CONFIG_SCOPE = env_str("PIPELINE_CONFIG_SCOPE", "default")
# How often a process checks the active config version even without a signal: a
# process that missed one catches up within this.
PIPELINE_CONFIG_CHECK_S = float(env_str("PIPELINE_CONFIG_CHECK_S", "5"))
# Whether the gateway, workers and scheduler follow the stored versions (off: each
# process reads the file once, as a test process does).
PIPELINE_CONFIG_FOLLOW = env_bool("PIPELINE_CONFIG_FOLLOW", default=True)

# --- Celery (read by orchestrator_site.celery through the CELERY_ namespace) ---
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
CELERY_RESULT_BACKEND = None  # results travel on the token bus, never through Celery
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
    # acks_late tasks are redelivered if unacknowledged this long: longer than
    # the longest hard time limit, so a slow batch item is not run twice.
    "visibility_timeout": 3600,
    "socket_timeout": 5,
    "socket_connect_timeout": 5,
    # A publisher (the gateway) whose broker is down fails fast with a 503 instead
    # of retrying for seconds while the client waits. Workers reconnect on their own.
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
    # A batch worker empties batch.high before it takes from batch.default, and that
    # before batch.low, in the order of its -Q (kombu's Redis transport; round-robin
    # by default). The chunks already running give way themselves (batches.urgency).
    "queue_order_strategy": "priority",
}
if env_str("CELERY_BROKER_KEY_PREFIX", ""):
    # Several deployments (or test runs) on one Redis broker, each with its own queues.
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = env_str("CELERY_BROKER_KEY_PREFIX", "")
# A worker reserves one message per slot of its pool, no more: a batch chunk runs for
# seconds, and chunks reserved by a busy worker would wait there while another is idle,
# and would sit in front of a high-priority job that arrives meanwhile.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = True  # Flower
# No "task-sent" event: it is a second broker publish per task, in the gateway. Flower
# learns of a task when a worker receives it; the queues' depth is a metric
# (orchestrator_queue_depth).
CELERY_TASK_SEND_SENT_EVENT = False
# Real-time tasks send Celery's task events (received, started, succeeded) like every
# task, so Flower and `celery events` see them; 0 saves the worker those publishes.
REALTIME_TASK_EVENTS = env_bool("REALTIME_TASK_EVENTS", default=True)
# How often the scheduler reads the queues and computes the scaling signals
# (pipeline.scaling); 0: never.
SCALING_INTERVAL_S = float(env_int("SCALING_INTERVAL_S", 10))
# The scheduler (celery beat): the batch recovery sweep (batches.services.batch_recover).
CELERY_BEAT_SCHEDULE = {
    "batch-recovery": {
        "task": "batches.tasks.recover_batches",
        "schedule": env_int("BATCH_RECOVERY_INTERVAL_S", 60),
        "options": {"queue": "batch.high", "routing_key": "batch.high", "expires": 60.0},
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["pipeline.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["pipeline.auth.IsTenant"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "pipeline.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "prompt-orchestrator API",
    "DESCRIPTION": "Real-time and batch LLM prompt orchestration for many tenants.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Offline docs: Swagger UI from the sidecar package, never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOG_FORMAT = env_str("LOG_FORMAT", "json" if PRODUCTION else "console")
LOGGING_CONFIG = None
configure_logging(level=LOG_LEVEL, fmt=LOG_FORMAT)
