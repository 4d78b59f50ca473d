import json
import logging
import os

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tutorial_api import PRESETS, ModelNotAvailable, chat, load_model
from tutorial_api.models import (
    QWEN2_5_0_5B_SHAPE,
    _fill_random,
    _placement,
    choose_dtype,
    context_length,
)


def test_presets_cover_the_offline_models_and_the_qwen_family():
    assert {
        "smollm2-135m",
        "tiny-qwen2",
        "tiny-qwen2.5",
        "qwen2.5-0.5b-shape",
        "qwen2.5-0.5b-instruct",
        "qwen2.5-7b-instruct",
        "qwen-7b-chat",
    } <= set(PRESETS)
    assert PRESETS["qwen2.5-0.5b-instruct"].hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert PRESETS["qwen-7b-chat"].remote_code


def test_tiny_qwen2_is_a_real_qwen2_with_fixed_weights(tiny):
    model, tokenizer = tiny
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.model_type == "qwen2"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    again, _ = load_model("tiny-qwen2")
    for (name, weight), (_, same) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(weight, same), name


def test_tiny_qwen2_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-qwen2")
    assert torch.equal(torch.rand(3), expected)


QWEN2_5_GENERATION = {
    "do_sample": True,
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
}


def assert_speaks_qwen2_5(model, tokenizer):
    """Check Qwen2.5's tokenizer, chat template and generation config."""
    assert tokenizer("你好").input_ids == [108386]
    assert "You are Qwen, created by Alibaba Cloud." in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    )
    generation = model.generation_config.to_dict()
    assert {key: generation[key] for key in QWEN2_5_GENERATION} == QWEN2_5_GENERATION


@pytest.mark.slow
def test_tiny_qwen2_5_has_qwen2_5s_tokenizer_and_sampling():
    model, tokenizer = load_model("tiny-qwen2.5")
    assert isinstance(model, Qwen2ForCausalLM) and model.num_parameters() < 25_000_000
    assert_speaks_qwen2_5(model, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    answer, history = chat(model, tokenizer, "你好", max_new_tokens=8)
    assert history == [["你好", answer]]


@pytest.mark.slow
def test_qwen2_5_shape_is_qwen2_5_0_5b_of_random_weights():
    """Qwen2.5-0.5B-Instruct's exact shape, tokenizer and sampling; it answers (noise)."""
    model, tokenizer = load_model("qwen2.5-0.5b-shape")
    assert "random weights" in PRESETS["qwen2.5-0.5b-shape"].description
    assert model.num_parameters() == 494_032_768
    config = model.config.to_dict()
    shape = {key: value for key, value in QWEN2_5_0_5B_SHAPE.items() if key != "rope_theta"}
    assert {key: config[key] for key in shape} == shape
    assert model.config.rope_parameters["rope_theta"] == 1_000_000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == choose_dtype("auto", "cpu")
    assert context_length(model, tokenizer) == 32768
    assert_speaks_qwen2_5(model, tokenizer)
    up = model.model.layers[5].mlp.up_proj.weight.detach().float()
    assert abs(up.std().item() - 0.02) < 0.001 and abs(up.mean().item()) < 0.001
    answer, history = chat(model, tokenizer, "你好", max_new_tokens=4)
    assert answer and history == [["你好", answer]]


def test_random_fill_is_qwen2s_initialisation_on_any_number_of_threads():
    """The benchmark model's weights are the same on every machine, whatever its cores."""
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    threads = torch.get_num_threads()
    filled = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            model = Qwen2ForCausalLM(config)
            _fill_random(model, seed=0, std=0.02)
            filled.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    for name, weight in filled[0].items():
        assert torch.equal(weight, filled[1][name]), name
        if name.endswith("norm.weight"):
            assert torch.all(weight == 1), name
        elif name.endswith(".bias"):
            assert torch.all(weight == 0), name
        else:
            assert 0.018 < weight.std().item() < 0.022, name
    assert not torch.equal(
        filled[0]["model.layers.0.mlp.up_proj.weight"],
        filled[0]["model.layers.1.mlp.up_proj.weight"],
    )


X86_WITH_BF16 = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}
X86_WITHOUT_BF16 = {
    "architecture": "x86_64",
    "avx512_f": True,
    "avx512_bf16": False,
    "amx_bf16": False,
}
X86_WITH_AMX = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": True}


@pytest.fixture
def cpu(monkeypatch):
    """make torch report this CPU's capabilities as given: `cpu(X86_WITH_BF16)`."""
    monkeypatch.delenv("TUTORIAL_API_DTYPE", raising=False)
    return lambda capabilities: monkeypatch.setattr(
        torch.cpu, "get_capabilities", lambda: capabilities
    )


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        (X86_WITH_BF16, torch.bfloat16),
        (X86_WITH_AMX, torch.bfloat16),
        (X86_WITHOUT_BF16, torch.float32),
    ],
)
def test_auto_picks_bf16_where_the_cpu_has_native_bf16(cpu, capabilities, expected):
    """auto computes in bf16 exactly where torch finds native bf16 on the CPU."""
    cpu(capabilities)
    model, _ = load_model("tiny-qwen2", device="cpu")
    assert model.dtype == expected
    assert load_model("tiny-qwen2", device="cpu", dtype="auto")[0].dtype == expected


