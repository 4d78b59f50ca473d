"""running an app with uvicorn on a background thread, so a notebook cell can start and stop it."""

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from tutorial_api.settings import DEFAULT_HOST, DEFAULT_PORT

# Servers this process started, by name (or by port when unnamed): running a cell again stops the old server first.
_running: dict[str | int, "RunningServer"] = {}


class PortInUse(OSError):
    """another process already listens on the port."""


@dataclass
class RunningServer:
    """a uvicorn server on a daemon thread; `stop()` shuts it down and frees the port."""

    url: str
    port: int
    _server: uvicorn.Server
    _thread: threading.Thread
    _key: str | int

    def stop(self, timeout: float = 10) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if _running.get(self._key) is self:
            del _running[self._key]

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._server.started


def network_address() -> str:
    """Return this machine's address on its local network, as other machines reach it; 127.0.0.1 without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # picks the interface a packet would leave by; UDP sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def start_server(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, name: str | None = None,
                 log_level: str = "info", startup_timeout: float = 300) -> RunningServer:
    """serve `app` on a daemon thread and return once it accepts connections (port 0 picks a free one).

    Starting again with the same `name` (or, unnamed, the same port) stops the earlier server first.
    """
    key = name or port
    if key in _running:
        _running.pop(key).stop()
    listener = bind(host, port)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True,
                              name=f"uvicorn-{port}")
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
    """whether some program (this one or another) already accepts connections on the port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def bind(host: str, port: int, *, another_port: str = "start_server(app, port={})") -> socket.socket:
    """a socket bound to the port, so a busy port fails at once, in the caller's thread, with PortInUse; its message
    suggests `another_port` filled with the next port number, in the caller's own words."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    if os.name == "posix":  # elsewhere (Windows) SO_REUSEADDR would let two servers share one busy port
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
