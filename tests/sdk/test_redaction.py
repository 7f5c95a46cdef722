"""Redaction as an application meets it through the OpenAI SDK: tool calls
the policy allows keep what the policy vetted, per-tool argument modes,
per-tenant profiles, and placeholders that must survive."""

import json

import pytest
from openai import OpenAI

SECRET = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i"


def _call(client, name, arguments, stream):
    trigger = json.dumps({"mock_tool_call": {"name": name, "arguments": arguments}})
    messages = [{"role": "user", "content": trigger}]
    if stream:
        with client.chat.completions.stream(model="mock-small", messages=messages) as s:
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(model="mock-small", messages=messages)
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == [name], final
    return json.loads(calls[0].function.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_an_allowed_send_email_keeps_its_vetted_recipient(client, stream):
    # tools.yaml allows send_email to *@example.com: `to` is vetted by the
    # policy and kept; the body's other address and the key are redacted.
    args = _call(
        client,
        "send_email",
        {"to": "bob@example.com", "body": f"cc carol@corp.test, key {SECRET}"},
        stream,
    )
    assert args == {
        "to": "bob@example.com",
        "body": "cc [REDACTED:email], key [REDACTED:github-token]",
    }


@pytest.mark.parametrize("stream", [False, True])
def test_redact_arguments_secrets_keeps_personal_data(client, stream):
    # lookup_customer says `redact_arguments: secrets`.
    args = _call(
        client,
        "lookup_customer",
        {"email": "carol@corp.test", "phone": "+44 20 7946 0958", "note": SECRET},
        stream,
    )
    assert args == {
        "email": "carol@corp.test",
        "phone": "+44 20 7946 0958",
        "note": "[REDACTED:github-token]",
    }


def test_unconstrained_arguments_are_redacted_in_full(client):
    # get_weather's `city` has only a length limit: nothing is vetted.
    args = _call(client, "get_weather", {"city": "carol@corp.test"}, False)
    assert args == {"city": "[REDACTED:email]"}


def _reply(stack, tenant, text, stream):
    client = OpenAI(
        base_url=stack.base_url,
        api_key=stack.token("sdk-user", "user", tenant=tenant),
        max_retries=0,
        timeout=20,
    )
    messages = [{"role": "user", "content": text}]
    if not stream:
        return client.chat.completions.create(model="mock-small", messages=messages).choices[0].message.content
    out = ""
    for chunk in client.chat.completions.create(model="mock-small", messages=messages, stream=True):
        for c in chunk.choices:
            out += c.delta.content or ""
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_tenant_profiles(stack, stream):
    text = f"call +44 20 7946 0958 or mail carol@corp.test; key {SECRET}"
    # The default profile redacts everything.
    assert _reply(stack, "sdk", text, stream) == (
        "call [REDACTED:phone] or mail [REDACTED:email]; key [REDACTED:github-token]"
    )
    # example-support keeps contact details (profile `support`).
    assert _reply(stack, "example-support", text, stream) == (
        "call +44 20 7946 0958 or mail carol@corp.test; key [REDACTED:github-token]"
    )
    # example-clinic also redacts dates of birth, and says only the kind.
    assert _reply(stack, "example-clinic", f"DOB: 04/07/1981, {text}", stream) == (
        "DOB: [REDACTED:pii], call [REDACTED:pii] or mail [REDACTED:pii]; key [REDACTED:secret]"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_placeholders_and_references_survive(stack, stream):
    text = (
        "password: ${DB_PASSWORD}\n"
        "export API_KEY=$API_KEY\n"
        'api_key = os.environ["OPENAI_API_KEY"]\n'
        "token: {{ secrets.TOKEN }}\n"
        "key: <YOUR_API_KEY>\n"
        "secret: ********\n"
        "db_password: changeme\n"
        "STRIPE_KEY=your-api-key-here\n"
        "const apiKey = process.env.API_KEY;"
    )
    assert _reply(stack, "sdk", text, stream) == text
