"""the command line: `serve` starts the chat API, `chat` answers one prompt in the terminal, `download` fetches a
model once so that it loads offline."""

import argparse
import logging
import sys
from dataclasses import fields

import uvicorn

from tutorial_api.app import create_app
from tutorial_api.chat import chat
from tutorial_api.download import DownloadFailed, fetch
from tutorial_api.models import PRESETS, ModelNotAvailable, hub_id, load_model, needs_remote_code
from tutorial_api.settings import Settings


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def _serve(args) -> None:
    settings = _settings_from(args)
    print(f"Loading {settings.model}, then serving on http://{settings.host}:{settings.port} "
          f"(interactive docs at /docs). Press Ctrl+C to stop.", flush=True)
    try:
        app = create_app(settings=settings)
    except (OSError, ValueError) as error:  # an unreadable key file, an empty key
        sys.exit(f"Cannot start: {error}")
    if not settings.loopback_only:
        _warn_about_sharing(settings.host, len(app.state.keys))
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False)  # the kit logs each request


def _warn_about_sharing(host: str, keys: int) -> None:
    """a note when keys guard a shared server; a loud warning when nothing does."""
    if keys:
        logging.warning("Listening on %s: every machine that can reach this one can call the API with one of its "
                        "%d keys.", host, keys)
        return
    logging.warning("\n%s\nLISTENING ON %s WITHOUT ANY API KEY: every machine that can reach this one can use the "
                    "API, and this computer with it.\nGive each student a key: --api-key NAME:KEY (repeatable) or "
                    "--api-key-file FILE.\n%s", "!" * 78, host, "!" * 78)


def _chat(args) -> None:
    model, tokenizer = load_model(args.model)
    response, _ = chat(model, tokenizer, args.prompt, temperature=args.temperature, max_length=args.max_length,
                       system=args.system)
    print(response)


def _download(args) -> None:
    try:
        repository = hub_id(args.model)
        print(f"Downloading {repository} (the Hugging Face hub, or the mirror in $HF_ENDPOINT; else ModelScope)",
              flush=True)
        folder = fetch(repository)
    except (ModelNotAvailable, DownloadFailed) as error:
        sys.exit(str(error))
    opt_in = " --trust-remote-code" if needs_remote_code(repository) else ""
    print(f"Saved in {folder}. It now loads offline, for example:\n"
          f"  python -m tutorial_api serve --model {args.model}{opt_in}\n"
          f"  TUTORIAL_API_MODEL={args.model} jupyter lab notebooks/")


def _settings_from(args) -> Settings:
    """the settings of the environment, with the flags given on the command line instead."""
    settings = Settings()
    for setting in fields(Settings):
        given = getattr(args, setting.name)
        if given is not None:
            setattr(settings, setting.name, tuple(given) if setting.metadata["many"] else given)
    return settings


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """one flag per setting, documented with its environment variable and its current value."""
    current = Settings()
    for setting in fields(Settings):
        about = setting.metadata
        value = getattr(current, setting.name)
        shown = ", ".join(map(str, value)) if about["many"] else value
        if setting.name == "api_keys":
            shown = f"{len(value)} keys" if value else None  # never print a key
        help_text = f"{about['help']} (${about['env']}; now: {'none' if shown in (None, '') else shown})"
        switch = {"nargs": "?", "const": True} if setting.type is bool else {}  # --flag alone means yes
        parser.add_argument(about["flag"], dest=setting.name, metavar=about["flag"][2:].upper().replace("-", "_"),
                            type=about["parse"], default=None,
                            action="append" if about["many"] else "store", help=help_text, **switch)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tutorial_api", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    presets = f"model presets: {', '.join(PRESETS)}"

    serve = commands.add_parser("serve", help="start the chat API", epilog=presets)
    _add_settings(serve)
    serve.set_defaults(run=_serve)

    one_off = commands.add_parser("chat", help="answer one prompt in the terminal", epilog=presets)
    one_off.add_argument("prompt")
    one_off.add_argument("--model", default=Settings().model,
                         help="a preset (listed below), a hub id or a local folder")
    one_off.add_argument("--temperature", type=float, default=0, help="0 for greedy decoding (default)")
    one_off.add_argument("--max-length", type=int, default=None, help="total token budget, prompt included")
    one_off.add_argument("--system", default=None, help="a system message")
    one_off.set_defaults(run=_chat)

    fetcher = commands.add_parser("download", help="fetch a model once, with internet, so that it loads offline",
                                  epilog=presets)
    fetcher.add_argument("model", help="a preset (listed below) or a hub id, e.g. qwen2.5-0.5b-instruct")
    fetcher.set_defaults(run=_download)
    return parser