@pytest.mark.parametrize("acl", [True, False])
def test_on_arm_auto_wants_the_bf16_extension_and_kernels(cpu, monkeypatch, acl):
    """On Arm, auto wants the bf16 extension and torch's Arm kernels for it."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_acl_supported", lambda: acl)
    cpu({"architecture": "arm64", "neon": True, "bf16": True})
    assert choose_dtype("auto", "cpu") == (torch.bfloat16 if acl else torch.float32)
    cpu({"architecture": "arm64", "neon": True, "bf16": False})
    assert choose_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("capabilities", [X86_WITH_BF16, X86_WITHOUT_BF16])
def test_an_explicit_dtype_wins_over_auto(cpu, monkeypatch, capabilities):
    """An explicit dtype wins over auto, as a string, a torch dtype or the environment."""
    cpu(capabilities)
    assert load_model("tiny-qwen2", dtype="float32")[0].dtype == torch.float32
    assert load_model("tiny-qwen2", dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert load_model("tiny-qwen2", dtype="float16")[0].dtype == torch.float16
    monkeypatch.setenv("TUTORIAL_API_DTYPE", "float16")
    assert load_model("tiny-qwen2")[0].dtype == torch.float16
    assert load_model("tiny-qwen2", dtype="auto")[0].dtype == choose_dtype("auto", "cpu")


@pytest.mark.parametrize(
    ("own", "gpu_has_bf16", "expected"),
    [
        (torch.bfloat16, True, torch.bfloat16),
        (torch.bfloat16, False, torch.float16),
        (torch.float16, True, torch.float16),
        (torch.float32, True, torch.float32),
        (torch.float32, False, torch.float32),
    ],
)
def test_on_a_gpu_auto_keeps_the_models_own_dtype(cpu, monkeypatch, own, gpu_has_bf16, expected):
    """On a GPU, auto keeps the model's own dtype, with fp16 where bf16 is missing."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: gpu_has_bf16)
    cpu(X86_WITH_BF16)  # the host CPU has no say on a GPU
    assert choose_dtype("auto", "cuda", own) == choose_dtype("auto", "cuda:1", own) == expected
    assert choose_dtype(torch.float32, "cuda", own) == torch.float32
    for named_in_config in (
        own,
        str(own).removeprefix("torch."),
    ):  # a config read from JSON names it as text
        config = Qwen2Config(dtype=named_in_config)
        assert _placement("cuda", "auto").pretrained_kwargs(config) == {
            "dtype": expected,
            "device_map": "auto",
        }


def test_bf16_keeps_the_rotary_frequencies_in_fp32():
    """Casting a loaded model with .to(bfloat16) would round them too, and blur the positions of
    long prompts.
    """
    model, _ = load_model("tiny-qwen2", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["fp8", "bf16", "float64", ""])
def test_a_bad_dtype_is_refused_naming_the_flag_and_the_variable(dtype):
    with pytest.raises(ValueError) as refused:
        load_model("tiny-qwen2", dtype=dtype)
    assert all(
        name in str(refused.value)
        for name in ("--dtype", "$TUTORIAL_API_DTYPE", repr(dtype), "bfloat16")
    )


