"""Checks the fallback provider from a load balancer, as nginx will reach it: GET {base}/models
over TLS with the certificate checked against the given CAs and the provider's key, and the
provider's model among those it lists. Prints one JSON object: ok, reachable, problem (never the
key, which is read from a root-only file: an argument would show in `ps`).

Run by the deploy before nginx is given the key, and by the smoke test; python3's standard
library only, as on any Debian or Ubuntu host.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request


def probe(models_url: str, ca_file: str, key_file: str, model: str, timeout: float) -> dict:
    """What the provider says to the key: ok; refused (reachable, not ok); or not reached."""
    with open(key_file, encoding="utf-8") as f:
        key = f.read().strip()
    request = urllib.request.Request(models_url, headers={"Authorization": f"Bearer {key}",
                                                          "Accept": "application/json"})
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout) as response:
            listed = [entry.get("id") for entry in json.load(response).get("data", [])]
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return outcome(False, True, f"the provider refused its key: HTTP {error.code} from {models_url}")
        return outcome(False, False, f"HTTP {error.code} from {models_url}")
    except ssl.SSLCertVerificationError as error:
        return outcome(False, True, f"the provider's certificate is not trusted by {ca_file}: {error.verify_message}")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):
            return outcome(False, True, f"the provider's certificate is not trusted by {ca_file}: "
                           f"{reason.verify_message}")
        return outcome(False, False, f"{models_url} could not be reached: {reason}")
    except (ValueError, AttributeError):
        return outcome(False, True, f"{models_url} did not answer with an OpenAI model list")
    if model not in listed:
        shown = ", ".join(str(name) for name in listed[:10]) or "none"
        return outcome(False, True, f"the provider lists no model {model!r} (it lists {shown})")
    return outcome(True, True, "")


def outcome(ok: bool, reachable: bool, problem: str) -> dict:
    return {"ok": ok, "reachable": reachable, "problem": problem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-url", required=True)
    parser.add_argument("--ca", required=True, help="PEM file of the CAs the provider's certificate must chain to")
    parser.add_argument("--key-file", required=True, help="root-only file holding the provider's key")
    parser.add_argument("--model", required=True, help="the provider's name for the fleet's model")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.models_url, args.ca, args.key_file, args.model, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
