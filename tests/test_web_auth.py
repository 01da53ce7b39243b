"""Unit tests of pgsched/web/auth.py: roles from tokens and cookies, and the Origin rule."""

import pytest

from pgsched.web.auth import COOKIE, AuthError, Tokens, authorize, same_origin

TOKENS = Tokens("w" * 20, "r" * 20)


def role(method="GET", headers=None, cookies=None):
    return authorize(TOKENS, method=method, headers=headers or {}, cookies=cookies or {})


def status(**kwargs):
    with pytest.raises(AuthError) as caught:
        role(**kwargs)
    return caught.value.status


def test_bearer_tokens_give_their_role_and_anything_else_is_401():
    assert role(headers={"authorization": "Bearer " + "w" * 20}) == "write"
    assert role(headers={"authorization": "bearer " + "r" * 20}) == "read"
    assert status(headers={"authorization": "Bearer " + "x" * 20}) == 401
    assert status(headers={"authorization": "Basic " + "w" * 20}) == 401
    assert status() == 401


def test_a_cookie_is_an_hmac_of_the_role_that_cannot_be_upgraded_or_reused():
    write, read = TOKENS.cookie_for("write"), TOKENS.cookie_for("read")
    assert "w" * 20 not in write and write != read
    assert role(cookies={COOKIE: read}) == "read"
    assert status(cookies={COOKIE: "write." + read.partition(".")[2]}) == 401
    assert status(cookies={COOKIE: Tokens("z" * 20).cookie_for("write")}) == 401
    assert Tokens("w" * 20).role_of_cookie(read) is None  # read token removed: cookie dead


def test_writes_need_the_write_role_and_cookie_writes_this_origin():
    here = {"host": "sched.internal:8787", "origin": "https://sched.internal:8787"}
    assert status(method="POST", headers={"authorization": "Bearer " + "r" * 20}) == 403
    cookie = {COOKIE: TOKENS.cookie_for("write")}
    assert role(method="POST", headers=here, cookies=cookie) == "write"
    for origin in ("https://evil.example", "null", None):
        headers = {"host": here["host"]} | ({"origin": origin} if origin else {})
        assert status(method="DELETE", headers=headers, cookies=cookie) == 403
    # A bearer token is not sent by browsers on their own: no Origin needed.
    assert role(method="POST", headers={"authorization": "Bearer " + "w" * 20}) == "write"


def test_same_origin_compares_host_and_port_only():
    assert same_origin({"host": "a:1", "origin": "http://A:1"})
    assert not same_origin({"host": "a:1", "origin": "http://a:2"})
    assert not same_origin({"host": "a:1"})