def test_environment_variable_sets_the_default_model(monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_MODEL", "tiny-qwen2")
    model, _ = load_model()
    assert isinstance(model, Qwen2ForCausalLM)


def test_local_folder_loads_the_same_model(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model(str(tmp_path))
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    assert reloaded_tokenizer("Hello there", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_a_local_load_shows_no_progress_bar(tiny, tmp_path, capfd):
    """The "Loading weights" bar would stay at 0% in a saved notebook; downloads keep theirs."""
    from transformers.utils import logging as transformers_logging

    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    load_model(str(tmp_path))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()


def test_an_unreachable_hub_id_gives_one_clear_error():
    """An unreachable hub id gives one clear error, naming the offline default."""
    with pytest.raises(ModelNotAvailable) as failure:
        load_model("Qwen/Qwen2.5-0.5B-Instruct")
    message = str(failure.value)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "--model smollm2-135m" in message
    assert failure.value.__cause__ is None and failure.value.__suppress_context__


def test_preset_hub_models_go_through_the_same_clear_error():
    with pytest.raises(ModelNotAvailable, match="smollm2-135m"):
        load_model("qwen2.5-7b-instruct")


def test_unknown_name_lists_the_presets():
    with pytest.raises(ModelNotAvailable, match="tiny-qwen2"):
        load_model("no-such-model")


def test_context_length_comes_from_the_config(tiny):
    assert context_length(*tiny) == tiny[0].config.max_position_embeddings == 1024


@pytest.mark.real_model
def test_offline_default_is_smollm2(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == choose_dtype("auto", "cpu")
    assert context_length(model, tokenizer) == 8192


@pytest.mark.real_model
def test_gguf_cache_is_built_once_then_trusted_only_while_intact(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TUTORIAL_API_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="tutorial_api")

    def builds():
        load_model("smollm2-135m")
        built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Building")]
        caplog.clear()
        return sorted(
            message.rsplit("/", 1)[-1].split("-")[0] for message in built
        )  # model-KEY: model

    assert builds() == ["model", "tokenizer"]
    assert builds() == []

    weights = next(tmp_path.glob("v*/SmolLM2-135M-Instruct.Q4_1/model-*/*.safetensors"))
    with weights.open("r+b") as stream:
        stream.seek(weights.stat().st_size // 2)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0xFF]))
    assert builds() == ["model"]

    os.truncate(weights, weights.stat().st_size // 2)
    assert builds() == ["model"]

    next(tmp_path.glob("v*/SmolLM2-135M-Instruct.Q4_1/tokenizer-*/tokenizer*.json")).unlink()
    assert builds() == ["tokenizer"]


# The original tutorial's model, Qwen/Qwen-7B-Chat, runs code from its own repository: only on
# request.

TUTORIAL_MODEL = "Qwen/Qwen-7B-Chat"


@pytest.fixture
def tutorial_model_downloaded(tiny, tmp_path, monkeypatch):
    """The tutorial's model "downloaded" (the tiny Qwen2's files stand in for it): only the network
    call is fake.
    """
    import huggingface_hub

    from tutorial_api import download

    def snapshot_download(repo_id, *, local_dir, **ignored):
        tiny[0].save_pretrained(local_dir)
        tiny[1].save_pretrained(local_dir)

    monkeypatch.setenv("TUTORIAL_API_CACHE", str(tmp_path))
    monkeypatch.setattr(download, "unreachable", lambda url: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    download.fetch(TUTORIAL_MODEL)


@pytest.mark.parametrize("name", [TUTORIAL_MODEL, "qwen-7b-chat"])
def test_remote_code_is_refused_without_opt_in(name, monkeypatch):
    """Remote code is refused without opt-in, before any download."""
    from transformers import AutoTokenizer

    def download(*args, **kwargs):
        raise AssertionError("a download started")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", download)
    with pytest.raises(ModelNotAvailable) as refusal:
        load_model(name)
    message = str(refusal.value)
    assert "remote code" in message and "run on this machine" in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    assert "TUTORIAL_API_TRUST_REMOTE_CODE=1" in message


def test_the_tutorial_model_id_loads_with_trust_remote_code(
    tutorial_model_downloaded, tiny, monkeypatch
):
    model, _ = load_model(TUTORIAL_MODEL, trust_remote_code=True)
    assert torch.equal(model.state_dict()["lm_head.weight"], tiny[0].state_dict()["lm_head.weight"])
    monkeypatch.setenv("TUTORIAL_API_TRUST_REMOTE_CODE", "1")
    monkeypatch.setenv("TUTORIAL_API_MODEL", TUTORIAL_MODEL)
    assert isinstance(load_model()[0], Qwen2ForCausalLM)


def test_serve_trust_remote_code_flag_reaches_the_model(tutorial_model_downloaded):
    from fastapi.testclient import TestClient

    from tutorial_api import create_app
    from tutorial_api.cli import _parser, _settings_from

    refused = _settings_from(_parser().parse_args(["serve", "--model", TUTORIAL_MODEL]))
    with (
        pytest.raises(ModelNotAvailable, match="--trust-remote-code"),
        TestClient(create_app(settings=refused)),
    ):
        pass
    allowed = _settings_from(
        _parser().parse_args(["serve", "--model", TUTORIAL_MODEL, "--trust-remote-code"])
    )
    assert allowed.trust_remote_code is True
    with TestClient(create_app(settings=allowed)) as client:
        assert client.get("/health").json()["model"] == TUTORIAL_MODEL


def test_a_repository_with_its_own_code_is_refused(tiny, tmp_path):
    """A repository with its own code is refused with the same explanation."""
    tiny[0].save_pretrained(tmp_path)
    tiny[1].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        model_type="homemade",
        auto_map={
            "AutoConfig": "configuration_homemade.HomemadeConfig",
            "AutoModelForCausalLM": "modeling_homemade.HomemadeModel",
        },
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match="needs remote code"):
        load_model(str(tmp_path))


def test_the_trust_remote_code_setting_reads_yes_or_no(monkeypatch):
    from tutorial_api import Settings

    for text, value in [("1", True), ("yes", True), ("0", False), ("off", False)]:
        monkeypatch.setenv("TUTORIAL_API_TRUST_REMOTE_CODE", text)
        assert Settings().trust_remote_code is value
    monkeypatch.setenv("TUTORIAL_API_TRUST_REMOTE_CODE", "maybe")
    with pytest.raises(ValueError, match="maybe"):
        Settings()
