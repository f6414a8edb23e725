"""stageserver/forwarded.py: gunicorn's forwarded-IPs decision, kept per peer address,
is the decision gunicorn makes itself, for allowed and denied peers."""

from __future__ import annotations

from collections.abc import Iterator

import gunicorn
import pytest
from gunicorn.config import Config
from gunicorn.http.message import HeaderPolicy, Request
from gunicorn.http.unreader import IterUnreader

from stageserver import forwarded

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n"
)


def _config(allowed: str) -> Config:
    cfg = Config()
    cfg.set("forwarded_allow_ips", allowed)
    return cfg


def _request(cfg: Config, peer: object) -> Request:
    return Request(cfg, IterUnreader(iter([REQUEST])), peer)


def _decision(cfg: Config, peer: object) -> tuple[str, bool]:
    """The scheme a request with X-Forwarded-Proto: https gets, and the trust."""
    request = _request(cfg, peer)
    return request.scheme, request._peer_is_trusted_proxy()


PEERS = [("127.0.0.1", 5000), ("10.0.0.7", 1), ("10.1.0.7", 1), ("::1", 2), ("2001:db8::1", 3),
         ("not-an-ip", 4), "/run/stageserver.sock"]  # fmt: skip
ALLOWED = ["127.0.0.1,::1", "10.0.0.0/16", "*", "2001:db8::/32", ""]


@pytest.fixture
def cached() -> Iterator[None]:
    yield
    forwarded.uninstall()


@pytest.mark.parametrize("allowed", ALLOWED)
def test_each_peer_gets_gunicorns_decision(allowed: str, cached: None) -> None:
    cfg = _config(allowed)
    gunicorns = [_decision(cfg, peer) for peer in PEERS]
    assert forwarded.install(cfg)
    for _ in range(2):  # decided, then remembered
        assert [_decision(cfg, peer) for peer in PEERS] == gunicorns


def test_the_decision_is_gunicorns_own_for_a_trusted_proxy_and_not_for_others(
    cached: None,
) -> None:
    cfg = _config("10.0.0.0/16")
    assert forwarded.install(cfg)
    assert _request(cfg, ("10.0.3.4", 80)).scheme == "https"  # may say it was https
    assert _request(cfg, ("10.9.3.4", 80)).scheme == "http"  # may not
    assert _request(cfg, ("10.0.3.4", 80)).scheme == "https"


def test_a_peer_is_decided_once_and_the_memory_is_bounded(
    cached: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[object] = []
    gunicorns = HeaderPolicy._peer_is_trusted_proxy

    def counting(message: HeaderPolicy) -> bool:
        asked.append(message.peer_addr)
        return bool(gunicorns(message))

    monkeypatch.setattr(HeaderPolicy, "_peer_is_trusted_proxy", counting)
    monkeypatch.setattr(forwarded, "MAX_PEERS", 2)
    cfg = _config("127.0.0.1")
    assert forwarded.install(cfg)
    for port in (1, 2, 3):
        assert _request(cfg, ("127.0.0.1", port))._peer_is_trusted_proxy()
    assert asked == [("127.0.0.1", 1)]  # one decision for the address, whatever the port
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert not _request(cfg, (host, 1))._peer_is_trusted_proxy()
    assert len(asked) == 4  # the memory started over when it held two
    # Another config (another worker's, a test's) is decided by gunicorn every time.
    other = _config("*")
    assert _request(other, ("10.0.0.1", 1))._peer_is_trusted_proxy()
    assert _request(other, ("10.0.0.1", 1))._peer_is_trusted_proxy()
    assert len(asked) == 8  # each request asks twice here: as it is parsed, and above


def test_an_unchecked_gunicorn_is_left_as_it_is(cached: None) -> None:
    method = HeaderPolicy._peer_is_trusted_proxy
    assert not forwarded.install(_config("*"), version="99.0")
    assert HeaderPolicy._peer_is_trusted_proxy is method


def test_the_installed_gunicorn_is_one_checked() -> None:
    """The pin in requirements.txt is a version this was checked against: a new gunicorn
    is checked (the tests above, and its method read) before it joins CHECKED_VERSIONS."""
    assert gunicorn.__version__ in forwarded.CHECKED_VERSIONS
