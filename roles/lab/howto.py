"""What `vllm-fleet howto` prints: how to call the lab fleet with curl and with the OpenAI SDK. Only
the text; the CLI finds the edge and streams the chat completion that follows it."""

from __future__ import annotations

from pathlib import Path


def howto_text(base_url: str, model: str, ca: Path, secrets_dir: Path, client: str) -> str:
    return f"""
The lab fleet answers at {base_url} (nginx on lab1 in front of every vLLM instance), over TLS
with a certificate of the lab fleet's own CA, to clients with a key. The model is a tiny
random-weight Llama, so its words are noise; the plumbing is real.

  export OPENAI_API_KEY=$(vllm-fleet keys show {secrets_dir} {client})
  curl -s --cacert {ca} {base_url}/models -H "Authorization: Bearer $OPENAI_API_KEY"
  curl -s --cacert {ca} {base_url}/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\
       -H 'Content-Type: application/json' -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
  curl -sN --cacert {ca} {base_url}/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'

  import os, ssl
  from openai import DefaultHttpxClient, OpenAI
  client = OpenAI(base_url="{base_url}", api_key=os.environ["OPENAI_API_KEY"],
                  http_client=DefaultHttpxClient(verify=ssl.create_default_context(cafile="{ca}")))
  for chunk in client.chat.completions.create(model="{model}", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="")

More clients: `vllm-fleet keys add {secrets_dir} NAME`, then deploy again (`make lab`).
"""
