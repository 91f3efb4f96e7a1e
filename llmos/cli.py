"""The `llmos` command: model store, one-shot generation and an interactive chat."""

from __future__ import annotations

import argparse
import sys

from llmos.errors import LLMOSError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="store name, .gguf file or Hugging Face directory")
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args):
    from llmos.api.llm import LLM
    return LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
               device=args.device, dtype=args.dtype)


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
    print(f"llmos chat with {llm.engine.model_name}. Empty line or Ctrl-D to quit, /reset to start over.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMOSError as e:
        print(f"llmos: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
