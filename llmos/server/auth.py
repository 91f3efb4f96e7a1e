"""Who is calling: the API key in `Authorization: Bearer <key>` decides the tenant, the most
urgent priority allowed, the tenant's weight, the limits and whether the caller is an admin.
With auth off (loopback only) every caller is tenant "default" with every right."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


_bearer = HTTPBearer(auto_error=False, description="an llmos API key (`llmos keys create`)")


def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 state: ServerState = Depends(get_state)) -> Principal:
    if not state.settings.server.auth:
        return ANONYMOUS
    if credentials is None or not credentials.credentials.strip():
        raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", "authentication_error",
                       code="missing_api_key")
    key = state.keys.lookup(credentials.credentials.strip())
    if key is None:
        raise APIError(401, "invalid or revoked API key", "authentication_error", code="invalid_api_key")
    return Principal(key.tenant, key.priority, key.weight, key.admin, key, key.priority)


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.admin:
        raise APIError(403, "this endpoint needs an admin key", "permission_error", code="admin_required")
    return principal
