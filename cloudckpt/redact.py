"""Keeping credentials out of everything cloudckpt prints, logs or writes.

:func:`redact_url` strips user info (``user:password@``) and secret query parameters (SAS signatures, tokens) from
a URL: a store's URL is shown and recorded only in that form, the real one being used only to connect.
:class:`Redactor` knows the secret values of a process — secret storage options (``key``, ``secret``, ``token``,
``password``, ``sas_token``, ``account_key``, ``connection_string``, ``credentials``..., inline service-account
JSON included), the credentials in the environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, the contents
of ``GOOGLE_APPLICATION_CREDENTIALS``...) and URL user info — and :meth:`Redactor.scrub` masks them, and any URL
user info, private key or Azure key (``AccountKey=``, ``SharedAccessSignature=``, ``SharedKey``), in a text (an
error from an SDK, a log line). The CLI passes every error and log record through it.

Example:
    >>> redact_url("ftp://alice:s3cr3t@files.example/runs/r1")
    'ftp://***@files.example/runs/r1'
    >>> r = Redactor.from_environ({})
    >>> r.add_options({"endpoint_url": "http://minio:9000", "secret": "hunter2-longer"})
    >>> r.scrub("denied for hunter2-longer at http://minio:9000")
    'denied for *** at http://minio:9000'
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
#: option names whose values are credentials (compared in lower case; also any name containing these words)
SECRET_OPTIONS = {"key", "secret", "token", "password", "passwd", "sas_token", "account_key", "connection_string",
                  "credentials", "credential", "client_secret", "session_token", "private_key", "access_key",
                  "secret_key", "access_token", "refresh_token", "api_key", "aws_access_key_id",
                  "aws_secret_access_key", "aws_session_token", "sig", "signature", "x-amz-signature",
                  "x-amz-security-token", "x-amz-credential", "x-goog-signature", "x-goog-credential"}
_SECRET_WORDS = re.compile(r"secret|token|passw|credential|private_key|account_key|access_key|connection_string|"
                           r"sas|signature|api_key", re.I)
#: environment variables that hold credentials (plus any whose name says so, see :func:`is_secret_name`)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING",
              "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "GOOGLE_CREDENTIALS", "GCS_OAUTH_TOKEN")
_CREDENTIAL_FILES = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s@?#'\"]+)@")
_QUERY = re.compile(r"(?P<name>[?&][^=&\s?#]+)=(?P<value>[^&#\s'\"]+)")
#: Azure credentials inside connection strings and headers: ``AccountKey=...;``, ``SharedAccessSignature=...``,
#: ``SharedAccessKey=...``, ``Authorization: SharedKey account:signature``
_AZURE = re.compile(r"(?P<name>\b(?:AccountKey|SharedAccessKey|SharedAccessSignature)=)(?P<value>[^;\s'\"]+)|"
                    r"(?P<shared>\bSharedKey(?:Lite)? [^:\s]+:)(?P<sig>[A-Za-z0-9+/=%]+)", re.I)
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
_MIN_LEN = 6  # shorter values (e.g. "anon", "true") are too common to mask everywhere


def is_secret_name(name: str) -> bool:
    """True when an option, query parameter or environment variable called ``name`` holds a credential."""
    low = name.lower()
    return low in SECRET_OPTIONS or bool(_SECRET_WORDS.search(low))


def redact_url(url: str) -> str:
    """``url`` without user info and with secret query values masked; anything else is returned unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    out = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", url)
    if "?" in out:
        base, _, query = out.partition("?")
        query, _, frag = query.partition("#")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = "&".join(f"{k}={MASK if is_secret_name(k) else v}" for k, v in pairs)
            out = f"{base}?{query}" + (f"#{frag}" if frag else "")
    return out


def _strings(value: Any) -> Iterable[str]:
    """Every string inside ``value`` (a str, or dicts/lists of them); a JSON string is also looked into."""
    if isinstance(value, str):
        yield value
        if value.lstrip().startswith("{"):
            try:
                yield from _strings(json.loads(value))
            except ValueError:
                pass
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def url_secrets(url: str) -> list[str]:
    """The user info of ``url`` (user and password) and its secret query values."""
    if not isinstance(url, str) or "://" not in url:
        return []
    parts = urllib.parse.urlsplit(url) if _USERINFO.search(url) or "?" in url else None
    if parts is None:
        return []
    found = [urllib.parse.unquote(p) for p in (parts.username, parts.password) if p]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if is_secret_name(k)]
    return found


class Redactor:
    """The secret values of one process, and :meth:`scrub` to mask them (and any URL user info or private key)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self.add(secrets)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Redactor:
        """The credentials found in ``environ`` (default ``os.environ``), including those in credential files."""
        env = os.environ if environ is None else environ
        r = cls(env[name] for name in env if name in SECRET_ENV or (is_secret_name(name) and
                                                                    not name.startswith("CLOUDCKPT_")))
        for name in _CREDENTIAL_FILES:
            path = env.get(name)
            if path and os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        doc = json.loads(f.read(1_000_000))
                except (OSError, ValueError):
                    continue
                if isinstance(doc, dict):
                    r.add_options(doc)
        for name in ("CLOUDCKPT_REMOTE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST"):
            r.add(url_secrets(env.get(name, "")))
        return r

    def add(self, values: Iterable[Any]) -> None:
        for value in values:
            for s in _strings(value):
                s = s.strip()
                if len(s) >= _MIN_LEN:
                    self._secrets.update({s, repr(s)[1:-1], json.dumps(s)[1:-1], urllib.parse.quote(s, safe="")})

    def add_options(self, options: Mapping[str, Any]) -> None:
        """Remember the values of the secret options among ``options`` (nested dicts included) and URL secrets."""
        for name, value in options.items():
            if is_secret_name(str(name)):
                self.add([value])
            elif isinstance(value, Mapping):
                self.add_options(value)
            elif isinstance(value, str):
                self.add(url_secrets(value))

    def add_url(self, url: str | None) -> None:
        self.add(url_secrets(url or ""))

    def scrub(self, text: str) -> str:
        """``text`` with every known secret, URL user info and private key masked."""
        if not text:
            return text
        out = _PEM.sub(MASK, text)
        out = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", out)
        out = _AZURE.sub(lambda m: (m["name"] or m["shared"]) + MASK, out)
        out = _QUERY.sub(lambda m: f"{m['name']}={MASK}" if is_secret_name(m["name"][1:]) else m[0], out)
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in out:
                out = out.replace(secret, MASK)
        return out


class ScrubFilter(logging.Filter):
    """A logging filter for a handler: formats each record's message (and traceback) and scrubs it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw message, scrubbed
            message = str(record.msg)
        record.msg, record.args = self.redactor.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.scrub(record.stack_info)
        return True
