"""The `llmos` command: model store, one-shot generation, an interactive chat, the HTTP
server, its configuration and its API keys."""

from __future__ import annotations

import argparse
import os
import sys

from llmos.errors import LLMOSError


def _engine_args(p: argparse.ArgumentParser) -> None:
    from llmos.config import EngineConfig as E   # the defaults are EngineConfig's, stated once
    p.add_argument("--model", default=E.model, help="store name, .gguf file or Hugging Face directory")
    p.add_argument("--kv-cache-memory", default=E.kv_cache_memory)
    p.add_argument("--max-num-seqs", type=int, default=E.max_num_seqs)
    p.add_argument("--device", default=E.device)
    p.add_argument("--dtype", default=E.dtype)
    _compute_args(p, E)


def _compute_args(p: argparse.ArgumentParser, defaults=None) -> None:
    """--compute, --quantization, --packed-activations (the defaults: EngineConfig's, or unset
    for serve, whose config file may set them)."""
    d = defaults
    p.add_argument("--compute", choices=["auto", "packed", "float32"], default=d.compute if d else None,
                   help="packed 4/8-bit kernels where they measure faster (auto), always, or float32 weights")
    p.add_argument("--quantization", choices=["q8_0", "q4_0", "q4_1"], default=d.quantization if d else None,
                   help="pack a float model's matrices at load")
    p.add_argument("--packed-activations", choices=["float32", "int8"], default=d.packed_activations if d else None,
                   help="exact activations, or 8-bit ones for integer dot products (faster, as llama.cpp)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args):
    from llmos.api.llm import LLM
    return LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
               device=args.device, dtype=args.dtype, compute=args.compute, quantization=args.quantization,
               packed_activations=args.packed_activations)


def _params(args):
    from llmos.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def cmd_pull(args) -> int:
    from llmos.models.store import ModelStore
    path = ModelStore().pull(args.name, progress=not args.quiet)
    print(f"{args.name}: {path}")
    return 0


def cmd_models(args) -> int:
    from llmos.models.store import ModelStore
    entries = ModelStore().list()
    if not entries:
        print("no models; fetch the default one with: llmos pull smollm2-135m")
        return 0
    for e in entries:
        print(f"{e.name:<24} {e.size / 2**20:8.1f} MiB  {e.format:<5} {e.path}")
    return 0


