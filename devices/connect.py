"""One way for every simulated device to open its MQTT connection: host, port, login and TLS from a URL.

`mqtt://user:password@host:1883` logs in with the URL's credentials (a test publisher, say);
`login` (user, password) overrides them (a provisioned device logs in as its own id);
`mqtts://host:8883` connects with TLS, trusting `ca_file` (or the system's CAs).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt


def mqtt_client(
    url: str,
    identifier: str,
    *,
    login: tuple[str, str] | None = None,
    ca_file: str = "",
    **options: Any,  # noqa: ANN401 - passed through to aiomqtt.Client
) -> aiomqtt.Client:
    """An aiomqtt client for `url`, identified as `identifier`."""
    parts = urlsplit(url)
    tls = parts.scheme in ("mqtts", "ssl")
    username, password = login or (
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )
    return aiomqtt.Client(
        parts.hostname or "localhost",
        parts.port or (8883 if tls else 1883),
        identifier=identifier,
        username=username,
        password=password,
        tls_context=ssl.create_default_context(cafile=ca_file or None) if tls else None,
        **options,
    )
