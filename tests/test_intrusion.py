"""Bad API keys cannot be turned against users: a real `llmos serve` on loopback where a valid
key is always served, bad keys past the threshold get 429 and are audited, and the client
address is read from X-Forwarded-For only when a trusted proxy sent it. Plus the detector
(llmos.kernel.intrusion) and the address parsing (llmos.server.auth) on their own."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from llmos.kernel.intrusion import IntrusionDetector
from llmos.server.auth import client_address
from test_server import ROOT, ServerProcess

THRESHOLD = 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_bad_keys_past_the_threshold_are_blocked():
    clock = FakeClock()
    ids = IntrusionDetector(auth_threshold=3, block_seconds=300, clock=clock)
    assert [ids.auth_failed("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert ids.blocked("10.0.0.1") == 300 and ids.blocked("10.0.0.2") is None
    assert ids.auth_failed("10.0.0.1") is False            # a block is started once, never extended
    clock.now += 300
    assert ids.blocked("10.0.0.1") is None
    assert ids.addresses_blocked == 1


def test_a_flood_of_refusals_is_reported_once_a_second():
    clock = FakeClock()
    ids = IntrusionDetector(auth_threshold=1, clock=clock)
    assert ids.refused("10.0.0.1") == 0                    # not blocked: nothing to refuse
    ids.auth_failed("10.0.0.1")
    assert [ids.refused("10.0.0.1") for _ in range(100)] == [1] + [0] * 99
    clock.now += 1
    assert ids.refused("10.0.0.1") == 100                  # the 99 held back and this one, in one record


def test_addresses_tracked_are_bounded():
    clock = FakeClock()
    ids = IntrusionDetector(auth_threshold=3, max_addresses=100, clock=clock)
    ids.auth_failed("10.0.0.1")
    ids.auth_failed("10.0.0.1")
    for i in range(10_000):                                # a flood of distinct addresses
        ids.auth_failed(f"10.1.{i // 256}.{i % 256}")
    assert len(ids._failed_at) <= 100
    assert ids.auth_failed("10.0.0.1") is False            # its two earlier failures were forgotten
    blocker = IntrusionDetector(auth_threshold=1, max_addresses=100, clock=clock)
    for i in range(1000):
        blocker.auth_failed(f"10.1.{i // 256}.{i % 256}")
    assert len(blocker._blocks) == 100
    assert blocker.blocked("10.1.0.0") is None and blocker.blocked("10.1.3.231") == 300


def test_forwarded_for_is_believed_only_from_a_trusted_proxy():
    proxies = ["127.0.0.1", "10.9.0.0/16", "fd00::/8"]
    assert client_address("203.0.113.5", "10.0.0.7", proxies) == "203.0.113.5"     # a spoof: ignored
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", "", proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", "10.0.0.7", proxies) == "10.0.0.7"
    # the client may write anything left of its own address: the right-most untrusted hop wins
    assert client_address("127.0.0.1", "1.1.1.1, 10.0.0.7", proxies) == "10.0.0.7"
    assert client_address("127.0.0.1", "1.1.1.1, 10.0.0.7, 10.9.3.4", proxies) == "10.0.0.7"
    assert client_address("127.0.0.1", "garbage, 10.0.0.7", proxies) == "10.0.0.7"
    assert client_address("127.0.0.1", "10.9.0.2, 10.9.0.1", proxies) == "10.9.0.2"   # all proxies: the farthest
    assert client_address("127.0.0.1", "10.0.0.7, garbage", proxies) == "127.0.0.1"   # malformed: the peer
    assert client_address("127.0.0.1", "10.0.0.7:4711", proxies) == "127.0.0.1"
    assert client_address("fd00::1", "2001:db8::7, fd00::2", proxies) == "2001:db8::7"
    assert client_address("unknown", "10.0.0.7", proxies) == "unknown"
    assert client_address("127.0.0.1", "10.0.0.7", []) == "127.0.0.1"


@pytest.mark.parametrize("value, says", [('["10.0.0.300"]', "'10.0.0.300' is not an IP address or CIDR network"),
                                         ('["10.0.0.1/8"]', "has host bits set"),
                                         ('"127.0.0.1"', "must be a list of IP addresses or CIDR networks")])
def test_a_bad_trusted_proxies_setting_is_a_clear_error(tmp_path, value, says):
    config = tmp_path / "llmos.toml"
    config.write_text(f"[server]\ntrusted_proxies = {value}\n")
    r = subprocess.run([sys.executable, "-m", "llmos.cli", "config", "--config", str(config)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode != 0 and "server.trusted_proxies" in r.stderr and says in r.stderr, r.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("intrusion"),
                      server={"auth_failure_threshold": THRESHOLD, "trusted_proxies": ["127.0.0.1"]})
    s.tenant_key = s.create_key("alice")
    yield s
    assert s.stop() == 0, s.log.read_text()


def attempt(server, key: str | None, forwarded: str | None = None, source: str | None = None) -> httpx.Response:
    """GET /v1/models with `key`, as if from `forwarded` (via the trusted proxy 127.0.0.1) or
    from the loopback address `source` (a peer that is no proxy)."""
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}),
               **({"X-Forwarded-For": forwarded} if forwarded else {})}
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(base_url=server.url, transport=transport, timeout=30) as http:
        return http.get("/v1/models", headers=headers)


def auth_audit(server, address: str) -> list[dict]:
    rows = server.http().get("/v1/audit", params={"call": "auth.key", "denied": "true"}).json()["data"]
    return [r for r in rows if f"from {address}" in r["reason"]]


def test_a_valid_key_is_served_after_a_flood_of_bad_keys_from_its_address(server):
    codes = [attempt(server, "sk-llmos-wrong", "10.0.0.7").status_code for _ in range(THRESHOLD + 1)]
    assert codes == [401] * THRESHOLD + [429]
    assert attempt(server, server.tenant_key, "10.0.0.7").status_code == 200
    twelfth = attempt(server, "sk-llmos-wrong", "10.0.0.7")
    assert twelfth.status_code == 429 and twelfth.json()["error"]["code"] == "address_blocked"
    assert 0 < int(twelfth.headers["Retry-After"]) <= 300
    assert attempt(server, server.tenant_key, "10.0.0.7").status_code == 200
    assert attempt(server, "sk-llmos-wrong", "10.0.0.8").status_code == 401      # another address: unaffected
    assert attempt(server, "sk-llmos-wrong").status_code == 401                   # nor the proxy itself
    assert attempt(server, server.tenant_key).status_code == 200
    rows = auth_audit(server, "10.0.0.7")
    assert all(r["pid"] is None and r["tenant"] == "-" and not r["allowed"] for r in rows)
    assert sum(r["outcome"] == "invalid_api_key" for r in rows) == THRESHOLD
    assert "is blocked for 300 s" in rows[THRESHOLD - 1]["reason"]
    refused = [r for r in rows if r["outcome"] == "address_blocked"]
    assert refused and refused[0]["reason"].startswith("blocked: 1 invalid api key(s) from 10.0.0.7 refused")
    blocked = re.search(r"^llmos_addresses_blocked(?:_total)? (\S+)$", server.http().get("/metrics").text, re.M)
    assert blocked and float(blocked[1]) >= 1


def test_a_client_cannot_spoof_its_address_past_the_count(server):
    """From a peer that is no proxy X-Forwarded-For is ignored, and through the proxy only the
    hop it appended counts: rotating the header buys the guesser nothing."""
    codes = [attempt(server, "sk-llmos-wrong", f"10.5.0.{i}", source="127.0.0.2").status_code
             for i in range(THRESHOLD + 1)]
    assert codes == [401] * THRESHOLD + [429]
    assert attempt(server, server.tenant_key, "10.5.0.99", source="127.0.0.2").status_code == 200
    assert len(auth_audit(server, "127.0.0.2")) == THRESHOLD + 1
    assert auth_audit(server, "10.5.0.1") == []                                   # nobody framed
    codes = [attempt(server, "sk-llmos-wrong", f"6.6.6.{i}, 10.0.0.9").status_code for i in range(THRESHOLD + 1)]
    assert codes == [401] * THRESHOLD + [429]
    assert auth_audit(server, "6.6.6.1") == []


def test_a_missing_key_is_not_counted_as_a_guess(server):
    for _ in range(THRESHOLD + 5):
        r = attempt(server, None, "10.0.0.20")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert attempt(server, "sk-llmos-wrong", "10.0.0.20").status_code == 401
