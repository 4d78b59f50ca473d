"""Measure the kit's server against raw `model.generate`, and against vLLM where it is installed.

Each dtype is measured, with one core kept busy by another process, and vLLM's CPU build as a peer.
With --upstream it measures the kit in front of vLLM (`serve --upstream`) against vLLM direct.

    python benchmarks/serve_benchmark.py                       # SmolLM2, 64 new tokens, greedy
    python benchmarks/serve_benchmark.py --model tiny-qwen2    # a quick dry run
    python benchmarks/serve_benchmark.py --vllm-python VENV/bin/python     # vLLM started here
    python benchmarks/serve_benchmark.py --vllm-url http://127.0.0.1:8000  # vLLM already running
    python benchmarks/serve_benchmark.py --upstream --vllm-python VENV/bin/python

Prints a table and writes benchmarks/results/serve_benchmark.png and .json
(serve_benchmark_upstream.json with --upstream). Each raw measurement runs in a fresh process, so
its peak memory is its own. Loopback only; every loop and the busy process are bounded.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

PROMPTS = [f"Write a short poem about the number {n}." for n in range(16)]
HERE = Path(__file__).parent
DTYPES = ("float32", "bfloat16")
BUSY_CONCURRENCY = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests each client sends, one after another"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--vllm-url", help="a running vLLM server's root URL")
    parser.add_argument(
        "--vllm-python",
        type=Path,
        help="the Python of a venv with vLLM: start its OpenAI server on the model",
    )
    parser.add_argument(
        "--upstream", action="store_true", help="measure the kit in front of vLLM instead"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="with --upstream: alternated runs of each pair"
    )
    parser.add_argument("--raw", nargs=2, metavar=("DTYPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        print(json.dumps(raw_generate(args.model, args.raw[0], int(args.raw[1]), args.new_tokens)))
        return
    if args.upstream:
        measure_upstream(args)
        return

    results = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "cpus": os.cpu_count(),
        "rows": {},
    }
    rows = results["rows"]
    for dtype in DTYPES:
        rows[f"raw generate, {dtype}"] = {
            batch: in_fresh_process(args, dtype, batch) for batch in args.concurrency
        }
    serve = [sys.executable, "-m", "tutorial_api", "serve", "--model", args.model]
    with served([*serve, "--dtype", "float32"]) as (url, _):
        rows["kit, float32"] = measure(url, args, args.concurrency)
    with served(serve) as (url, pid):
        auto = requests.get(f"{url}/health", timeout=10).json().get("dtype", "?")
        rows[f"kit, auto ({auto})"] = measure(url, args, args.concurrency)
        results["kit_peak_rss_mb"] = peak_rss_mb(pid)
        with one_core_busy():
            rows[f"kit, auto ({auto}), one core busy"] = measure(url, args, BUSY_CONCURRENCY)
    if args.vllm_url or args.vllm_python:
        with vllm_server(args) as url:
            model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            rows["vLLM CPU, bfloat16"] = measure(url, args, args.concurrency, model)
            with one_core_busy():
                rows["vLLM CPU, bfloat16, one core busy"] = measure(
                    url, args, BUSY_CONCURRENCY, model
                )
    else:
        print("vLLM: no --vllm-url or --vllm-python, skipped")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_benchmark.json").write_text(json.dumps(results, indent=1))
    report(results, args.concurrency)
    plot(results, args.out / "serve_benchmark.png")


def raw_generate(model_name: str, dtype: str, batch: int, new_tokens: int) -> dict:
    """Time one left-padded greedy `generate` call after a warm-up; return tokens/s and peak RSS."""
    import torch

    from tutorial_api import load_model
    from tutorial_api.conversation import build_messages

    model, tokenizer = load_model(model_name, dtype=dtype)
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(
            build_messages(p), add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in (PROMPTS * batch)[:batch]
    ]
    inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    options = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.inference_mode():
        model.generate(**inputs, **{**options, "max_new_tokens": 4, "min_new_tokens": 4})
        started = time.perf_counter()
        model.generate(**inputs, **options)
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": batch * new_tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_fresh_process(args, dtype: str, batch: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--new-tokens",
        str(args.new_tokens),
        "--raw",
        dtype,
        str(batch),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    print(f"raw generate, {dtype}, batch {batch}: {measured['tokens_per_s']:.1f} tok/s", flush=True)
    return measured


def measure(url: str, args, levels, model: str | None = None) -> dict:
    """Run `load` at each concurrency in `levels`, after one warm-up request."""
    model = model or args.model
    load(url, model, 1, 1, args.new_tokens)
    measured = {}
    for concurrency in levels:
        measured[concurrency] = load(url, model, concurrency, args.rounds, args.new_tokens)
        rate = measured[concurrency]["tokens_per_s"]
        first_token_ms = measured[concurrency]["first_token_p50_s"] * 1000
        print(
            f"{url}, concurrency {concurrency}: {rate:.1f} tok/s, "
            f"first token p50 {first_token_ms:.0f} ms",
            flush=True,
        )
    return measured


@contextmanager
def one_core_busy(limit_s: float = 900):
    """Keep the last CPU core busy from another process, as another student's job would.

    The process stops on exit, and in any case after `limit_s` seconds.
    """
    spin = (
        "import time\n"
        f"end = time.monotonic() + {limit_s}\n"
        "while time.monotonic() < end:\n"
        "    pass\n"
    )
    busy = subprocess.Popen([sys.executable, "-c", spin])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(busy.pid, {max(os.sched_getaffinity(0))})
    try:
        time.sleep(1)
        yield
    finally:
        busy.kill()
        busy.wait()


class served:
    """A server in its own process on a free loopback port, stopped on exit."""

    def __init__(self, command, port_flag="--port", health="/health", startup_timeout=600):
        self.port = free_port()
        self.command = [*command, port_flag, str(self.port)]
        self.health = health
        self.startup_timeout = startup_timeout

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                requests.get(url + self.health, timeout=1).raise_for_status()
                return url, self.process.pid
            except requests.RequestException:
                time.sleep(0.5)
        self.__exit__()
        self.log.seek(0)
        raise RuntimeError(f"{self.command[0]} did not start:\n{self.log.read().decode()[-2000:]}")

    def __exit__(self, *_):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def load(url: str, model: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    """Run `concurrency` streaming clients of `rounds` requests each; a probe times /health."""
    latencies, first_tokens, tokens = [], [], []
    health, stop_probe = [], threading.Event()

    def probe():
        while not stop_probe.wait(0.05):
            started = time.perf_counter()
            requests.get(f"{url}/health", timeout=10)
            health.append(time.perf_counter() - started)

    def client(index: int):
        for round_number in range(rounds):
            prompt = PROMPTS[(index + round_number) % len(PROMPTS)]
            latency, first_token, count = stream_one(url, model, prompt, new_tokens)
            latencies.append(latency)
            first_tokens.append(first_token)
            tokens.append(count)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.perf_counter()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.perf_counter() - started
    stop_probe.set()
    prober.join()
    return {
        "tokens_per_s": sum(tokens) / elapsed,
        "requests": len(latencies),
        "tokens": sum(tokens),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "first_token_p50_s": percentile(first_tokens, 50),
        "first_token_p95_s": percentile(first_tokens, 95),
        "first_tokens_s": first_tokens,
        "health_p50_ms": percentile(health, 50) * 1000,
        "health_p99_ms": percentile(health, 99) * 1000,
    }


def stream_one(url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """Stream one chat completion; return its latency, time to first token and completion tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first_token, count = None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first_token is None and any(
                c["delta"].get("content") for c in chunk.get("choices", [])
            ):
                first_token = time.perf_counter() - started
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first_token or 0.0, count


