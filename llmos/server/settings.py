"""One TOML file holds every setting: [engine] is EngineConfig (engine and kernel), [server]
is ServerSettings. Command-line flags override the file; `llmos config` prints the result."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from llmos.config import EngineConfig, llmos_home
from llmos.errors import InvalidRequestError
from llmos.validate import integer, number

# The server is shared by tenants, so it shares the engine fairly by default; the library's
# default (fcfs) suits one caller.
SERVER_ENGINE_DEFAULTS = {"scheduling_policy": "fair"}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool = True
    keys_db: str = ""                 # SQLite file of API keys; "" = $LLMOS_HOME/keys.db
    drain_timeout: float = 30.0       # seconds SIGTERM waits for in-flight requests before cancelling them
    default_max_tokens: int = 1024    # when a request sets no max_tokens (capped by what the context leaves)
    agents_dir: str = ""              # process table, mailboxes, files, journal, audit log; "" = $LLMOS_HOME/agents
    kill_grace: float = 5.0           # seconds between SIGTERM and SIGKILL when an agent is killed
    max_restarts: int = 5             # restarts within a minute before an agent's restart policy gives up
    restart_backoff_max: float = 5.0  # the longest wait before a restart (0.1 s, doubling up to this)
    denial_threshold: int = 20        # denied system calls in a minute that get an agent suspended and flagged
    auth_failure_threshold: int = 10  # bad API keys in a minute from one address before it is refused for a while
    trusted_proxies: list = field(default_factory=list)   # addresses whose X-Forwarded-For names the client
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name, kind in (("host", str), ("keys_db", str), ("log_level", str), ("auth", bool)):
            if not isinstance(getattr(self, name), kind):
                raise InvalidRequestError(f"server.{name}: must be a {kind.__name__}, got {getattr(self, name)!r}")
        integer("server.port", self.port, 0, 65535)
        integer("server.default_max_tokens", self.default_max_tokens, 1, 1 << 30)
        number("server.drain_timeout", self.drain_timeout, 0)
        number("server.kill_grace", self.kill_grace, 0)
        integer("server.denial_threshold", self.denial_threshold, 1)
        integer("server.max_restarts", self.max_restarts, 0)
        number("server.restart_backoff_max", self.restart_backoff_max, 0)
        integer("server.auth_failure_threshold", self.auth_failure_threshold, 1)
        if not isinstance(self.trusted_proxies, list):
            raise InvalidRequestError(f"server.trusted_proxies: must be a list of IP addresses or CIDR networks, "
                                      f"got {self.trusted_proxies!r}")
        for proxy in self.trusted_proxies:
            try:
                if not isinstance(proxy, str):
                    raise ValueError("not a string")
                ipaddress.ip_network(proxy)
            except ValueError as e:
                raise InvalidRequestError(f"server.trusted_proxies: {proxy!r} is not an IP address or CIDR network "
                                          f"(e.g. \"10.0.0.5\" or \"10.0.0.0/24\"): {e}") from None
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise InvalidRequestError(f"server.log_level: must be critical, error, warning, info or debug, "
                                      f"got {self.log_level!r}")
        if not self.auth and not is_loopback(self.host):
            raise InvalidRequestError(f"server.auth: may be off only on a loopback address, not on {self.host!r}")

    @property
    def keys_path(self) -> Path:
        return Path(self.keys_db).expanduser() if self.keys_db else llmos_home() / "keys.db"

    @property
    def agents_path(self) -> Path:
        return Path(self.agents_dir).expanduser() if self.agents_dir else llmos_home() / "agents"


@dataclass
class ToolSettings:
    modules: list = field(default_factory=list)   # modules (dotted names or .py paths) whose @llmos.tool functions load
    workers: int = 8                  # threads in the tool worker pool
    timeout: float = 30.0             # seconds a tool call may run unless the tool sets its own
    max_waiting: int = 256            # tool calls that may wait for a worker before more are refused
    approval_timeout: float = 3600.0  # seconds a needs_approval call waits for a person before it is denied
    http_allow_hosts: list = field(default_factory=list)   # host globs http.get may fetch; empty = no http.get
    conversation_budget: int = 1024   # tokens of working context a conversation keeps by default

    def __post_init__(self) -> None:
        for name in ("modules", "http_allow_hosts"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise InvalidRequestError(f"tools.{name}: must be a list of non-empty strings, got {v!r}")
        integer("tools.workers", self.workers, 1, 256)
        integer("tools.max_waiting", self.max_waiting, 1)
        integer("tools.conversation_budget", self.conversation_budget, 128, 1 << 20)
        number("tools.timeout", self.timeout, 0.001)
        number("tools.approval_timeout", self.approval_timeout, 0.001)


@dataclass
class AgentSettings:
    """[agents]: how agent processes are confined (see llmos/kernel/jail.py)."""
    confinement: str = "jail"         # jail: namespaces, own uid, seccomp, cgroup or rlimits; none: unconfined
    uid_base: int = 200000            # when llmos runs as root, tenant n runs as uid/gid uid_base + n
    uid_count: int = 65536            # how many tenants the range holds
    scratch_mb: int = 64              # size of an agent's private /tmp (RAM)
    max_pids: int = 256               # processes and threads an agent may have when its limits set none
    open_files: int = 1024            # RLIMIT_NOFILE of an agent

    def __post_init__(self) -> None:
        if self.confinement not in ("jail", "none"):
            raise InvalidRequestError(f"agents.confinement: must be \"jail\" or \"none\", got {self.confinement!r}")
        integer("agents.uid_base", self.uid_base, 1000, (1 << 32) - 2)
        integer("agents.uid_count", self.uid_count, 1, (1 << 32) - 2 - self.uid_base)
        integer("agents.scratch_mb", self.scratch_mb, 1, 1 << 20)
        integer("agents.max_pids", self.max_pids, 1, 1 << 22)
        integer("agents.open_files", self.open_files, 16, 1 << 20)


@dataclass
class ClusterSettings:
    """[cluster]: serve from engine replicas on Ray (`llmos serve --cluster [ADDRESS]`)."""
    enabled: bool = False
    address: str = ""                 # a Ray cluster ("auto", "ray://host:10001", host:port); "" = start a local one
    replicas: int = 2
    cpus_per_replica: float = 1.0     # Ray CPU resources each replica reserves
    threads_per_replica: int = 1      # torch threads inside each replica
    gpus_per_replica: float = 0.0
    max_inflight_per_replica: int = 0 # requests running on one replica at once; more wait at the router (0 = max_num_seqs)
    affinity_slack: int = 4           # requests of extra load a prefix-cache match may cost before load wins
    routing: str = "affinity"         # affinity (prefix cache + sessions, balanced by load) | round_robin

    def __post_init__(self) -> None:
        if self.routing not in ("affinity", "round_robin"):
            raise InvalidRequestError(f"cluster.routing: expected affinity or round_robin, got {self.routing!r}")
        if not isinstance(self.enabled, bool):
            raise InvalidRequestError(f"cluster.enabled: must be true or false, got {self.enabled!r}")
        if not isinstance(self.address, str):
            raise InvalidRequestError(f"cluster.address: must be a string, got {self.address!r}")
        integer("cluster.replicas", self.replicas, 1, 1024)
        integer("cluster.threads_per_replica", self.threads_per_replica, 1, 1024)
        integer("cluster.max_inflight_per_replica", self.max_inflight_per_replica, 0)
        integer("cluster.affinity_slack", self.affinity_slack, 0)
        number("cluster.cpus_per_replica", self.cpus_per_replica, 0)
        number("cluster.gpus_per_replica", self.gpus_per_replica, 0)

    def options(self) -> dict:
        """ClusterLLM's keyword arguments."""
        return {"replicas": self.replicas, "address": self.address or None, "cpus_per_replica": self.cpus_per_replica,
                "threads_per_replica": self.threads_per_replica, "gpus_per_replica": self.gpus_per_replica,
                "max_inflight_per_replica": self.max_inflight_per_replica or None,
                "affinity_slack": self.affinity_slack, "routing": self.routing}


