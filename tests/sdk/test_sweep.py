"""The security sweep as an application meets it through the OpenAI SDK:
logprobs, several choices, streamed tool arguments, the stream helper that
accumulates a whole completion, legacy functions, and a broken provider
stream."""

import json

import openai
import pytest

SECRET = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i"
REDACTED = "[REDACTED:github-token]"


def test_logprobs_never_spell_a_redacted_secret(client):
    stream = client.chat.completions.create(
        model="mock-small",
        messages=[{"role": "user", "content": f"the key is {SECRET} ok"}],
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    text, tokens = "", ""
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            for t in (c.logprobs.content or []) if c.logprobs else []:
                tokens += t.token
    assert text == f"the key is {REDACTED} ok"
    assert tokens == text
    reply = client.chat.completions.create(
        model="mock-small",
        messages=[{"role": "user", "content": f"the key is {SECRET} ok"}],
        logprobs=True,
    )
    spelled = "".join(t.token for t in reply.choices[0].logprobs.content)
    assert spelled == f"the key is {REDACTED} ok"


def test_several_choices_and_the_stream_helper(client):
    # The SDK's stream helper accumulates every choice: each must come out
    # whole and redacted.
    with client.chat.completions.stream(
        model="mock-small",
        messages=[{"role": "user", "content": f"n choices, one key: {SECRET}"}],
        n=3,
    ) as stream:
        final = stream.get_final_completion()
    assert len(final.choices) == 3
    for c in final.choices:
        assert c.message.content == f"n choices, one key: {REDACTED}"


def test_streamed_tool_arguments_are_redacted_and_stay_json(client):
    trigger = json.dumps({"mock_tool_call": {"name": "get_weather", "arguments": {"city": SECRET}}})
    with client.chat.completions.stream(
        model="mock-small", messages=[{"role": "user", "content": trigger}]
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": REDACTED}


def test_legacy_functions_are_refused_like_tools(client):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(
            model="mock-small",
            messages=[{"role": "user", "content": "hi"}],
            functions=[{"name": "delete_records", "parameters": {"type": "object"}}],
        )
    assert e.value.body["code"] == "tool_not_allowed"


def test_an_unparseable_provider_event_raises_in_the_sdk(client):
    trigger = json.dumps(
        {"mock_raw_events": [{"choices": [{"index": 0, "delta": {"content": "a"}}]}, f"not json {SECRET}"]}
    )
    stream = client.chat.completions.create(
        model="mock-small", messages=[{"role": "user", "content": trigger}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
