"""The command line: `serve` starts the chat API, `chat` answers one prompt in the terminal,
`download` fetches a model once so that it loads offline, `keys` makes a class's API keys."""

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import fields

import uvicorn

# torch, transformers and the app are imported inside the commands that use them: a busy port or a
# bad setting is then reported at once, not after seconds of imports.
from tutorial_api.class_keys import class_keys, student_sheet, write_key_file
from tutorial_api.server import PortInUse, bind, network_address
from tutorial_api.settings import DEFAULT_MODEL, DEFAULT_PORT, Settings, SettingsError


def main(argv=None) -> None:
    """Run the command that `argv` (default: the command line's arguments) names."""
    args = _parser().parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    # With --upstream: one log line per request, the kit's, not httpx's too.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.run(args)
    except SettingsError as error:
        sys.exit(f"Cannot start: {error}")


def _serve(args) -> None:
    """Start the chat API and serve until Ctrl+C; refuse at once what cannot work."""
    settings = _settings_from(args)
    try:
        # Bound first, so that a busy port fails before the model loads.
        listener = bind(settings.host, settings.port, another_port="--port {}")
    except PortInUse as error:
        sys.exit(f"Cannot start: {error.strerror}")
    except OSError as error:
        sys.exit(
            f"Cannot start: cannot listen on {settings.host}:{settings.port} (--host, --port): "
            f"{error.strerror}"
        )
    port = listener.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    if settings.upstream:
        print(f"Answering through {settings.upstream}", flush=True)
    else:
        from tutorial_api.models import ModelNotAvailable, check_reachable

        try:
            # A model that needs the hub fails now, not after the server starts.
            check_reachable(settings.model)
        except ModelNotAvailable as error:
            sys.exit(f"Cannot start: {error}")
        print(f"Loading {settings.model} ...", flush=True)
    from tutorial_api.web.app import create_app

    try:
        app = create_app(settings=settings)
    except (OSError, ValueError) as error:  # an unreadable key file, an empty key
        sys.exit(f"Cannot start: {error}")
    if not settings.loopback_only:
        _warn_about_sharing(settings.host, len(app.state.keys))
    # No access log: the kit logs requests itself.
    config = uvicorn.Config(app, host=settings.host, port=port, access_log=False)
    server = _AnnouncingServer(
        config, f"Serving on {url} (interactive docs at {url}/docs). Press Ctrl+C to stop."
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C, after uvicorn's graceful shutdown
        server.run(sockets=[listener])


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints where it serves once the model is loaded and it answers."""

    def __init__(self, config: uvicorn.Config, announcement: str):
        super().__init__(config)
        self.announcement = announcement

    async def startup(self, sockets=None) -> None:
        """Start as uvicorn does, then print the announcement if the server is up."""
        await super().startup(sockets)
        if self.started:
            print(self.announcement, flush=True)


def _warn_about_sharing(host: str, keys: int) -> None:
    """Log a note when keys guard a shared server, and a loud warning when nothing does."""
    if keys:
        logging.warning(
            "Listening on %s: every machine that can reach this one can call the API "
            "with one of its %d keys.",
            host,
            keys,
        )
        return
    logging.warning(
        "\n%s\nLISTENING ON %s WITHOUT ANY API KEY: every machine that can reach this one can use "
        "the API, and this computer with it.\nGive each student a key: --api-key NAME:KEY "
        "(repeatable) or --api-key-file FILE.\n%s",
        "!" * 78,
        host,
        "!" * 78,
    )


def _chat(args) -> None:
    """Answer one prompt in the terminal."""
    from tutorial_api.conversation import chat
    from tutorial_api.models import load_model

    model, tokenizer = load_model(args.model)
    response, _ = chat(
        model,
        tokenizer,
        args.prompt,
        temperature=args.temperature,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
    )
    print(response)


def _keys(args) -> None:
    """Write a class's API keys to a key file, and print the sheet to hand out."""
    try:
        keys = class_keys(args.count, args.prefix)
        write_key_file(args.file, keys, overwrite=args.force)
    except FileExistsError:
        sys.exit(
            f"{args.file} already exists, and students may hold its keys: pick another --file, "
            f"or pass --force to replace it."
        )
    except (OSError, ValueError) as error:
        sys.exit(f"Cannot make the keys: {error}")
    url = args.url or f"http://{network_address()}:{DEFAULT_PORT}"
    print(
        f"Wrote {len(keys)} keys to {args.file}. Serve the class with\n"
        f"    python -m tutorial_api serve --host 0.0.0.0 --api-key-file {args.file}\n"
        f"and hand each student their line (name, server address, key), or print one slip\n"
        f"each, with a QR code of their own link, from {url}/sheet (a key named\n"
        f"'... (teacher)' in the file opens it):",
        file=sys.stderr,
    )
    print("\n".join(student_sheet(keys, url)))


def _download(args) -> None:
    """Download a model once, and say how to load it offline."""
    from tutorial_api.download import DownloadFailed, fetch
    from tutorial_api.models import ModelNotAvailable, hub_id, needs_remote_code

    try:
        repository = hub_id(args.model)
        print(
            f"Downloading {repository} "
            f"(the Hugging Face hub, or the mirror in $HF_ENDPOINT; else ModelScope)",
            flush=True,
        )
        folder = fetch(repository)
    except (ModelNotAvailable, DownloadFailed) as error:
        sys.exit(str(error))
    opt_in = " --trust-remote-code" if needs_remote_code(repository) else ""
    print(
        f"Saved in {folder}. It now loads offline, for example:\n"
        f"  python -m tutorial_api serve --model {args.model}{opt_in}\n"
        f"  TUTORIAL_API_MODEL={args.model} jupyter lab notebooks/"
    )


def _settings_from(args) -> Settings:
    """Return the environment's settings, overridden by the flags given on the command line."""
    given = {setting.name: getattr(args, setting.name) for setting in fields(Settings)}
    return Settings(**{name: value for name, value in given.items() if value is not None})


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, documented with its environment variable and current value."""
    for setting in fields(Settings):
        about = setting.metadata
        help_text = f"{about['help']} (${about['env']}; now: {_current(setting)})"
        if setting.type is bool:  # --flag and --no-flag
            parser.add_argument(
                about["flag"],
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        parser.add_argument(
            about["flag"],
            dest=setting.name,
            metavar=about["flag"][2:].upper().replace("-", "_"),
            type=about["parse"],
            default=None,
            action="append" if about["many"] else "store",
            help=help_text,
        )


def _current(setting) -> str:
    """Show a setting's value in this environment, for --help; never a key, only their count.

    A bad value is shown as it is, so that --help works whatever the environment says.
    """
    try:
        value = setting.default_factory()
    except SettingsError:
        return f"{os.environ[setting.metadata['env']].strip()!r}, which is not valid"
    if setting.metadata["secret"]:
        return "none" if not value else f"{len(value)} keys" if setting.metadata["many"] else "set"
    shown = ", ".join(map(str, value)) if setting.metadata["many"] else value
    return "none" if shown in (None, "") else str(shown)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help can end with the model presets.

    They are looked up only when help is shown: they live beside torch.
    """

    def __init__(self, *args, list_presets: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.list_presets = list_presets

    def format_help(self) -> str:
        """Return the help, with the model presets as its epilog where asked for."""
        if self.list_presets:
            from tutorial_api.models import PRESETS

            self.epilog = f"model presets: {', '.join(PRESETS)}"
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    """Build the parser: one subcommand each for serve, chat, download and keys."""
    parser = _Parser(prog="python -m tutorial_api", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the chat API", list_presets=True)
    _add_settings(serve)
    serve.set_defaults(run=_serve)

    one_off = commands.add_parser(
        "chat", help="answer one prompt in the terminal", list_presets=True
    )
    one_off.add_argument("prompt")
    one_off.add_argument(
        "--model",
        help="a preset (listed below), a hub id or a local folder "
        f"(default: $TUTORIAL_API_MODEL, else {DEFAULT_MODEL})",
    )
    one_off.add_argument(
        "--temperature", type=float, default=0, help="0 for greedy decoding (default)"
    )
    one_off.add_argument(
        "--max-length", type=int, default=None, help="total token budget, prompt included"
    )
    one_off.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="most tokens the answer may have (default: $TUTORIAL_API_ANSWER_TOKENS, else 512, "
        "as on POST /)",
    )
    one_off.add_argument("--system", default=None, help="a system message")
    one_off.set_defaults(run=_chat)

    fetcher = commands.add_parser(
        "download",
        help="fetch a model once, with internet, so that it loads offline",
        list_presets=True,
    )
    fetcher.add_argument(
        "model", help="a preset (listed below) or a hub id, e.g. qwen2.5-0.5b-instruct"
    )
    fetcher.set_defaults(run=_download)

    keys = commands.add_parser(
        "keys", help="write a class's API keys to a key file and print the student sheet"
    )
    keys.add_argument("count", type=int, help="how many keys: one per student or group")
    keys.add_argument(
        "--prefix",
        default="student",
        help="the keys' names: PREFIX01, PREFIX02 ... (default: student)",
    )
    keys.add_argument(
        "--file", default="class-keys.txt", help="the key file to write (default: class-keys.txt)"
    )
    keys.add_argument("--force", action="store_true", help="replace the key file if it exists")
    keys.add_argument(
        "--url",
        default=None,
        help="the server's address as students type it, e.g. http://192.168.1.23:6006 (default: "
        "this machine's address on its network, port 6006)",
    )
    keys.set_defaults(run=_keys)
    return parser
