"""Django settings of the shop: everything from the environment and SHOP_CONFIG (see shop.config).

DEBUG is always off (an error page would show settings), hosts are the loopback names the agent's
health checks and load balancer use, and the database is SQLite in SHOP_DATA, which the agent keeps
across deploys and rollbacks. A missing SECRET_KEY or SHOP_DATA stops the process with a message that
names the variable.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from shop import config as _config

try:
    SHOP = _config.load()
except _config.ConfigError as e:
    raise ImproperlyConfigured(str(e)) from None

SECRET_KEY = SHOP.secret_key
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["shop"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "shop.middleware.version_header",
]
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": []},
}]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(SHOP.database),
        # two gunicorn workers and the shop workers write to one file: wait for the lock, and take
        # it at the start of a write transaction instead of failing on an upgrade midway
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False

# Errors go to stderr (the agent keeps it in <root>/logs/); Django's default sends them nowhere with
# DEBUG off. Log records carry the path and the traceback, never request headers or settings.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django": {"handlers": ["stderr"], "level": "WARNING"},
        "shop": {"handlers": ["stderr"], "level": "INFO"},
    },
}
