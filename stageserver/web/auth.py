"""Which principal a request comes from: the server decides, never the caller.

Two ways to name one, which may be used together:

- API keys (``STAGESERVER_API_KEYS``, ``principals.py``): the request carries
  ``Authorization: Bearer <secret>``, or ``x-api-key: <secret>`` as Anthropic's clients
  send it (both may come: then they must name the same principal);
- ``StageServer(app, identify=fn)``: the host app's own login or session decides;
  ``fn(request)`` returns a principal's name, or None.

``identify`` is asked first; when it names nobody, the bearer key is looked at. A request
that gets no principal this way is refused with 401 and ``WWW-Authenticate: Bearer``,
whether its header was missing, malformed (empty, a scheme other than Bearer, too long,
not ASCII) or carried an unknown key; the secret itself is never repeated, logged or
counted. With neither way configured the server is open and every request is
``ANONYMOUS``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flask import Request

from ..errors import Unauthorized
from ..principals import ANONYMOUS, KeyRing, Principal, check_name

Identify = Callable[[Request], "str | None"]

_MAX_HEADER = 1024


class Authenticator:
    def __init__(self, keys: KeyRing, identify: Identify | None = None) -> None:
        self._keys = keys
        self._identify = identify

    @property
    def open(self) -> bool:
        return not self._keys and self._identify is None

    @property
    def bearer_required(self) -> bool:
        """Whether a request must carry a bearer key: keys, and no ``identify`` to ask."""
        return bool(self._keys) and self._identify is None

    def principal(self, request: Request) -> Principal:
        """The request's principal; raises Unauthorized."""
        if self.open:
            return ANONYMOUS
        if self._identify is not None:
            name = self._identify(request)
            if name is not None:
                return self._keys.by_name(check_name(name, "identify()"))
            if not self._keys:
                raise Unauthorized("not signed in: this server's app named no principal")
        bearer = request.headers.get("Authorization")
        api_key = request.headers.get("x-api-key")
        if api_key is None:
            return self._by_bearer(bearer)
        by_api_key = self._by_api_key(api_key)
        if bearer is not None and self._by_bearer(bearer) is not by_api_key:
            raise Unauthorized(
                "Authorization and x-api-key carry the keys of two principals: send one key",
                invalid_token=True,
            )
        return by_api_key

    def _by_bearer(self, header: str | None) -> Principal:
        if header is None:
            raise Unauthorized(
                "this server requires an API key: send 'Authorization: Bearer <key>'"
            )
        scheme, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or len(header) > _MAX_HEADER or not _well_formed(secret):
            raise Unauthorized(
                "malformed Authorization header: expected 'Bearer <key>'", invalid_token=True
            )
        return self._by_secret(secret)

    def _by_api_key(self, header: str) -> Principal:
        secret = header.strip()
        if len(header) > _MAX_HEADER or not _well_formed(secret):
            raise Unauthorized("malformed x-api-key header: expected the key", invalid_token=True)
        return self._by_secret(secret)

    def _by_secret(self, secret: str) -> Principal:
        principal = self._keys.by_secret(secret)
        if principal is None:
            raise Unauthorized("unknown API key", invalid_token=True)
        return principal


def _well_formed(secret: str) -> bool:
    return bool(secret) and secret.isascii() and secret.isprintable() and " " not in secret


def authenticator_of(extensions: Mapping[str, object]) -> Authenticator:
    authenticator = extensions.get("stageserver.auth")
    if not isinstance(authenticator, Authenticator):
        raise RuntimeError("stageserver is not registered on this app; call StageServer(app)")
    return authenticator
