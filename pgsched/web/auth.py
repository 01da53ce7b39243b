"""Who may do what: bearer tokens, the login cookie, and the Origin check on writes.

Owns: turning a request's credentials into a role ("write" with the token, "read" with
the read token, None without either) and the rules built on it: GET, HEAD and OPTIONS
need any role; every other method needs "write" and, when the credential is the cookie,
an Origin header naming this host (a browser always sends one on a cross-site write, so
a page elsewhere cannot make the logged-in browser act; SameSite=Strict already keeps
the cookie off cross-site requests, this is the second lock).

Invariants: the cookie never holds a token, only an HMAC of the role keyed by the token,
so it is worthless once the token changes and reveals nothing; every comparison is
constant-time. No state: any number of processes with the same tokens accept each other's
cookies.

Failure: `AuthError` with the HTTP status (401 no or a wrong credential, 403 a read token
or a cookie write from another origin) and a one-line message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "pgsched_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Tokens:
    token: str
    read_token: str | None = None

    def _keys(self) -> list[tuple[str, str]]:
        keys = [("write", self.token)]
        if self.read_token:
            keys.append(("read", self.read_token))
        return keys

    def role_of_token(self, presented: str) -> str | None:
        found = None
        for role, token in self._keys():  # no early exit: timing must not tell which
            if hmac.compare_digest(presented.encode(), token.encode()):
                found = role
        return found

    def cookie_for(self, role: str) -> str:
        key = dict(self._keys())[role]
        mac = hmac.new(key.encode(), f"pgsched-session:{role}".encode(), hashlib.sha256)
        return f"{role}.{mac.hexdigest()}"

    def role_of_cookie(self, value: str) -> str | None:
        role = value.partition(".")[0]
        if role not in dict(self._keys()):
            return None
        return role if hmac.compare_digest(value.encode(), self.cookie_for(role).encode()) \
            else None


def authorize(tokens: Tokens, *, method: str, headers: Mapping[str, str],
              cookies: Mapping[str, str], any_role: bool = False) -> str:
    """The caller's role, or AuthError. `headers` are lower-case names. `any_role`: a
    write that either role may make (logging out), still only from this origin."""
    by_cookie = False
    auth = headers.get("authorization", "")
    if auth:
        scheme, _, presented = auth.partition(" ")
        role = tokens.role_of_token(presented.strip()) if scheme.lower() == "bearer" else None
        if role is None:
            raise AuthError(401, "invalid credentials: send Authorization: Bearer <token>")
    elif COOKIE in cookies:
        role, by_cookie = tokens.role_of_cookie(cookies[COOKIE]), True
        if role is None:
            raise AuthError(401, "the session has expired: log in again at /login")
    else:
        raise AuthError(401, "authentication required: send Authorization: Bearer <token>, "
                             "or log in at /login?token=...")
    if method.upper() in SAFE_METHODS:
        return role
    if role != "write" and not any_role:
        raise AuthError(403, "the read token allows GET only")
    if by_cookie and not same_origin(headers):
        raise AuthError(403, "cross-origin request refused: the Origin header must name "
                             "this host")
    return role


def same_origin(headers: Mapping[str, str]) -> bool:
    """True when the Origin header names the host the request was sent to. The scheme is
    not compared: behind a TLS-terminating proxy the service itself sees plain HTTP."""
    origin, host = headers.get("origin"), headers.get("host")
    if not origin or not host or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == host.lower()
