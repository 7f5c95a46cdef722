"""The official OpenAI Python SDK talking to Portcullis."""

import openai
import pytest


def test_chat_completion(client, stack):
    raw = client.chat.completions.with_raw_response.create(
        model="mock-small", messages=[{"role": "user", "content": "Hello from the SDK"}]
    )
    r = raw.parse()
    assert r.choices[0].message.content == "Hello from the SDK"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    record = stack.record_for(raw.headers["x-request-id"])
    assert record["decision"] == "allowed"
    assert record["usage"]["total_tokens"] == r.usage.total_tokens


def test_chat_completion_stream(client, stack):
    text = "A streamed reply, split into many small events"
    stream = client.chat.completions.create(
        model="mock-small",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, chunks = [], None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert chunks > 5
    assert usage is not None and usage.completion_tokens > 0


def test_embeddings(client):
    r = client.embeddings.create(model="text-embedding-mock", input=["one", "two"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) == 8
    assert r.data[0].embedding != r.data[1].embedding


def test_models_list(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["claude-mock", "mock-small", "text-embedding-mock"]


def test_invalid_request_is_bad_request_error(client, stack):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock-small", messages=[])
    assert e.value.status_code == 400
    assert e.value.code == "invalid_request"
    record = stack.record_for(e.value.response.headers["x-request-id"])
    assert record["decision"] == "blocked"
    assert record["reason_code"] == "invalid_request"


def test_unknown_model_is_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.code == "model_not_found"


def test_provider_failure_is_a_server_error(client, stack):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(
            model="mock-small", messages=[{"role": "user", "content": '{"mock_error": 500}'}]
        )
    assert e.value.status_code == 502
    assert e.value.code == "upstream_error"
    record = stack.record_for(e.value.response.headers["x-request-id"])
    assert record["upstream"]["status"] == 500


def test_broken_stream_raises_in_the_sdk(client):
    stream = client.chat.completions.create(
        model="mock-small",
        messages=[{"role": "user", "content": '{"mock_broken_stream": true}'}],
        stream=True,
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_bad_token_is_authentication_error(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url, api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 401
    assert e.value.code == "invalid_token"
    record = stack.record_for(e.value.response.headers["x-request-id"])
    assert record["blocked_by"] == "jwt_auth"


def test_rate_limit_is_rate_limit_error(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url, api_key=stack.token("sdk-trial", "trial"), max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert e.value.code == "rate_limited"
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_gate_refusals_are_permission_denied_errors(client, stack):
    stack.admin("POST", "/admin/models", {"id": "sdk-gated", "provider": "mock"})
    ask = lambda: client.chat.completions.create(
        model="sdk-gated", messages=[{"role": "user", "content": "x"}]
    )
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask()
    assert e.value.status_code == 403
    assert e.value.code == "model_not_approved"
    stack.admin("POST", "/admin/models/sdk-gated/approve")
    assert ask().choices[0].message.content == "x"
    stack.admin("POST", "/admin/models/sdk-gated/freeze")
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask()
    assert e.value.code == "model_frozen"
    record = stack.record_for(e.value.response.headers["x-request-id"])
    assert record["blocked_by"] == "model_registry"


def test_risk_and_freezes_are_permission_denied_errors(stack):
    from openai import OpenAI

    stack.admin("POST", "/admin/models", {"id": "sdk-risky", "provider": "mock", "risk_tier": "high"})
    stack.admin("POST", "/admin/models/sdk-risky/approve")
    client = OpenAI(base_url=stack.base_url, api_key=stack.token("sdk-frozen", "user"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="sdk-risky", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "forbidden"
    stack.admin("POST", "/admin/subjects/sdk-frozen/freeze")
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "subject_frozen"


def test_secrets_are_redacted_in_a_stream_the_sdk_reads(client):
    secret = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i"
    stream = client.chat.completions.create(
        model="mock-small",
        messages=[{"role": "user", "content": f"the key is {secret}, keep it safe"}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "the key is [REDACTED:github-token], keep it safe"


def _tool_stream(client, name, args):
    import json

    trigger = json.dumps({"mock_tool_call": {"name": name, "arguments": args}})
    stream = client.chat.completions.create(
        model="mock-small", messages=[{"role": "user", "content": trigger}], stream=True
    )
    names, arguments, text, finish = "", "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        for t in c.delta.tool_calls or []:
            names += (t.function.name or "") if t.function else ""
            arguments += (t.function.arguments or "") if t.function else ""
        text += c.delta.content or ""
        finish = c.finish_reason or finish
    return names, arguments, text, finish


def test_streamed_tool_calls_through_the_sdk(client):
    names, arguments, text, finish = _tool_stream(client, "get_weather", {"city": "Oslo"})
    assert (names, arguments, finish) == ("get_weather", '{"city":"Oslo"}', "tool_calls")
    names, arguments, text, finish = _tool_stream(client, "send_email", {"to": "eve@evil.com"})
    assert (names, arguments) == ("", "")
    assert text == "[a tool call was blocked by policy]"
    assert finish == "stop"
