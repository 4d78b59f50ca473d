"""Soak the chat API like a class would: many students, each with a key, for a while; check nothing is lost or leaks.

    python benchmarks/soak.py                                   # SmolLM2, 32 clients, 60 s
    python benchmarks/soak.py --model tiny-qwen2 --seconds 10   # a quick dry run

The server runs in its own process, on a free loopback port, with one API key per client and the classroom limits.
Each client sends, one after another, a rotating mix: both APIs, streaming and not, bad inputs that must be refused
with a 4xx, a wrong key, and requests it abandons mid-answer. At the end it prints requests sent, answered and
failed, the latency of full answers, and the server's memory (RSS) and threads before and after, read from
/proc/PID after a warm-up at full load (a sixth of --seconds); it exits 1 unless there was no 5xx, no lost or malformed answer, RSS grew under 10% and threads did not
grow. Every loop is bounded by --seconds and each request by a timeout.
"""

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from serve_benchmark import percentile, served

PROMPTS = ["Name three fruits.", "你好", "Tell me a short story about a cat.", "What is 2 + 2?",
           "Write a haiku about the sea.", "给这个故事起一个标题"]
REQUEST_TIMEOUT = 120
# Answers the server gives to the bad requests below: refused, never served, never a 5xx.
REFUSED = {401, 400, 422}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--new-tokens", type=int, default=32, help="the server's max_new_tokens")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        keys = [f"student{n:02d}:soak-key-{n:02d}" for n in range(args.clients)]
        key_file = Path(folder) / "keys.txt"
        key_file.write_text("\n".join(keys) + "\n")
        command = [sys.executable, "-m", "tutorial_api", "serve", "--model", args.model, "--api-key-file",
                   str(key_file), "--max-new-tokens", str(args.new_tokens), "--max-concurrent-per-key", "4",
                   "--request-timeout", "60"]
        with served(command) as (url, pid):
            secrets = [key.split(":", 1)[1] for key in keys]
            idle = process_status(pid)
            # Warm-up at full load: the first full batches allocate what later ones reuse, so growth
            # measured from here on is what a leak would show.
            load(url, secrets, args.seconds / 6)
            wait_until_idle(url)
            before = process_status(pid)
            print(f"server RSS after loading {idle['rss_mb']:.0f} MB, after a {args.seconds / 6:.0f} s warm-up "
                  f"at full load {before['rss_mb']:.0f} MB")
            results = load(url, secrets, args.seconds)
            wait_until_idle(url)
            after = process_status(pid)
    sys.exit(0 if report(results, before, after) else 1)


class Result:
    """how one request ended: `kind` is answered, refused, dropped (on purpose) or failed."""

    def __init__(self, scenario: str, kind: str, status: int | None = None, seconds: float = 0.0, why: str = ""):
        self.scenario, self.kind, self.status, self.seconds, self.why = scenario, kind, status, seconds, why


def headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def tutorial(url, key):
    """POST / with history; the answer must carry the four fields."""
    body = {"prompt": PROMPTS[0], "history": [["你好", "你好！"]], "temperature": 0.7}
    answer = requests.post(url, json=body, headers=headers(key), timeout=REQUEST_TIMEOUT)
    ok = answer.status_code == 200 and set(answer.json()) == {"response", "history", "status", "time"}
    return answer.status_code, ok


def completion(url, key):
    """a chat completion; the answer must have one choice and usage."""
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 0.7}
    answer = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers(key), timeout=REQUEST_TIMEOUT)
    ok = answer.status_code == 200 and len(answer.json()["choices"]) == 1 and answer.json()["usage"]["total_tokens"]
    return answer.status_code, bool(ok)


