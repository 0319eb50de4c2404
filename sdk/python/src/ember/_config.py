"""Where the server is and which key to send.

Arguments win, then ``EMBER_API_URL`` / ``EMBER_API_KEY``, then
``$XDG_CONFIG_HOME/ember/config.toml`` (else ``~/.config/ember/config.toml``,
keys ``api_url`` and ``api_key``: the file the ``ember`` CLI reads), then the
default URL. A missing key is an :class:`~ember.AuthError` that says how to set
one. ``EMBER_CA`` (or ``ca`` in the file) names a PEM file of the CA that signed
an ``https://`` server's certificate, when the system does not trust it.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthError, ConfigError

DEFAULT_API_URL = "http://127.0.0.1:3000"


@dataclass(frozen=True)
class Settings:
    api_url: str
    api_key: str = field(repr=False)
    ca: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """What ``https://`` connections verify the server with."""
        ctx = ssl.create_default_context()
        if self.ca:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"EMBER_CA {self.ca}: {e}") from e
        return ctx


def config_path() -> Path | None:
    base = os.environ.get("XDG_CONFIG_HOME") or None
    if base is None:
        home = os.environ.get("HOME")
        if not home:
            return None
        base = os.path.join(home, ".config")
    return Path(base) / "ember" / "config.toml"


def read_config(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from e
    unknown = set(data) - {"api_url", "api_key", "ca"}
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown keys {sorted(unknown)} (expected api_url, api_key and ca)"
        )
    for k, v in data.items():
        if not isinstance(v, str):
            raise ConfigError(f"config file {path}: {k} must be a string")
    return dict(data)


def resolve(api_url: str | None = None, api_key: str | None = None) -> Settings:
    """Settings from arguments, the environment and the config file."""
    url = api_url or os.environ.get("EMBER_API_URL") or None
    key = api_key or os.environ.get("EMBER_API_KEY") or None
    ca = os.environ.get("EMBER_CA") or None
    path = config_path()
    if url is None or key is None:
        file = read_config(path)
        url = url or file.get("api_url") or None
        key = key or file.get("api_key") or None
        ca = ca or file.get("ca") or None
    elif ca is None:
        # Both given: the file is only asked for a CA, and a broken one
        # does not stand in the way.
        try:
            ca = read_config(path).get("ca") or None
        except ConfigError:
            pass
    if not key:
        where = path if path is not None else "~/.config/ember/config.toml"
        raise AuthError(
            "no API key: pass api_key=..., set EMBER_API_KEY, or put api_key in "
            f"{where} (`ember server` prints an admin key on its first start)"
        )
    url = (url or DEFAULT_API_URL).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"api_url {url!r} is not an http:// or https:// URL")
    return Settings(api_url=url, api_key=key.strip(), ca=ca)
