"""Rehearse a class: students ask the chat API for a while; check that nothing is lost or leaks.

    python benchmarks/soak.py                                   # SmolLM2 here: 32 students, 60 s
    python benchmarks/soak.py --model tiny-qwen2 --duration 10  # a quick dry run
    python benchmarks/soak.py --url http://192.168.1.23:6006 --api-key-file class-keys.txt \\
        --clients 30
    python benchmarks/soak.py --table --duration 20 > capacity.md

Without --url the script starts the server in its own process, on a free loopback port, with one API
key per student and the classroom limits. With --url it rehearses against a server already running
(the class's own, started as the runbook says), with the keys given by --api-key or --api-key-file.

Each student sends, one after another, a rotating mix: both APIs, streaming and not, bad inputs that
must be refused with a 4xx, a wrong key, and requests it abandons mid-answer. The summary gives
requests answered and refused (and why), the latency of full answers (p50, p95) and tokens per
second. It exits 1 if a request failed (lost, malformed, a server error) or a student was turned
away for lack of capacity (503, 504); for a server it started, also if its memory (RSS) grew by 10%
or more or it gained threads, read from /proc/PID after a warm-up at full load.

--table measures the runbook's capacity table instead: for each class size (--class-sizes), the
share of the class asking at the same moment (--asking, in percent), each student asking a chat
completion again as soon as the last one is answered, for --duration seconds a row. It prints the
table as markdown on stdout, progress on stderr. Every loop is bounded by --duration and each
request by a timeout.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import requests
from serve_benchmark import percentile, served

PROMPTS = [
    "Name three fruits.",
    "你好",
    "Tell me a short story about a cat.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "给这个故事起一个标题",
    "Explain what an API is to a ten-year-old.",
]
REQUEST_TIMEOUT = 300
# Answers the server gives to the bad requests below: refused, never served, never a 5xx.
REJECTED = {401, 400, 422}
# Answers that turn a good request away, and what each means for the class.
TURNED_AWAY = {
    401: "a key the server does not know",
    429: "one key had more in flight than --max-concurrent-per-key",
    503: "the server's queue was full (--max-waiting)",
    504: "no answer within --request-timeout",
}


def main(argv=None) -> None:
    args = parse_args(argv)
    with server_for(args) as (url, pid, keys):
        model = check_server(url, keys[0])
        passed = (
            capacity_table(url, keys, model, args)
            if args.table
            else soak(url, pid, keys, model, args)
        )
    sys.exit(0 if passed else 1)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the options; `keys` holds --url's keys, or [None] for a server without."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        type=server_url,
        help="a server already running, e.g. http://192.168.1.23:6006 (default: start one here)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a key of the server at --url, KEY or NAME:KEY (repeatable); students take turns",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="the class's key file for --url, as `python -m tutorial_api keys` writes it",
    )
    parser.add_argument(
        "--model", help="the model of the server this script starts (default: the kit's default)"
    )
    parser.add_argument(
        "--new-tokens",
        type=positive(int),
        help="the --max-new-tokens of the server this script starts (default: 64)",
    )
    parser.add_argument(
        "--clients", type=positive(int), help="students asking at the same time (default: 32)"
    )
    parser.add_argument(
        "--duration",
        type=positive(float),
        default=60,
        help="seconds of load, for each row with --table (default: 60)",
    )
    parser.add_argument(
        "--table", action="store_true", help="measure the capacity table, printed as markdown"
    )
    parser.add_argument(
        "--class-sizes",
        type=positive(int),
        nargs="+",
        metavar="STUDENTS",
        help="with --table: the class sizes, one group of rows each (default: 10 30 60)",
    )
    parser.add_argument(
        "--asking",
        type=percent,
        nargs="+",
        metavar="PERCENT",
        help="with --table: the share of the class asking at the same moment (default: 25 50 100)",
    )
    args = parser.parse_args(argv)
    if args.url and (args.model or args.new_tokens):
        parser.error(
            "--model and --new-tokens set up the server this script starts; "
            "with --url the server's own settings apply"
        )
    if not args.url and (args.api_key or args.api_key_file):
        parser.error(
            "--api-key and --api-key-file are for a server given with --url; "
            "the server this script starts makes its own keys"
        )
    if args.table and args.clients:
        parser.error(
            "--clients is for the soak; with --table, --class-sizes and --asking set how many ask"
        )
    if not args.table and (args.class_sizes or args.asking):
        parser.error("--class-sizes and --asking are for --table")
    args.clients = args.clients or 32
    args.new_tokens = args.new_tokens or 64
    args.class_sizes = args.class_sizes or [10, 30, 60]
    args.asking = args.asking or [25, 50, 100]
    try:
        args.keys = given_keys(args.api_key, args.api_key_file) or [None]
    except (OSError, ValueError) as error:
        parser.error(
            f"--api-key-file: {error}" if isinstance(error, OSError) else f"--api-key: {error}"
        )
    return args


def server_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole address: write it as http://192.168.1.23:6006"
        )
    return text.rstrip("/")


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage above 0 and at most 100")
    return value


def given_keys(entries: list[str], key_file: Path | None) -> list[str]:
    """Return the secrets of --api-key and of the key file, read as the server reads them."""
    from tutorial_api.web.access import parse_keys, read_key_file

    return [
        key.secret for key in parse_keys([*entries, *(read_key_file(key_file) if key_file else [])])
    ]


@contextlib.contextmanager
def server_for(args):
    """Yield the server to load, with its process id (None for --url) and the students' keys."""
    if args.url:
        yield args.url, None, args.keys
        return
    from tutorial_api.class_keys import class_keys, write_key_file

    students = max(args.class_sizes) if args.table else args.clients
    keys = class_keys(students)
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "class-keys.txt"
        write_key_file(key_file, keys)
        command = [
            sys.executable,
            "-m",
            "tutorial_api",
            "serve",
            *(["--model", args.model] if args.model else []),
            "--api-key-file",
            str(key_file),
            "--max-new-tokens",
            str(args.new_tokens),
            "--max-concurrent-per-key",
            "4",
            "--request-timeout",
            "120",
        ]
        with served(command) as (url, pid):
            yield url, pid, [key.secret for key in keys]


