"""the command line: `serve` starts the chat API, `chat` answers one prompt in the terminal."""

import argparse
import logging

import uvicorn

from tutorial_api.app import create_app
from tutorial_api.chat import chat
from tutorial_api.models import PRESETS, load_model
from tutorial_api.settings import Settings


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def _serve(args) -> None:
    print(f"Loading {args.model}, then serving on http://{args.host}:{args.port} "
          f"(interactive docs at /docs). Press Ctrl+C to stop.", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("Listening on %s: every machine that can reach this one can use the API.", args.host)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port)


def _chat(args) -> None:
    model, tokenizer = load_model(args.model)
    response, _ = chat(model, tokenizer, args.prompt, temperature=args.temperature, max_length=args.max_length,
                       system=args.system)
    print(response)


def _parser() -> argparse.ArgumentParser:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m tutorial_api", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    model_help = f"a preset ({', '.join(PRESETS)}), a hub id or a local folder (default: {settings.model})"

    serve = commands.add_parser("serve", help="start the chat API")
    serve.add_argument("--model", default=settings.model, help=model_help)
    serve.add_argument("--host", default=settings.host,
                       help=f"address to listen on (default {settings.host}: this machine only; "
                            "0.0.0.0 shares it on the network)")
    serve.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    serve.set_defaults(run=_serve)

    one_off = commands.add_parser("chat", help="answer one prompt in the terminal")
    one_off.add_argument("prompt")
    one_off.add_argument("--model", default=settings.model, help=model_help)
    one_off.add_argument("--temperature", type=float, default=0, help="0 for greedy decoding (default)")
    one_off.add_argument("--max-length", type=int, default=None, help="total token budget, prompt included")
    one_off.add_argument("--system", default=None, help="a system message")
    one_off.set_defaults(run=_chat)
    return parser