def cmd_generate(args) -> int:
    llm = _make_llm(args)
    for delta in llm.stream(args.prompt, _params(args)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    params = _params(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"llmos chat with {llm.model_name}. Empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in llm.stream(history, params):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _settings(args):
    """Settings from --config, then the flags given on the command line."""
    import tomllib
    from llmos.server.settings import load_settings
    overrides = {}
    for item in getattr(args, "set", None) or []:
        name, eq, raw = item.partition("=")
        if not eq:
            raise LLMOSError(f"--set {item!r}: expected SECTION.NAME=VALUE, e.g. engine.kv_cache_memory=256MiB")
        try:
            overrides[name.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[name.strip()] = raw   # a bare word is a string
    for flag, name in (("model", "engine.model"), ("host", "server.host"), ("port", "server.port"),
                       ("compute", "engine.compute"), ("quantization", "engine.quantization"),
                       ("packed_activations", "engine.packed_activations")):
        if getattr(args, flag, None) is not None:
            overrides[name] = getattr(args, flag)
    if getattr(args, "no_auth", False):
        overrides["server.auth"] = False
    if getattr(args, "cluster", None) is not None:
        overrides["cluster.enabled"] = True
        if args.cluster:
            overrides["cluster.address"] = args.cluster
    if getattr(args, "replicas", None) is not None:
        overrides["cluster.replicas"] = args.replicas
    return load_settings(args.config, overrides)


def cmd_serve(args) -> int:
    # Idle OpenMP workers sleep instead of spinning, before torch loads: the server's event loop
    # and stream threads share the cores with them (benchmarks/throughput.py measured why).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from llmos.server.serve import serve
    return serve(_settings(args))


def cmd_config(args) -> int:
    sys.stdout.write(_settings(args).to_toml())
    return 0


def _key_store(args):
    from llmos.server.keys import KeyStore
    return KeyStore(_settings(args).server.keys_path)


def cmd_keys_create(args) -> int:
    key, rec = _key_store(args).create(args.tenant, priority=args.priority, weight=args.weight, rpm=args.rpm,
                                       tpm=args.tpm, max_concurrent=args.max_concurrent, admin=args.admin)
    print(f"created {rec.id} for tenant {rec.tenant!r}{' (admin)' if rec.admin else ''}")
    print(f"key (shown only now; store it safely): {key}")
    return 0


def cmd_keys_list(args) -> int:
    keys = _key_store(args).list(include_revoked=args.all)
    if not keys:
        print("no keys; make one with: llmos keys create --tenant NAME")
        return 0
    print(f"{'id':<18} {'tenant':<16} {'prio':>5} {'weight':>7} {'rpm':>6} {'tpm':>8} {'conc':>5}  admin  state")
    def dash(v) -> str:
        return "-" if v is None else str(v)

    for k in keys:
        print(f"{k.id:<18} {k.tenant:<16} {k.priority:>5} {k.weight:>7g} {dash(k.rpm):>6} {dash(k.tpm):>8} "
              f"{dash(k.max_concurrent):>5}  {'yes' if k.admin else 'no':<5}  {'revoked' if k.revoked_at else 'live'}")
    return 0


def cmd_keys_revoke(args) -> int:
    if not _key_store(args).revoke(args.id):
        print(f"llmos: error: no live key {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}; it stops working at once")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="An operating system for large language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="fetch a model into the store ($LLMOS_HOME/models)")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("models", help="list the models in the store")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    p.add_argument("prompt")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="TOML file with [engine] and [server] settings")
        p.add_argument("--set", action="append", metavar="SECTION.NAME=VALUE",
                       help="override one setting, e.g. engine.kv_cache_memory=256MiB (repeatable)")

    for name, func, help_text in (("serve", cmd_serve, "run the OpenAI-compatible HTTP server"),
                                  ("config", cmd_config, "print the effective configuration as TOML")):
        p = sub.add_parser(name, help=help_text)
        config_args(p)
        p.add_argument("--model", default=None, help="store name, .gguf file or Hugging Face directory")
        p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
        p.add_argument("--no-auth", action="store_true", help="no API keys; loopback addresses only")
        p.add_argument("--cluster", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="serve from engine replicas on Ray: the cluster at ADDRESS, or a local one")
        p.add_argument("--replicas", type=int, default=None, help="engine replicas in the cluster (default 2)")
        _compute_args(p)
        p.set_defaults(func=func)

    keys = sub.add_parser("keys", help="manage the server's API keys").add_subparsers(dest="keys_command",
                                                                                     required=True)
    p = keys.add_parser("create", help="make a key; the full key is printed only this once")
    config_args(p)
    p.add_argument("--tenant", required=True, help="whose requests this key makes")
    p.add_argument("--priority", type=int, default=0, help="most urgent priority allowed (lower runs first)")
    p.add_argument("--weight", type=float, default=1.0, help="the tenant's share under fair scheduling")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, help="prompt + completion tokens per minute")
    p.add_argument("--max-concurrent", type=int, default=None, help="requests in flight at once")
    p.add_argument("--admin", action="store_true", help="may use the kernel API on every tenant's requests")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (never the keys themselves)")
    config_args(p)
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key by id; it stops working at once")
    config_args(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_keys_revoke)
    from llmos.cli_agents import add_commands
    add_commands(sub)
    from llmos.cli_adapters import add_commands as add_adapters
    add_adapters(sub)
    from llmos.cli_top import add_commands as add_top
    add_top(sub)
    from llmos.cli_cluster import add_commands as add_cluster
    add_cluster(sub)
    from llmos.cli_train import add_commands as add_train
    add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:   # `llmos run PATH [options] -- program args`: the program's own
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = build_parser().parse_args(argv)
    if extra:
        args.args = [*args.args, *extra]
    try:
        return args.func(args)
    except LLMOSError as e:
        print(f"llmos: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