def check_server(url: str, key: str | None) -> str:
    """Return the server's model once it is up and the key opens the API; else exit, saying why."""
    try:
        health = requests.get(f"{url}/health", timeout=10)
        health.raise_for_status()
        models = requests.get(f"{url}/v1/models", headers=headers(key), timeout=10)
    except requests.RequestException as error:
        sys.exit(
            f"Cannot reach {url}: {error}\nIs the server running there, on that port, "
            "and does the firewall let it through? (docs/workshop.md, the network checklist)"
        )
    if models.status_code == 401:
        sys.exit(
            f"{url} refused the key ({models.json()['error']['message']}): "
            "give one of its keys with --api-key or --api-key-file."
        )
    return health.json()["model"]


class Result:
    """How one request ended.

    `kind` is answered, refused, rejected (a bad request, as it should be), dropped (on purpose) or
    failed; `tokens` counts the answer's tokens where the API reports them.
    """

    def __init__(
        self,
        scenario: str,
        kind: str,
        status: int | None = None,
        seconds: float = 0.0,
        tokens: int | None = None,
        why: str = "",
    ):
        self.scenario, self.kind, self.status, self.seconds, self.tokens, self.why = (
            scenario,
            kind,
            status,
            seconds,
            tokens,
            why,
        )


def headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def tutorial(url, key):
    """Send POST / with history; the answer must carry the four fields."""
    body = {"prompt": PROMPTS[0], "history": [["你好", "你好！"]], "temperature": 0.7}
    answer = requests.post(url, json=body, headers=headers(key), timeout=REQUEST_TIMEOUT)
    ok = answer.status_code == 200 and set(answer.json()) == {
        "response",
        "history",
        "status",
        "time",
    }
    return answer.status_code, ok, None


def completion(url, key):
    """Ask a chat completion on one of the prompts; the answer must have one choice and usage."""
    body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}], "temperature": 0.7}
    answer = requests.post(
        f"{url}/v1/chat/completions", json=body, headers=headers(key), timeout=REQUEST_TIMEOUT
    )
    if answer.status_code != 200:
        return answer.status_code, False, None
    body = answer.json()
    return (
        200,
        len(body["choices"]) == 1 and body["usage"]["total_tokens"] > 0,
        body["usage"]["completion_tokens"],
    )