def measure_upstream(args) -> None:
    """Measure the kit in upstream mode against vLLM direct.

    Tokens/s at each concurrency and the first-token time, each pair measured `--repeats` times,
    alternated, as single runs vary with how vLLM happens to group the prefills; the kit's own CPU
    time per token; and how soon vLLM stops a request whose client hung up (its own
    `vllm:num_requests_running`).
    """
    serve = [sys.executable, "-m", "tutorial_api", "serve", "--upstream"]
    with vllm_server(args) as vllm_url, served([*serve, f"{vllm_url}/v1"]) as (kit_url, pid):
        model = requests.get(f"{vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]
        load(
            kit_url, model, 1, 1, args.new_tokens
        )  # warm-up: both paths, the kit's pooled connections
        results = {
            "model": model,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "direct": {},
            "kit": {},
            "kit_cpu_ms_per_token": {},
        }
        for concurrency in args.concurrency:
            direct, kit, kit_cpu = [], [], 0.0
            for _ in range(args.repeats):
                direct.append(load(vllm_url, model, concurrency, args.rounds, args.new_tokens))
                cpu_before = cpu_seconds(pid)
                kit.append(load(kit_url, model, concurrency, args.rounds, args.new_tokens))
                kit_cpu += cpu_seconds(pid) - cpu_before
            results["direct"][concurrency], results["kit"][concurrency] = direct, kit
            results["kit_cpu_ms_per_token"][concurrency] = (
                kit_cpu * 1000 / sum(run["tokens"] for run in kit)
            )
        results["hang_up"] = hang_up_check(kit_url, vllm_url, model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_benchmark_upstream.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nthe kit in front of vLLM ({model}), {args.new_tokens} new tokens, greedy, "
        f"on {os.cpu_count()} CPU cores; {args.repeats} alternated runs: "
        "their median tok/s, and the p50 of all their first tokens"
    )
    print(
        f"{'C':>3} {'vLLM tok/s':>11} {'kit tok/s':>10} {'ratio':>6} "
        f"{'TTFT vLLM ms':>13} {'kit adds ms':>12} {'kit CPU ms/token':>17}"
    )
    for c in args.concurrency:
        rates = [median_of(results[path][c], "tokens_per_s") for path in ("direct", "kit")]
        first_tokens = [
            percentile([t for run in results[path][c] for t in run["first_tokens_s"]], 50) * 1000
            for path in ("direct", "kit")
        ]
        print(
            f"{c:>3} {rates[0]:>11.1f} {rates[1]:>10.1f} {rates[1] / rates[0]:>6.2f} "
            f"{first_tokens[0]:>13.1f} {first_tokens[1] - first_tokens[0]:>12.1f} "
            f"{results['kit_cpu_ms_per_token'][c]:>17.2f}"
        )
    hang_up = results["hang_up"]
    print(
        f"hang-up: vLLM ran {hang_up['running_while_streaming']:g} request(s) while the client "
        f"streamed; back to {hang_up['running_after']:g} running "
        f"{hang_up['seconds_to_zero']:.3f} s after it hung up"
    )


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def cpu_seconds(pid: int) -> float:
    """Return the CPU time a process has used so far, user and system, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class vllm_server:
    """The vLLM of --vllm-url, or one that --vllm-python starts on the model saved to a folder."""

    def __init__(self, args):
        self.args = args

    def __enter__(self) -> str:
        if self.args.vllm_url:
            return self.args.vllm_url.rstrip("/")
        self.folder = Path(tempfile.mkdtemp(prefix="benchmark-model-"))
        model_folder(self.args.model, self.folder)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.server = served(
            [
                str(self.args.vllm_python),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(self.folder),
                "--dtype",
                "bfloat16",
                "--max-model-len",
                "2048",
                "--host",
                "127.0.0.1",
            ]
        )
        return self.server.__enter__()[0]

    def __exit__(self, *_):
        if not self.args.vllm_url:
            self.server.__exit__()
            shutil.rmtree(self.folder, ignore_errors=True)


def hang_up_check(kit_url: str, vllm_url: str, model: str) -> dict:
    """Hang up on a long answer streamed through the kit; time vLLM's running count back to 0."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 1500,
        "stream": True,
    }
    with requests.post(
        f"{kit_url}/v1/chat/completions", json=body, stream=True, timeout=600
    ) as answer:
        lines = answer.iter_lines(decode_unicode=True)
        while not (line := next(lines)).startswith("data: ") or not any(
            choice["delta"].get("content") for choice in json.loads(line[6:]).get("choices", [])
        ):
            pass  # the role chunk, in vLLM's spacing or the kit's, has no text yet
        running = vllm_running(vllm_url)
    hung_up = time.perf_counter()
    while (after := vllm_running(vllm_url)) > 0 and time.perf_counter() - hung_up < 10:
        time.sleep(0.01)
    return {
        "running_while_streaming": running,
        "running_after": after,
        "seconds_to_zero": time.perf_counter() - hung_up,
    }


