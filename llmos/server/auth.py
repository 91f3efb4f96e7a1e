"""Who is calling: the API key in `Authorization: Bearer <key>` decides the tenant, the most
urgent priority allowed, the tenant's weight, the limits and whether the caller is an admin.
With auth off (loopback only) every caller is tenant "default" with every right."""

from __future__ import annotations

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
    if not state.settings.server.auth:
        return ANONYMOUS
    address = request.client.host if request.client else "unknown"
    left = state.guard.blocked(address)
    if left is not None:
        raise APIError(429, f"too many invalid API keys from {address}; refused for {left:.0f} s more",
                       "rate_limit_error", code="address_blocked", retry_after=left)
    if credentials is None or not credentials.credentials.strip():
        raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", "authentication_error",
                       code="missing_api_key")
    key = state.keys.lookup(credentials.credentials.strip())
    if key is None:
        state.guard.auth_failed(address)
        raise APIError(401, "invalid or revoked API key", "authentication_error", code="invalid_api_key")
    return Principal(key.tenant, key.priority, key.weight, key.admin, key, key.priority)


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
