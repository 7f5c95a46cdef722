"""The mock provider's Anthropic Messages API, read by the official
`anthropic` SDK: proof that the stand-in speaks the real protocol (the
gateway's Anthropic tests rely on it)."""

import json

import anthropic
import pytest


@pytest.fixture()
def mock_client(stack):
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{stack.mock_port}", api_key="sk-ant-mock", max_retries=0, timeout=20
    )


def say(text):
    return [{"role": "user", "content": text}]


def test_a_message_is_echoed_with_usage(mock_client):
    m = mock_client.messages.create(model="claude-mock", max_tokens=64, messages=say("Hello, Claude mock"))
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text == "Hello, Claude mock"
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens == 5 and m.usage.output_tokens == 5


def test_a_stream_has_the_real_event_sequence(mock_client):
    with mock_client.messages.stream(
        model="claude-mock", max_tokens=64, messages=say("A streamed reply in many events")
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "A streamed reply in many events"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 8


def test_tool_use_and_thinking_blocks_stream_piece_by_piece(mock_client):
    call = json.dumps({"mock_tool_call": {"name": "get_weather", "arguments": {"city": "Oslo", "days": [1, 2]}}})
    with mock_client.messages.stream(model="claude-mock", max_tokens=64, messages=say(call)) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "input_json" in kinds
    block = final.content[0]
    assert (block.type, block.name, block.input) == ("tool_use", "get_weather", {"city": "Oslo", "days": [1, 2]})
    assert final.stop_reason == "tool_use"

    blocks = [
        {"type": "thinking", "thinking": "Let me think about it.", "signature": "c2lnbmF0dXJl"},
        {"type": "text", "text": "Here it is."},
    ]
    trigger = json.dumps({"mock_message": {"content": blocks}})
    with mock_client.messages.stream(model="claude-mock", max_tokens=64, messages=say(trigger)) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking == "Let me think about it."
    assert final.content[0].signature == "c2lnbmF0dXJl"
    assert final.content[1].text == "Here it is."


def test_count_tokens(mock_client):
    r = mock_client.messages.count_tokens(model="claude-mock", system="be brief", messages=say("12345678"))
    assert r.input_tokens == 4


@pytest.mark.parametrize(
    "status, error",
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (404, anthropic.NotFoundError),
        (429, anthropic.RateLimitError),
        (529, anthropic.InternalServerError),
    ],
)
def test_errors_have_the_anthropic_shape(mock_client, status, error):
    with pytest.raises(error) as raised:
        mock_client.messages.create(
            model="claude-mock", max_tokens=16, messages=say(json.dumps({"mock_error": status}))
        )
    assert raised.value.status_code == status
    assert raised.value.body["type"] == "error"


def test_a_broken_stream_raises(mock_client):
    # The connection is aborted mid-stream: the SDK's HTTP client raises.
    with pytest.raises(Exception, match="incomplete|closed|peer|protocol") as raised:
        with mock_client.messages.stream(
            model="claude-mock", max_tokens=16, messages=say(json.dumps({"mock_broken_stream": True}))
        ) as stream:
            for _ in stream:
                pass
            stream.get_final_message()
    assert "ProtocolError" in type(raised.value).__name__
