"""Measure the chat API against raw `model.generate`, and against `transformers serve` where it runs; or, with a
vLLM server, the kit in front of it (`serve --upstream`) against vLLM direct.

    python benchmarks/serve_benchmark.py                      # SmolLM2, 64 new tokens, greedy
    python benchmarks/serve_benchmark.py --model tiny-qwen2   # a quick dry run
    python benchmarks/serve_benchmark.py --vllm-python VENV/bin/python   # starts vLLM's CPU build on the model
    python benchmarks/serve_benchmark.py --vllm-url http://127.0.0.1:8000  # a vLLM already running

Prints a table and writes benchmarks/results/serve_benchmark.png and .json (serve_benchmark_upstream.json with
vLLM). Each raw measurement runs in a fresh process, so its peak memory is its own. Loopback only; every loop is
bounded.
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
from pathlib import Path

import requests

PROMPTS = [f"Write a short poem about the number {n}." for n in range(16)]
HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--vllm-url", help="a running vLLM server's root URL: measure the kit in front of it")
    parser.add_argument("--vllm-python", type=Path,
                        help="the Python of a venv with vLLM: start its OpenAI server on the model, then measure")
    parser.add_argument("--raw-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_batch:
        print(json.dumps(raw_generate(args.model, args.raw_batch, args.new_tokens)))
        return
    if args.vllm_url or args.vllm_python:
        measure_upstream(args)
        return
    print("the kit in front of vLLM: no --vllm-url or --vllm-python, skipped")

    results = {"model": args.model, "new_tokens": args.new_tokens, "raw": {}, "server": {}, "transformers_serve": {}}
    for batch in sorted({1, *args.concurrency}):
        results["raw"][batch] = in_fresh_process(args, batch)
        print(f"raw generate, batch {batch}: {results['raw'][batch]['tokens_per_s']:.1f} tok/s", flush=True)
    with served([sys.executable, "-m", "tutorial_api", "serve", "--model", args.model]) as (url, pid):
        for concurrency in args.concurrency:
            results["server"][concurrency] = load(url, args.model, concurrency, args.rounds, args.new_tokens)
            print(f"server, concurrency {concurrency}: {results['server'][concurrency]['tokens_per_s']:.1f} tok/s",
                  flush=True)
        results["server_peak_rss_mb"] = peak_rss_mb(pid)
    results["transformers_serve"] = measure_transformers_serve(args)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_benchmark.json").write_text(json.dumps(results, indent=1))
    report(results)
    plot(results, args.out / "serve_benchmark.png")


def raw_generate(model_name: str, batch: int, new_tokens: int) -> dict:
    """tokens/s of one left-padded greedy `generate` call, after a warm-up, and this process's peak RSS."""
    import torch

    from tutorial_api import load_model
    from tutorial_api.chat import build_messages

    model, tokenizer = load_model(model_name)
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(build_messages(p), add_generation_prompt=True, return_dict=True)["input_ids"]
               for p in (PROMPTS * batch)[:batch]]
    inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
               "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        model.generate(**inputs, **{**options, "max_new_tokens": 4, "min_new_tokens": 4})
        started = time.perf_counter()
        model.generate(**inputs, **options)
        elapsed = time.perf_counter() - started
    return {"tokens_per_s": batch * new_tokens / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_fresh_process(args, batch: int) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--new-tokens", str(args.new_tokens),
               "--raw-batch", str(batch)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900).stdout
    return json.loads(output.strip().splitlines()[-1])


class served:
    """a server in its own process on a free loopback port, stopped on exit."""

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
    """`concurrency` streaming clients, each sending `rounds` requests, while a probe times /health."""
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
    return {"tokens_per_s": sum(tokens) / elapsed, "requests": len(latencies), "tokens": sum(tokens),
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "first_token_p50_s": percentile(first_tokens, 50), "first_token_p95_s": percentile(first_tokens, 95),
            "health_p50_ms": percentile(health, 50) * 1000, "health_p99_ms": percentile(health, 99) * 1000}


