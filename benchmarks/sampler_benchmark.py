"""Time the sampler alone on Qwen-sized logits, against transformers' processors.

    python benchmarks/sampler_benchmark.py
    python benchmarks/sampler_benchmark.py --repeats 50 --threads 2

Both sample from float32 logits [rows, 151936] with Qwen2.5's generation config (temperature 0.7,
top-p 0.8, top-k 20, repetition penalty 1.1), each row with a 200-token history. transformers'
side is its processors in generate()'s order, then softmax and multinomial over the vocabulary;
the kit's is `sampler.sample`, its rows' answers growing by the token drawn. Prints the median
milliseconds a step.
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tutorial_api.engine.sampler import Sampling, sample

VOCAB = 151936
HISTORY = 200
QWEN = Sampling(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)


def median_ms(step, repeats: int) -> float:
    """Return the median milliseconds of `step()` over `repeats` runs, after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def transformers_step(logits: torch.Tensor, history: torch.Tensor):
    """Return one step of transformers' sampling, as `generate()` does it."""
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(QWEN.repetition_penalty),
            TemperatureLogitsWarper(QWEN.temperature),
            TopKLogitsWarper(QWEN.top_k),
            TopPLogitsWarper(QWEN.top_p),
        ]
    )

    def step():
        probabilities = torch.softmax(processors(history, logits), dim=-1)
        return torch.multinomial(probabilities, 1)

    return step


def kit_step(logits: torch.Tensor, history: torch.Tensor):
    """Return one step of the kit's sampler over rows whose answers grow by the token drawn."""
    generations = [
        SimpleNamespace(sampling=QWEN, prompt_ids=row.tolist(), answer_ids=[]) for row in history
    ]

    def step():
        for generation, token in zip(generations, sample(logits, generations), strict=True):
            generation.answer_ids.append(token)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random = torch.Generator().manual_seed(0)
    print(f"ms a step, median of {args.repeats}, {args.threads} threads, vocabulary {VOCAB}")
    print(f"{'rows':>5} {'transformers':>13} {'the kit':>8} {'speed-up':>9}")
    for rows in args.rows:
        logits = torch.randn(rows, VOCAB, generator=random) * 3
        history = torch.randint(0, VOCAB, (rows, HISTORY), generator=random)
        reference = median_ms(transformers_step(logits, history), args.repeats)
        kit = median_ms(kit_step(logits, history), args.repeats)
        print(f"{rows:>5} {reference:>13.2f} {kit:>8.2f} {reference / kit:>8.1f}x")


if __name__ == "__main__":
    main()
