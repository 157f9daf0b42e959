"""The prefix policy's key function (roles/files/prefix_key.js) run by the njs CLI, the same njs as
nginx's module (Debian's `njs` package; the Makefile installs it), on sample request bodies."""

import json
import shutil
import subprocess

import pytest

from roles import paths

NJS = shutil.which("njs")
pytestmark = pytest.mark.skipif(NJS is None, reason="njs is not installed (the Makefile installs Debian's njs)")

CHAT = {"model": "tiny", "messages": [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "image_url", "image_url": {"url": "x"}},
                                 {"type": "text", "text": "this."}]},
    {"role": "assistant", "content": None},
]}


def keys(cases: list[dict]) -> list[str]:
    """prefixKey(r) for each case's fake request (uri, body, chars; body None: a body in a file,
    which nginx's requestText refuses), run by njs importing the module as nginx does."""
    script = (
        "import key from 'prefix_key.js';\n"
        f"var cases = {json.dumps(cases)};\n"
        "var out = cases.map(function (c) {\n"
        "    var r = {uri: c.uri, variables: {vllm_fleet_prefix_chars: String(c.chars)}};\n"
        "    Object.defineProperty(r, 'requestText', {get: function () {\n"
        "        if (c.body === null) { throw new Error('request body is in a file'); }\n"
        "        return c.body; }});\n"
        "    return key.prefixKey(r);\n"
        "});\n"
        "console.log(JSON.stringify(out));\n")
    done = subprocess.run([NJS, "-p", str(paths.PREFIX_KEY_JS.parent), "-"], input=script, capture_output=True,
                          text=True, timeout=30, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def case(uri: str, body, chars: int = 1024) -> dict:
    return {"uri": uri, "body": body if body is None or isinstance(body, str) else json.dumps(body), "chars": chars}


def test_chat_messages_are_joined_in_order_text_parts_only():
    assert keys([case("/v1/chat/completions", CHAT)]) == ["You are a careful assistant.Describe this."]


def test_a_conversation_keys_by_its_opening_whatever_its_later_turns():
    opening = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Conversation 7"}]
    turns = [opening, opening + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}]]
    other = [opening[0], {"role": "user", "content": "Conversation 8"}]
    found = keys([case("/v1/chat/completions", {"messages": m}) for m in [*turns, other]])
    assert found == ["Be brief. Conversation 7", "Be brief. Conversation 7", "Be brief. Conversation 8"]


def test_completions_take_the_prompt_or_the_first_of_a_batch():
    assert keys([case("/v1/completions", {"prompt": "Once upon a time"}),
                 case("/v1/completions", {"prompt": ["First prompt", "second"]}),
                 case("/v1/completions", {"prompt": [1, 2, 3]})]) == ["Once upon a time", "First prompt", ""]


def test_the_key_is_the_first_prefix_chars_characters():
    long_system = {"messages": [{"role": "system", "content": "S" * 40}, {"role": "user", "content": "question"}]}
    assert keys([case("/v1/chat/completions", long_system, chars=16),
                 case("/v1/completions", {"prompt": "é" * 30}, chars=16)]) == ["S" * 16, "é" * 16]


@pytest.mark.parametrize("uri, body", [
    ("/v1/chat/completions", "not json"),
    ("/v1/chat/completions", ""),
    ("/v1/chat/completions", "null"),
    ("/v1/chat/completions", {"prompt": "a completion's body on the chat route"}),
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/completions", {"messages": [{"role": "user", "content": "a chat body on the completions route"}]}),
    ("/v1/models", {"prompt": "no prompt route"}),
    ("/v1/completions", None),
])
def test_no_prompt_gives_no_key(uri, body):
    assert keys([case(uri, body)]) == [""]