def stream_one(url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """one streamed chat completion: latency, time to first token, completion tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_token, count = None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first_token is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first_token = time.perf_counter() - started
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first_token or 0.0, count


def measure_transformers_serve(args) -> dict:
    """`transformers serve --continuous-batching` on the same weights, at concurrency 1 and 8."""
    if shutil.which("transformers") is None:
        print("transformers serve: not installed, skipped")
        return {}
    folder = Path(tempfile.mkdtemp(prefix="benchmark-model-"))
    try:
        model_folder(args.model, folder)
        command = ["transformers", "serve", str(folder), "--continuous-batching", "--device", "cpu",
                   "--dtype", "float32", "--host", "127.0.0.1"]
        with served(command) as (url, _):
            measured = {}
            for concurrency in [c for c in (1, 8) if c in args.concurrency]:
                measured[concurrency] = load(url, str(folder), concurrency, args.rounds, args.new_tokens)
                print(f"transformers serve, concurrency {concurrency}: "
                      f"{measured[concurrency]['tokens_per_s']:.1f} tok/s", flush=True)
            return measured
    except (RuntimeError, requests.RequestException) as error:
        print(f"transformers serve: failed, skipped ({str(error).splitlines()[0]})")
        return {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_upstream(args) -> None:
    """the kit in upstream mode against vLLM direct: tokens/s at each concurrency, first-token time, and how soon
    vLLM stops a request whose client hung up (its own `vllm:num_requests_running`)."""
    with vllm_server(args) as vllm_url, \
            served([sys.executable, "-m", "tutorial_api", "serve", "--upstream", f"{vllm_url}/v1"]) as (kit_url, _):
        model = requests.get(f"{vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]
        load(kit_url, model, 1, 1, args.new_tokens)  # warm-up: both paths, the kit's pooled connections
        results = {"model": model, "new_tokens": args.new_tokens, "direct": {}, "kit": {}}
        for concurrency in args.concurrency:
            for name, url in (("direct", vllm_url), ("kit", kit_url)):
                results[name][concurrency] = load(url, model, concurrency, args.rounds, args.new_tokens)
        results["hang_up"] = hang_up_check(kit_url, vllm_url, model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_benchmark_upstream.json").write_text(json.dumps(results, indent=1))
    print(f"\nthe kit in front of vLLM ({model}), {args.new_tokens} new tokens, greedy, on {os.cpu_count()} CPU cores")
    print(f"{'C':>3} {'vLLM tok/s':>11} {'kit tok/s':>10} {'ratio':>6} {'TTFT vLLM ms':>13} {'kit adds ms':>12}")
    for c in args.concurrency:
        direct, kit = results["direct"][c], results["kit"][c]
        print(f"{c:>3} {direct['tokens_per_s']:>11.1f} {kit['tokens_per_s']:>10.1f} "
              f"{kit['tokens_per_s'] / direct['tokens_per_s']:>6.2f} {direct['first_token_p50_s'] * 1000:>13.1f} "
              f"{(kit['first_token_p50_s'] - direct['first_token_p50_s']) * 1000:>12.1f}")
    hang_up = results["hang_up"]
    print(f"hang-up: vLLM ran {hang_up['running_while_streaming']:g} request(s) while the client streamed; "
          f"back to {hang_up['running_after']:g} running {hang_up['seconds_to_zero']:.3f} s after it hung up")


class vllm_server:
    """the vLLM server of --vllm-url, or one started with --vllm-python on the model saved to a folder."""

    def __init__(self, args):
        self.args = args

    def __enter__(self) -> str:
        if self.args.vllm_url:
            return self.args.vllm_url.rstrip("/")
        self.folder = Path(tempfile.mkdtemp(prefix="benchmark-model-"))
        model_folder(self.args.model, self.folder)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.server = served([str(self.args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                              str(self.folder), "--dtype", "bfloat16", "--max-model-len", "2048", "--host",
                              "127.0.0.1"])
        return self.server.__enter__()[0]

    def __exit__(self, *_):
        if not self.args.vllm_url:
            self.server.__exit__()
            shutil.rmtree(self.folder, ignore_errors=True)


def hang_up_check(kit_url: str, vllm_url: str, model: str) -> dict:
    """stream a long answer through the kit, hang up after its first token, and time vLLM's running count back
    to 0."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 1500,
            "stream": True}
    with requests.post(f"{kit_url}/v1/chat/completions", json=body, stream=True, timeout=600) as answer:
        lines = answer.iter_lines(decode_unicode=True)
        while not (line := next(lines)).startswith("data: ") or not any(
                choice["delta"].get("content") for choice in json.loads(line[6:]).get("choices", [])):
            pass  # the role chunk, written by vLLM or by the kit in its own spacing, has no text yet
        running = vllm_running(vllm_url)
    hung_up = time.perf_counter()
    while (after := vllm_running(vllm_url)) > 0 and time.perf_counter() - hung_up < 10:
        time.sleep(0.01)
    return {"running_while_streaming": running, "running_after": after,
            "seconds_to_zero": time.perf_counter() - hung_up}


