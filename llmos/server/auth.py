"""Who is calling: the API key in `Authorization: Bearer <key>` decides the tenant, the most
urgent priority allowed, the tenant's weight, the limits and whether the caller is an admin.
With auth off (loopback only) every caller is tenant "default" with every right."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmos.kernel.process import Process
from llmos.server.errors import APIError
from llmos.server.keys import ApiKey
from llmos.server.state import ServerState


@dataclass(frozen=True)
class Principal:
    tenant: str
    min_priority: int
    weight: float
    admin: bool
    key: ApiKey | None = None
    default_priority: int = 0

    def priority(self, requested: int | None, param: str = "priority") -> int:
        """The priority a request runs at: its own if the key allows it, else the key's level."""
        if requested is None:
            return self.default_priority
        if requested < self.min_priority:
            raise APIError(403, f"{param}: {requested} is more urgent than this key allows (lowest allowed: "
                                f"{self.min_priority}); lower numbers run first", "permission_error",
                           param=param, code="priority_not_allowed")
        return requested

    def may_see(self, tenant: str) -> bool:
        return self.admin or tenant == self.tenant


ANONYMOUS = Principal("default", -1000, 1.0, True)   # auth off: any priority, 0 unless asked


def get_state(request: Request) -> ServerState:
    return request.app.state.llmos


bearer = HTTPBearer(auto_error=False, description="an llmos API key (`llmos keys create`)")


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                 state: ServerState = Depends(get_state)) -> Principal:
    """The key decides, first: a valid key is served whatever else its address sent. Only bad
    keys are counted per address, and those from an address past the threshold get 429."""
    if not state.settings.server.auth:
        return ANONYMOUS
    if credentials is None or not credentials.credentials.strip():
        raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", "authentication_error",
                       code="missing_api_key")
    key = state.keys.lookup(credentials.credentials.strip())
    if key is not None:
        return Principal(key.tenant, key.priority, key.weight, key.admin, key, key.priority)
    address = client_address(request.client.host if request.client else "unknown",
                             ",".join(request.headers.getlist("x-forwarded-for")),
                             state.settings.server.trusted_proxies)
    left = state.guard.blocked(address)
    if left is None:
        now_blocked = state.guard.auth_failed(address)
        _audit(state, address, f"invalid api key from {address}" +
               (f"; {address} is blocked for {state.guard.block_seconds:.0f} s" if now_blocked else ""),
               "invalid_api_key")
        raise APIError(401, "invalid or revoked API key", "authentication_error", code="invalid_api_key")
    refused = state.guard.refused(address)
    if refused:
        _audit(state, address, f"blocked: {refused} invalid api key(s) from {address} refused "
                               f"(too many invalid keys)", "address_blocked")
    raise APIError(429, f"too many invalid API keys from {address}: invalid keys from it are refused for "
                        f"{left:.0f} s more; valid keys are still served", "rate_limit_error",
                   code="address_blocked", retry_after=left)


def _audit(state: ServerState, address: str, reason: str, outcome: str) -> None:
    """A key attempt refused, on the kernel's audit log beside the system calls it guards."""
    if state.agents is not None:
        state.agents.audit.finish(state.agents.audit.begin(None, "-", "auth.key", {"address": address}, False,
                                                           reason), outcome, 0.0)


@functools.cache
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p) for p in proxies)


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: tuple[str, ...]) -> bool:
    return any(address in net for net in _networks(proxies))


def client_address(peer: str, forwarded: str | None, trusted_proxies: list[str]) -> str:
    """Who sent a request. X-Forwarded-For is believed only from a trusted proxy, and only as
    far as the chain of trusted proxies goes (nginx's real_ip_recursive): the right-most hop
    that is not a trusted proxy is the client, since the client may have written anything to
    its left. A missing or malformed header leaves the peer."""
    proxies = tuple(trusted_proxies)
    try:
        if not forwarded or not _trusted(ipaddress.ip_address(peer), proxies):
            return peer
        for hop in reversed(forwarded.split(",")):
            address = ipaddress.ip_address(hop.strip())
            if not _trusted(address, proxies):
                return str(address)
    except ValueError:
        return peer
    return str(address)        # every hop a trusted proxy: the farthest one


def authenticate_process(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                         state: ServerState = Depends(get_state)) -> Process:
    """The calling agent process, known by the token the supervisor handed it at spawn:
    identity comes from the kernel, never from what the agent says about itself."""
    proc = state.agents.table.by_token(credentials.credentials.strip()) if credentials else None
    if proc is None:
        raise APIError(401, "invalid process token: system calls need the LLMOS_TOKEN of a live process",
                       "authentication_error", code="invalid_process_token")
    return proc


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.admin:
        raise APIError(403, "this endpoint needs an admin key", "permission_error", code="admin_required")
    return principal
