"""Read settings from the environment, failing loudly with the variable's name.

django-environ parses the values; these helpers make every failure an ImproperlyConfigured that names the
variable and says what was expected, so a bad deployment stops at start-up instead of misbehaving later.
"""

import json
import os
import re
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

_env = environ.Env()
_MISSING = object()


# Variables whose value is a secret as a whole (or carries one, as storage options do): an error names them and
# says how long the value is, never what it is.
SECRET_NAMES = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|API_KEY|CREDENTIALS?)(_|$)|STORAGE_OPTIONS")


def shown(name: str, value: str) -> str:
    """`value` as an error message may show it: a secret variable's value hidden, a URL's password masked."""
    if SECRET_NAMES.search(name):
        return f"<{len(value)} characters, not shown>"
    return repr(mask_url_password(value))


def mask_url_password(text: str) -> str:
    """scheme://user:password@host... with everything between the user's colon and the last "@" (the password,
    whatever it holds, "/" included) replaced by ***; other text as it is."""
    return re.sub(r"(://[^:/@\s]*:)\S*@", r"\1***@", text)


def mask_password_parts(message: str, url: str) -> str:
    """`message` (a parser's error about `url`) with every piece of the URL's password replaced by ***: a parser
    that split the password at a "/" may quote a piece of it as a port or a path."""
    match = re.search(r"://[^:/@\s]*:(\S*)@", url)
    for piece in sorted(re.split(r"[/:@?#]", match.group(1)) if match else [], key=len, reverse=True):
        if piece:
            message = message.replace(piece, "***")
    return mask_url_password(message)


def read_env_file(path: Path) -> None:
    """Load KEY=value lines from a .env file; variables already set in the environment win."""
    if path.is_file():
        environ.Env.read_env(str(path), overwrite=False)


def _raw(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        if default is _MISSING:
            raise ImproperlyConfigured(f"Set the {name} environment variable (see .env.example).")
        return None
    return value


def env_str(name: str, default=_MISSING, *, choices=None) -> str:
    value = _raw(name, default)
    if value is None:
        return default
    if choices is not None and value not in choices:
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: expected one of {', '.join(choices)}.")
    return value


def parse_bool(name: str, value: str) -> bool:
    """true/false, yes/no, on/off or 1/0 (any case); anything else is an ImproperlyConfigured naming `name`."""
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: expected true/false, yes/no, on/off or 1/0.")


def parse_bool_or_auto(name: str, value: str) -> bool | None:
    """As parse_bool, or None for "auto" (the caller decides)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return parse_bool(name, value)
    except ImproperlyConfigured:
        raise ImproperlyConfigured(
            f"{name}={shown(name, value)} is invalid: expected auto, true/false, yes/no, on/off or 1/0."
        ) from None


def env_bool(name: str, default=_MISSING) -> bool:
    value = _raw(name, default)
    if value is None:
        return default
    return parse_bool(name, value)


def env_bool_or_auto(name: str, default=_MISSING) -> bool | None:
    """A boolean, or None for "auto"; checked at start-up like the others."""
    value = _raw(name, default)
    return parse_bool_or_auto(name, default if value is None else value)


def _number(name, default, parse, kind, min_value, max_value):
    value = _raw(name, default)
    if value is None:
        return default
    try:
        number = parse(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: expected {kind}.") from None
    if min_value is not None and number < min_value:
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: must be at least {min_value}.")
    if max_value is not None and number > max_value:
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: must be at most {max_value}.")
    return number


def env_int(name: str, default=_MISSING, *, min_value=None, max_value=None) -> int:
    return _number(name, default, int, "an integer", min_value, max_value)


def env_float(name: str, default=_MISSING, *, min_value=None, max_value=None) -> float:
    return _number(name, default, float, "a number", min_value, max_value)


def env_list(name: str, default=_MISSING) -> list[str]:
    value = _raw(name, default)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_json_object(name: str, default=_MISSING) -> dict:
    """A JSON object, e.g. TRAINING_PPO_CONFIG='{"iterations": 40, "learning_rate": 1e-5}'."""
    value = _raw(name, default)
    if value is None:
        return dict(default)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: not JSON ({exc.msg}).") from None
    if not isinstance(parsed, dict):
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: expected a JSON object.")
    return parsed


def env_db(name: str, default=_MISSING) -> dict:
    value = _raw(name, default)
    if value is None:
        value = default
    try:
        config = _env.db_url_config(value)
    except Exception as exc:
        raise ImproperlyConfigured(
            f"{name}={shown(name, value)} is invalid: {mask_password_parts(str(exc), value)}"
        ) from None
    if config.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            f"{name}={shown(name, value)} is invalid: Feedback Loop needs PostgreSQL (postgres://...)."
        )
    return config


def env_redis_url(name: str, default=_MISSING) -> str:
    value = env_str(name, default)
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"{name}={shown(name, value)} is invalid: expected a redis:// URL.")
    return value


def env_path(name: str, default=_MISSING) -> Path:
    value = env_str(name, default)
    return Path(value).expanduser().resolve()