def stream(url, key):
    """a streamed completion; it must end with [DONE] and carry usage."""
    body = {"messages": [{"role": "user", "content": PROMPTS[2]}], "stream": True,
            "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=headers(key), stream=True,
                       timeout=REQUEST_TIMEOUT) as answer:
        events = [line[6:] for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    ok = answer.status_code == 200 and events[-1:] == ["[DONE]"] and "usage" in json.loads(events[-2])
    return answer.status_code, ok


def hang_up_mid_stream(url, key):
    """a streamed completion abandoned after its first pieces."""
    body = {"messages": [{"role": "user", "content": PROMPTS[3]}], "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=headers(key), stream=True,
                       timeout=REQUEST_TIMEOUT) as answer:
        lines = answer.iter_lines()
        next(lines), next(lines)
    return answer.status_code, None


def hang_up_while_waiting(url, key):
    """a whole-answer request abandoned before the answer comes."""
    try:
        requests.post(url, json={"prompt": PROMPTS[4]}, headers=headers(key), timeout=0.2)
    except requests.Timeout:
        return None, None
    return 200, None  # answered before the client gave up: fine too


def bad_input(url, key):
    """requests the server must refuse, each in its API's error shape."""
    statuses = [requests.post(url, json={"prompt": ""}, headers=headers(key), timeout=30).status_code,
                requests.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=headers(key),
                              timeout=30).status_code,
                requests.post(url, data="{not json", headers={**headers(key), "Content-Type": "application/json"},
                              timeout=30).status_code,
                requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                              headers=headers("not-a-key"), timeout=30).status_code]
    return max(statuses), set(statuses) <= REFUSED


SCENARIOS = [tutorial, completion, stream, hang_up_mid_stream, completion, bad_input, stream, hang_up_while_waiting]


def run(scenario, url: str, key: str) -> Result:
    started = time.perf_counter()
    try:
        status, ok = scenario(url, key)
    except (requests.RequestException, ValueError, IndexError, KeyError, StopIteration) as error:
        return Result(scenario.__name__, "failed", why=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - started
    if status is not None and status >= 500:
        return Result(scenario.__name__, "failed", status, seconds, f"server error {status}")
    if ok is None:
        return Result(scenario.__name__, "dropped", status, seconds)
    if not ok:
        return Result(scenario.__name__, "failed", status, seconds, "unexpected or malformed answer")
    return Result(scenario.__name__, "refused" if scenario is bad_input else "answered", status, seconds)


def load(url: str, keys: list[str], seconds: float) -> list[Result]:
    """each client runs the scenarios in turn, from its own place in the rotation, until time is up."""
    results: list[Result] = []
    deadline = time.monotonic() + seconds

    def client(index: int):
        for scenario in itertools.islice(itertools.cycle(SCENARIOS), index, None):
            if time.monotonic() >= deadline:
                return
            results.append(run(scenario, url, keys[index]))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(keys))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def wait_until_idle(url: str, seconds: float = 30) -> None:
    """until every abandoned generation has left the engine."""
    deadline = time.monotonic() + seconds
    while requests.get(f"{url}/health", timeout=10).json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)


def process_status(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


def report(results: list[Result], before: dict, after: dict) -> bool:
    kinds = Counter(result.kind for result in results)
    server_errors = sum(1 for result in results if result.status and result.status >= 500)
    answered = [result.seconds for result in results if result.kind == "answered"]
    print(f"requests sent {len(results)}: answered {kinds['answered']}, refused as expected {kinds['refused']}, "
          f"abandoned on purpose {kinds['dropped']}, failed {kinds['failed']}")
    for scenario, count in sorted(Counter(result.scenario for result in results).items()):
        print(f"  {scenario:24} {count}")
    for why, count in Counter(result.why for result in results if result.kind == "failed").most_common(10):
        print(f"  failed {count}x: {why}")
    print(f"full answers: latency p50 {percentile(answered, 50):.2f} s, p95 {percentile(answered, 95):.2f} s")
    growth = after["rss_mb"] / before["rss_mb"] - 1
    print(f"server RSS {before['rss_mb']:.0f} MB -> {after['rss_mb']:.0f} MB ({growth:+.1%}); "
          f"threads {before['threads']} -> {after['threads']}")
    checks = {"no 5xx": server_errors == 0, "no lost or malformed answers": kinds["failed"] == 0,
              "RSS grew under 10%": growth < 0.10, "no new threads": after["threads"] <= before["threads"]}
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return all(checks.values())


if __name__ == "__main__":
    main()