def vllm_running(vllm_url: str) -> float:
    """vLLM's `vllm:num_requests_running`, summed over its labels, from its Prometheus /metrics."""
    text = requests.get(f"{vllm_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def model_folder(model_name: str, folder: Path) -> None:
    """one folder with the weights and the tokenizer, as `transformers serve` wants them."""
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
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(percent) - 1))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def report(results: dict) -> None:
    raw, server, peer = results["raw"], results["server"], results["transformers_serve"]
    print(f"\n{results['model']}, {results['new_tokens']} new tokens, greedy, on {os.cpu_count()} CPU cores")
    print(f"{'C':>3} {'raw tok/s':>10} {'server tok/s':>13} {'ratio':>6} {'p50 s':>6} {'p95 s':>6} "
          f"{'TTFT p50':>9} {'health p99 ms':>14} {'tf serve tok/s':>15}")
    for c, s in server.items():
        peer_rate = f"{peer[c]['tokens_per_s']:.1f}" if c in peer else "-"
        print(f"{c:>3} {raw[c]['tokens_per_s']:>10.1f} {s['tokens_per_s']:>13.1f} "
              f"{s['tokens_per_s'] / raw[c]['tokens_per_s']:>6.2f} {s['latency_p50_s']:>6.2f} {s['latency_p95_s']:>6.2f} "
              f"{s['first_token_p50_s']:>9.3f} {s['health_p99_ms']:>14.1f} {peer_rate:>15}")
    for c in peer:
        print(f"server / transformers serve at C={c}: {server[c]['tokens_per_s'] / peer[c]['tokens_per_s']:.2f}")
    largest = max(raw)
    print(f"memory: server peak {results['server_peak_rss_mb']:.0f} MB, raw batch-{largest} peak "
          f"{raw[largest]['peak_rss_mb']:.0f} MB, ratio {results['server_peak_rss_mb'] / raw[largest]['peak_rss_mb']:.2f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    server, raw, peer = results["server"], results["raw"], results["transformers_serve"]
    levels = list(server)
    figure, (rates, delays) = plt.subplots(1, 2, figsize=(11, 4))
    rates.plot(levels, [server[c]["tokens_per_s"] for c in levels], "o-", label="tutorial_api server")
    rates.plot(levels, [raw[c]["tokens_per_s"] for c in levels], "s--", label="raw generate (batch = C)")
    if peer:
        rates.plot(list(peer), [peer[c]["tokens_per_s"] for c in peer], "^:", label="transformers serve --cb")
    rates.set(xlabel="concurrent clients", ylabel="tokens/s (all clients)", title="Throughput")
    delays.plot(levels, [server[c]["latency_p50_s"] for c in levels], "o-", label="latency p50")
    delays.plot(levels, [server[c]["latency_p95_s"] for c in levels], "o--", label="latency p95")
    delays.plot(levels, [server[c]["first_token_p50_s"] for c in levels], "x-", label="first token p50")
    delays.set(xlabel="concurrent clients", ylabel="seconds", title="Latency")
    for axes in (rates, delays):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(f"{results['model']}, {results['new_tokens']} new tokens, greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