def stream(url, key):
    """Stream a completion; it must end with [DONE] and carry usage."""
    body = {
        "messages": [{"role": "user", "content": PROMPTS[2]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers=headers(key),
        stream=True,
        timeout=REQUEST_TIMEOUT,
    ) as answer:
        events = [
            line[6:] for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ]
    if answer.status_code != 200 or events[-1:] != ["[DONE]"] or len(events) < 2:
        return answer.status_code, False, None
    usage = json.loads(events[-2]).get("usage")
    return 200, usage is not None, usage and usage["completion_tokens"]


def hang_up_mid_stream(url, key):
    """Stream a completion and abandon it after its first pieces."""
    body = {"messages": [{"role": "user", "content": PROMPTS[3]}], "stream": True}
    with requests.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers=headers(key),
        stream=True,
        timeout=REQUEST_TIMEOUT,
    ) as answer:
        if answer.status_code != 200:
            return answer.status_code, False, None
        lines = answer.iter_lines()
        next(lines), next(lines)
    return 200, None, None


def hang_up_while_waiting(url, key):
    """Ask for a whole answer and abandon the request before it comes."""
    try:
        answer = requests.post(url, json={"prompt": PROMPTS[4]}, headers=headers(key), timeout=0.2)
    except requests.Timeout:
        return None, None, None
    return (
        answer.status_code,
        None if answer.status_code == 200 else False,
        None,
    )  # answered in time: fine too


def bad_input(url, key):
    """Send requests the server must refuse, each in its API's error shape; a wrong key too."""
    statuses = [
        requests.post(url, json={"prompt": ""}, headers=headers(key), timeout=30).status_code,
        requests.post(
            f"{url}/v1/chat/completions", json={"messages": []}, headers=headers(key), timeout=30
        ).status_code,
        requests.post(
            url,
            data="{not json",
            headers={**headers(key), "Content-Type": "application/json"},
            timeout=30,
        ).status_code,
    ]
    if key:
        statuses.append(
            requests.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers=headers("not-a-key"),
                timeout=30,
            ).status_code
        )
    unexpected = [status for status in statuses if status not in REJECTED]
    return (unexpected or statuses)[0], not unexpected, None


SCENARIOS = [
    tutorial,
    completion,
    stream,
    hang_up_mid_stream,
    completion,
    bad_input,
    stream,
    hang_up_while_waiting,
]


