import re
import socket
import time

import pytest
from jupyter_client.manager import start_new_kernel


class Kernel:
    """a real IPython kernel from this environment, driven cell by cell."""

    def __init__(self):
        self.manager, self.client = start_new_kernel(kernel_name="python3")

    def run(self, code: str, timeout: float = 60) -> str:
        """run one cell; return what it printed, or raise with the kernel's error."""
        printed = []

        def collect(message):
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=collect)
        if reply["content"]["status"] != "ok":
            traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["content"]["traceback"]))
            raise AssertionError(f"the cell failed in the kernel:\n{traceback}")
        return "".join(printed).strip()

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel():
    kernel = Kernel()
    kernel.run(
        "import requests\n"
        "from tutorial_api import start_server, PortInUse\n"
        "from tutorial_api.hello import app"
    )
    yield kernel
    kernel.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_uvicorn_run_fails_in_a_kernel_but_start_server_works():
    """uvicorn.run fails in a kernel, and start_server is the way.

    In a kernel of its own: the failed call leaves unawaited coroutines whose warning, if the
    garbage collector meets them inside a later import, can break that import (a Python 3.11
    import-lock bug).
    """
    kernel = Kernel()
    try:
        kernel.run("from tutorial_api import start_server\nfrom tutorial_api.hello import app")
        with pytest.raises(AssertionError, match="RuntimeError"):
            kernel.run("import uvicorn\nuvicorn.run(app, port=0)")
        kernel.run("server = start_server(app, port=0, log_level='warning')\nserver.stop()")
    finally:
        kernel.close()


def test_start_rerun_and_stop_in_a_kernel(kernel):
    port = free_port()
    start = f"server = start_server(app, port={port}, log_level='warning')\nprint(server.url)"
    assert kernel.run(start) == f"http://127.0.0.1:{port}"
    assert kernel.run("print(requests.get(server.url).json())") == "{'Hello': 'World'}"
    kernel.run("first = server")
    assert kernel.run(start) == f"http://127.0.0.1:{port}"
    assert kernel.run("print(first.running, server.running)") == "False True"
    assert (
        kernel.run("print(requests.get(server.url + '/items/5?q=somequery').json())")
        == "{'item_id': 5, 'q': 'somequery'}"
    )
    kernel.run("server.stop()")
    assert port_is_free(port)
    assert (
        kernel.run(
            "import threading\n"
            "print([t.name for t in threading.enumerate() if t.name.startswith('uvicorn')])"
        )
        == "[]"
    )


def test_a_named_server_is_replaced_when_its_cell_runs_again(kernel):
    """Port 0 gives each run a new port; the name lets a re-run stop the server it replaces."""
    start = (
        "server = start_server(app, port=0, name='hello', log_level='warning')\nprint(server.port)"
    )
    first_port = int(kernel.run(start))
    kernel.run("first = server")
    second_port = int(kernel.run(start))
    assert kernel.run("print(first.running, server.running)") == "False True"
    assert port_is_free(first_port)
    assert kernel.run("print(requests.get(server.url).json())") == "{'Hello': 'World'}"
    kernel.run("server.stop()")
    assert port_is_free(second_port)


def test_listening_tells_a_busy_port_from_a_free_one(kernel):
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        busy = other_program.getsockname()[1]
        kernel.run("from tutorial_api.server import listening")
        assert kernel.run(f"print(listening({busy}), listening({free_port()}))") == "True False"


def test_a_port_held_by_another_process_fails_fast_and_clearly(kernel):
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(
            AssertionError, match=f"PortInUse: .*Port {port} on 127.0.0.1 is already in use"
        ):
            kernel.run(f"start_server(app, port={port})")
        assert time.monotonic() - started < 5


OPEN_SOCKETS = """
def open_sockets():
    targets = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            targets.append(os.readlink(f'/proc/self/fd/{fd}'))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return sum(target.startswith('socket:') for target in targets)
"""


@pytest.mark.slow
def test_ten_reruns_of_a_serving_cell_leak_nothing(kernel):
    """Ten reruns of a serving cell leak no thread, port or socket."""
    port = free_port()
    cell = (
        f"server = start_server(create_app('tiny-qwen2'), port={port}, log_level='warning')\n"
        "print(requests.post(server.url, json={'prompt': 'hi', 'max_length': 40}).status_code)"
    )
    # One run first loads what later runs reuse; gc.collect() lets earlier tests' leftovers go (and
    # warn) now.
    kernel.run(
        "import gc, os, threading\n"
        f"from tutorial_api import create_app\n{cell}\nserver.stop()\ngc.collect()"
    )
    kernel.run(OPEN_SOCKETS)
    threads_and_sockets = "print(sorted(t.name for t in threading.enumerate()), open_sockets())"
    before = kernel.run(threads_and_sockets)
    for _ in range(10):
        assert kernel.run(cell) == "200"
    kernel.run("server.stop()")
    assert port_is_free(port)
    assert kernel.run(threads_and_sockets) == before