@dataclass
class Settings:
    engine: dict = field(default_factory=dict)      # EngineConfig keyword arguments
    server: ServerSettings = field(default_factory=ServerSettings)
    tools: ToolSettings = field(default_factory=ToolSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    agents: AgentSettings = field(default_factory=AgentSettings)
    mcp_servers: list = field(default_factory=list)  # [[mcp_servers]]: name and command (argv list) or url

    def __post_init__(self) -> None:
        if not isinstance(self.mcp_servers, list):
            raise InvalidRequestError("mcp_servers: must be an array of tables ([[mcp_servers]])")
        if not self.mcp_servers:
            return
        from llmos.tools.mcp import MCPServerConfig   # the mcp SDK takes most of a second to import
        configs = []
        for i, entry in enumerate(self.mcp_servers):
            if isinstance(entry, MCPServerConfig):
                configs.append(entry)
                continue
            if not isinstance(entry, dict):
                raise InvalidRequestError(f"mcp_servers[{i}]: must be a table")
            unknown = sorted(set(entry) - {"name", "command", "url", "env", "timeout"})
            if unknown:
                raise InvalidRequestError(f"mcp_servers[{i}]: unknown key(s) {unknown}; known: name, command, url, "
                                          f"env, timeout")
            try:
                configs.append(MCPServerConfig(**entry))
            except TypeError as e:
                raise InvalidRequestError(f"mcp_servers[{i}]: {e}") from None
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"mcp_servers: names must be unique, got {names}")
        self.mcp_servers = configs

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.engine)

    def to_toml(self) -> str:
        """The effective configuration. TOML has no null, so unset settings appear as comments."""
        out = []
        for name, values in (("engine", self.engine), ("server", dataclasses.asdict(self.server)),
                             ("tools", dataclasses.asdict(self.tools)), ("cluster", dataclasses.asdict(self.cluster)),
                             ("agents", dataclasses.asdict(self.agents))):
            out.append(tomli_w.dumps({name: {k: v for k, v in values.items() if v is not None}})
                       + "".join(f"# {k} is unset\n" for k, v in values.items() if v is None))
        if self.mcp_servers:
            out.append(tomli_w.dumps({"mcp_servers": [{k: v for k, v in dataclasses.asdict(c).items() if v is not None}
                                                      for c in self.mcp_servers]}))
        return "\n".join(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> Settings:
    """Defaults, then the TOML file, then `overrides` ({"engine.model": ..., "server.port": ...})."""
    sections: dict[str, dict] = {"engine": {}, "server": {}, "tools": {}, "cluster": {}, "agents": {}}
    mcp_servers: list = []
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequestError(f"config {path}: {e}") from None
        mcp_servers = data.pop("mcp_servers", [])
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise InvalidRequestError(f"config {path}: unknown section(s) {unknown}; known: engine, server, tools, "
                                      f"cluster, agents, mcp_servers")
        for name, values in data.items():
            if not isinstance(values, dict):
                raise InvalidRequestError(f"config {path}: [{name}] must be a table")
            sections[name].update(values)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            raise InvalidRequestError(f"setting {dotted!r}: expected engine.<name>, server.<name>, tools.<name>, "
                                      f"cluster.<name> or agents.<name>")
        sections[section][key] = value
    engine_fields = [f for f in dataclasses.fields(EngineConfig)]
    known_engine = {f.name for f in engine_fields}
    known_server = {f.name for f in dataclasses.fields(ServerSettings)}
    known_tools = {f.name for f in dataclasses.fields(ToolSettings)}
    known_cluster = {f.name for f in dataclasses.fields(ClusterSettings)}
    known_agents = {f.name for f in dataclasses.fields(AgentSettings)}
    for section, known in (("engine", known_engine), ("server", known_server), ("tools", known_tools),
                           ("cluster", known_cluster), ("agents", known_agents)):
        unknown = sorted(set(sections[section]) - known)
        if unknown:
            raise InvalidRequestError(f"[{section}]: unknown setting(s) {unknown}; known: {sorted(known)}")
    engine = {f.name: f.default for f in engine_fields if f.default is not dataclasses.MISSING}
    engine.update(SERVER_ENGINE_DEFAULTS)
    engine.update(sections["engine"])
    EngineConfig(**{**engine, "device": "cpu"})   # validate now; "auto" is resolved when the engine starts
    return Settings(engine, ServerSettings(**sections["server"]), ToolSettings(**sections["tools"]),
                    ClusterSettings(**sections["cluster"]), AgentSettings(**sections["agents"]), mcp_servers)