def run(scenario, url: str, key: str | None) -> Result:
    started = time.perf_counter()
    try:
        status, ok, tokens = scenario(url, key)
    except (requests.RequestException, ValueError, IndexError, KeyError, StopIteration) as error:
        return Result(scenario.__name__, "failed", why=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - started
    if scenario is bad_input and ok:
        return Result(scenario.__name__, "rejected", status, seconds)
    if status in TURNED_AWAY:
        return Result(scenario.__name__, "refused", status, seconds)
    if status is not None and status >= 500:
        return Result(scenario.__name__, "failed", status, seconds, why=f"server error {status}")
    if ok is None:
        return Result(scenario.__name__, "dropped", status, seconds)
    if not ok:
        why = (
            f"a bad request got {status}"
            if scenario is bad_input
            else f"unexpected or malformed answer ({status})"
        )
        return Result(scenario.__name__, "failed", status, seconds, why=why)
    return Result(scenario.__name__, "answered", status, seconds, tokens)


def load(
    url: str, keys: list, clients: int, seconds: float, scenarios
) -> tuple[list[Result], float]:
    """Run `clients` students through the scenarios until time is up; return results and seconds.

    Each student has the next key and starts at its own place in the rotation; the seconds are those
    until the last answer came.
    """
    results: list[Result] = []
    deadline = time.monotonic() + seconds

    def client(index: int):
        for scenario in itertools.islice(itertools.cycle(scenarios), index, None):
            if time.monotonic() >= deadline:
                return
            results.append(run(scenario, url, keys[index % len(keys)]))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def wait_until_idle(url: str, seconds: float = 30) -> None:
    """Wait until every abandoned generation has left the engine."""
    deadline = time.monotonic() + seconds
    while (
        requests.get(f"{url}/health", timeout=10).json()["active_requests"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    time.sleep(1)


def warm_up(url: str, keys: list, clients: int, seconds: float, scenarios) -> None:
    """Run a short load, not counted: the first full batches allocate what later ones reuse."""
    print(f"warming up: {clients} students for {seconds:.0f} s", file=sys.stderr, flush=True)
    load(url, keys, clients, seconds, scenarios)
    wait_until_idle(url)


def soak(url: str, pid: int | None, keys: list, model: str, args) -> bool:
    """Rehearse: send the mix of requests, print a summary; return whether the checks passed."""
    if args.clients > len(keys) > 1:
        print(
            f"note: {args.clients} students share {len(keys)} keys, "
            "so a key's --max-concurrent-per-key may refuse some with 429",
            file=sys.stderr,
        )
    warm_up(url, keys, args.clients, args.duration / 6, SCENARIOS)
    before = process_status(pid) if pid else None
    results, elapsed = load(url, keys, args.clients, args.duration, SCENARIOS)
    wait_until_idle(url)
    after = process_status(pid) if pid else None
    print(f"{args.clients} students for {args.duration:g} s against {url} ({model}):")
    return report(results, elapsed, before, after)


def summary(results: list[Result], elapsed: float) -> dict:
    """Return counts by kind and refusal status, full answers' latency, and tokens per second."""
    answered = [result for result in results if result.kind == "answered"]
    latencies = [result.seconds for result in answered]
    return {
        "kinds": Counter(result.kind for result in results),
        "refusals": Counter(result.status for result in results if result.kind == "refused"),
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "tokens_per_s": sum(result.tokens or 0 for result in answered) / elapsed,
    }


def report(results: list[Result], elapsed: float, before: dict | None, after: dict | None) -> bool:
    figures = summary(results, elapsed)
    kinds = figures["kinds"]
    latency = f"latency p50 {seconds(figures['p50'])}, p95 {seconds(figures['p95'])}"
    print(
        f"  answered   {kinds['answered']:5}   {latency}; {figures['tokens_per_s']:.1f} tokens/s "
        "(counted on /v1: POST / does not report its tokens)"
    )
    print(f"  refused    {kinds['refused']:5}")
    for status, count in sorted(figures["refusals"].items()):
        print(f"    {status} x{count}: {TURNED_AWAY[status]}")
    print(
        f"  rejected   {kinds['rejected']:5}   bad requests answered with a 4xx, as they should be"
    )
    print(
        f"  abandoned  {kinds['dropped']:5}   on purpose, by the student, before the answer ended"
    )
    print(f"  failed     {kinds['failed']:5}")
    for why, count in Counter(
        result.why for result in results if result.kind == "failed"
    ).most_common(10):
        print(f"    x{count}: {why}")
    print(
        "  per scenario: "
        + ", ".join(
            f"{name} {count}"
            for name, count in sorted(Counter(result.scenario for result in results).items())
        )
    )
    checks = {
        "no request lost, malformed or answered with a server error": kinds["failed"] == 0,
        "no student turned away for lack of capacity (503, 504)": not {503, 504}
        & set(figures["refusals"]),
    }
    if before and after:
        growth = after["rss_mb"] / before["rss_mb"] - 1
        print(
            f"  server RSS {before['rss_mb']:.0f} MB -> {after['rss_mb']:.0f} MB ({growth:+.1%}); "
            f"threads {before['threads']} -> {after['threads']}"
        )
        checks.update(
            {
                "RSS grew under 10%": growth < 0.10,
                "no new threads": after["threads"] <= before["threads"],
            }
        )
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return all(checks.values())


def capacity_table(url: str, keys: list, model: str, args) -> bool:
    """Print the capacity table as markdown on stdout; return whether no request failed."""
    rows, failed = [], 0
    warm_up(url, keys, min(16, max(args.class_sizes)), args.duration / 4, [completion])
    for students in args.class_sizes:
        for share in args.asking:
            asking = math.ceil(students * share / 100)
            results, elapsed = load(url, keys, asking, args.duration, [completion])
            wait_until_idle(url)
            figures = summary(results, elapsed)
            kinds = figures["kinds"]
            failed += kinds["failed"]
            statuses = ", ".join(
                f"{count}x {status}" for status, count in sorted(figures["refusals"].items())
            )
            turned_away = f"{kinds['refused']} ({statuses})" if statuses else "0"
            cells = [
                students,
                asking,
                kinds["answered"],
                turned_away,
                kinds["failed"],
                seconds(figures["p50"]),
                seconds(figures["p95"]),
                f"{figures['tokens_per_s']:.1f}",
                f"{figures['tokens_per_s'] / asking:.1f}",
            ]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    where = (
        f"the server at {url}, answers up to its --max-new-tokens"
        if args.url
        else f"a server this script started, {os.cpu_count()} CPU cores, "
        f"answers up to {args.new_tokens} tokens"
        + (
            f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
            if "OMP_WAIT_POLICY" in os.environ
            else ""
        )
    )
    server = f"--url {url}" if args.url else f"--model {model} --new-tokens {args.new_tokens}"
    class_sizes = " ".join(map(str, args.class_sizes))
    asking_shares = " ".join(f"{share:g}" for share in args.asking)
    command = (
        f"python benchmarks/soak.py --table {server} --duration {args.duration:g} "
        f"--class-sizes {class_sizes} --asking {asking_shares}"
    )
    print(
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}`: {model}, {where}, "
        f"{args.duration:g} s a row.\n"
    )
    print(
        "| students | asking at once | answered | turned away | failed | latency p50 | latency p95 "
        "| tokens/s, class | tokens/s, each asking |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return failed == 0


def seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f} s"


def process_status(pid: int) -> dict:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


if __name__ == "__main__":
    main()