def vllm_running(vllm_url: str) -> float:
    """Return vLLM's `vllm:num_requests_running`, summed over its labels, from its /metrics."""
    text = requests.get(f"{vllm_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


def model_folder(model_name: str, folder: Path) -> None:
    """Save the weights and the tokenizer in one folder, as vLLM wants them."""
    from tutorial_api import load_model

    model, tokenizer = load_model(model_name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, percent: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[
        min(98, max(0, int(percent) - 1))
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def title(results: dict) -> str:
    """Return the model and the request the results are of."""
    return f"{results['model']}, {results['new_tokens']} new tokens, greedy"


def report_cell(measured: dict | None) -> str:
    """Return one concurrency's tokens/s and first-token p50 in ms, or dashes where not measured."""
    if measured is None:
        return f"{'-':>12}{'-':>9}"
    first_token_ms = measured.get("first_token_p50_s", float("nan")) * 1000
    return f"{measured['tokens_per_s']:>12.1f}{first_token_ms:>9.0f}"


def report(results: dict, levels) -> None:
    """Print each row's tokens/s and first-token p50 at each concurrency, then the ratios."""
    rows = results["rows"]
    print(f"\n{title(results)}, on {results['cpus']} CPU cores")
    print(f"{'':<40}" + "".join(f"{f'C={c} tok/s':>12}{'TTFT ms':>9}" for c in levels))
    for name, row in rows.items():
        cells = "".join(report_cell(row.get(c)) for c in levels)
        print(f"{name:<40}{cells}")
    kit = next(name for name in rows if name.startswith("kit, auto") and not name.endswith("busy"))
    dtype = kit[kit.index("(") + 1 : -1]
    compared = [
        (kit, f"raw generate, {dtype}"),
        (kit + ", one core busy", kit),
        (kit, "vLLM CPU, bfloat16"),
    ]
    for mine, other in compared:
        if other in rows:
            ratios = ", ".join(
                f"C={c} {rows[mine][c]['tokens_per_s'] / rows[other][c]['tokens_per_s']:.2f}"
                for c in levels
                if c in rows[mine] and c in rows[other]
            )
            print(f"{mine} / {other}: {ratios}")
    print(f"memory: the kit's server peak {results['kit_peak_rss_mb']:.0f} MB")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, delays) = plt.subplots(1, 2, figsize=(12, 4.5))
    for number, (name, row) in enumerate(results["rows"].items()):
        style = {
            "linestyle": "--" if name.startswith("raw") else ":" if name.endswith("busy") else "-",
            "marker": "o",
            "color": f"C{number}",
            "label": name,
        }  # one color for a row in both panels
        levels = list(row)
        rates.plot(levels, [row[c]["tokens_per_s"] for c in levels], **style)
        if "first_token_p50_s" in row[levels[0]]:
            delays.plot(levels, [row[c]["first_token_p50_s"] * 1000 for c in levels], **style)
    rates.set(
        xlabel="concurrent clients (raw: batch size)",
        ylabel="tokens/s (all clients)",
        title="Throughput",
    )
    delays.set(xlabel="concurrent clients", ylabel="ms", title="Time to first token, p50")
    for axes in (rates, delays):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    figure.suptitle(f"{title(results)}, {results['cpus']} CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
