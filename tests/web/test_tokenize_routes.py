from fastapi.testclient import TestClient

from tutorial_api import create_app


def test_tokenize_counts_the_chat_as_the_model_reads_it(tiny):
    model, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    expected = len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    with TestClient(create_app(tiny, api_keys=["alice:a-key"])) as client:
        assert client.post("/tokenize", json={"messages": messages}).status_code == 401
        counted = client.post(
            "/tokenize",
            json={"model": "any", "messages": messages},
            headers={"Authorization": "Bearer a-key"},
        )
        refused = client.post(
            "/tokenize", json={"messages": []}, headers={"Authorization": "Bearer a-key"}
        )
    assert counted.json() == {
        "count": expected,
        "max_model_len": model.config.max_position_embeddings,
    }
    assert refused.status_code == 422 and refused.json()["field"] == "messages"
