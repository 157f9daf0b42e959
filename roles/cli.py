"""vllm-fleet's own commands (pyinfra does the deploying):

    python -m roles.cli settings        every setting, its type, default and meaning
    python -m roles.cli gpus            the GPU models the planner knows
    python -m roles.cli plan INVENTORY  the capacity plan of a fleet, without connecting to any host
    python -m roles.cli howto           how to call the lab fleet, then a real streamed chat
                                        completion through its load balancer with the OpenAI SDK
"""

from __future__ import annotations

import argparse
import sys
import time

from roles import settings

def lab_endpoint() -> tuple[str, str]:
    """The lab load balancer's base URL, and the model it serves (asked of the fleet itself)."""
    import requests

    from roles.lab import load_state

    lab = load_state()
    # inventories/lab.py puts the load balancer on the first lab host, on the default port.
    base_url = f"http://{lab['hosts'][0]['address']}:{settings.BY_NAME['nginx_listen_port'].default}/v1"
    models = requests.get(f"{base_url}/models", timeout=10).json()
    return base_url, models["data"][0]["id"]


def stream_chat(base_url: str, model: str, prompt: str = "Say hello to the fleet.") -> tuple[int, float, str]:
    """One streamed chat completion with the OpenAI SDK: (chunks received, seconds, text)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused-in-the-lab", max_retries=0, timeout=60)
    start, chunks, text = time.monotonic(), 0, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=24, stream=True)
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return chunks, time.monotonic() - start, "".join(text)


def howto() -> int:
    base_url, model = lab_endpoint()
    print(f"""
The lab fleet answers at {base_url} (nginx on lab1 in front of every vLLM instance).
The model is a tiny random-weight Llama, so its words are noise; the plumbing is real.

  curl -s {base_url}/models
  curl -s {base_url}/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
  curl -sN {base_url}/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="unused")
  for chunk in client.chat.completions.create(model="{model}", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="")
""")
    chunks, seconds, text = stream_chat(base_url, model)
    print(f"OpenAI SDK, streamed through the load balancer: {chunks} chunks in {seconds:.2f}s: {text!r}")
    return 0 if chunks > 1 else 1


def plan(inventory_file: str) -> int:
    """Load the inventory as pyinfra does (group data included), plan it, print it."""
    import os

    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from roles.errors import FleetConfigError
    from roles.fleet import plan_inventory
    from roles.plan_report import render

    try:
        # pyinfra's inventory loader records the file it executes on the current state.
        with ctx_state.use(State()):
            inventory = make_inventory(inventory_file, cwd=os.getcwd())
        print(render(plan_inventory(inventory)))
    except FleetConfigError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    return 0


def gpus() -> int:
    from roles.gpus import GPUS

    for key, g in GPUS.items():
        print(f"{key:10} {g.name:28} {g.memory_bytes / 2**30:6.1f} GiB  {g.bandwidth_bytes_per_s / 1e12:5.2f} TB/s"
              f"  bf16 {'yes' if g.bf16 else 'no':3}  fp8 {'yes' if g.fp8 else 'no'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["settings", "gpus", "plan", "howto"])
    parser.add_argument("inventory", nargs="?", help="inventory file, for plan")
    args = parser.parse_args(argv)
    if args.command == "settings":
        print(settings.describe())
        return 0
    if args.command == "gpus":
        return gpus()
    if args.command == "plan":
        if not args.inventory:
            parser.error("plan needs an inventory file, e.g. inventories/prod.py")
        return plan(args.inventory)
    return howto()


if __name__ == "__main__":
    sys.exit(main())
