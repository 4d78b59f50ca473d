"""Run an app with uvicorn on a background thread, so that a notebook cell can start and stop it."""

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from tutorial_api.settings import DEFAULT_HOST, DEFAULT_PORT

# Servers this process started, by name (else by port): a cell run again stops its old server.
_running: dict[str | int, "RunningServer"] = {}


class PortInUse(OSError):
    """Another process already listens on the port."""


@dataclass
class RunningServer:
    """A uvicorn server on a daemon thread; `stop()` shuts it down and frees the port."""

    url: str
    port: int
    _server: uvicorn.Server
    _thread: threading.Thread
    _key: str | int

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down, waiting up to `timeout` seconds, and free its port."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if _running.get(self._key) is self:
            del _running[self._key]

    @property
    def running(self) -> bool:
        """Tell whether the server is up and accepting connections."""
        return self._thread.is_alive() and self._server.started


def network_address() -> str:
    """Return this machine's address as other machines reach it; 127.0.0.1 without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Picks the interface a packet would leave by; UDP sends nothing.
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def start_server(
    app,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    name: str | None = None,
    log_level: str = "info",
    startup_timeout: float = 300,
) -> RunningServer:
    """Serve `app` on a daemon thread; return once it accepts connections (port 0 picks a free one).

    Starting again with the same `name` (or, unnamed, the same port) stops the earlier server first.
    """
    key = name or port
    if key in _running:
        _running.pop(key).stop()
    listener = bind(host, port)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            listener.close()
            raise RuntimeError(f"The server on port {port} did not start; the log above says why.")
        time.sleep(0.05)
    display_host = f"[{host}]" if ":" in host else host
    handle = RunningServer(f"http://{display_host}:{port}", port, server, thread, key)
    if key:  # port 0 without a name: nothing to recognise on a re-run
        _running[key] = handle
    return handle


def listening(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> bool:
    """Tell whether some program (this one or another) already accepts connections on the port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def bind(
    host: str, port: int, *, another_port: str = "start_server(app, port={})"
) -> socket.socket:
    """Return a socket bound to the port; raise PortInUse at once, in the caller's thread, if busy.

    PortInUse's message suggests `another_port` filled with the next port number, in the caller's
    own words.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    # Not elsewhere: on Windows SO_REUSEADDR would let two servers share one busy port.
    if os.name == "posix":
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUse(
                errno.EADDRINUSE,
                f"Port {port} on {host} is already in use by another program. Stop that program, "
                f"or pick another port: {another_port.format(port + 1)}.",
            ) from None
        raise
    listener.set_inheritable(True)
    return listener
