"""What a string setting may be where it reaches a host (a shell command, a unit, a configuration
file), each said in words for messages and tested; and the routes the edge may forward."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Form:
    """What a string may be where it reaches a host (a shell command, a unit, a configuration
    file): said in words for messages, and tested. Forms of values that reach shell commands
    leave out whitespace, quotes and shell metacharacters: quoting is the second line of defence."""

    what: str
    example: str
    test: Callable[[str], bool]


def _pattern(regex: str) -> Callable[[str], bool]:
    compiled = re.compile(regex, re.ASCII)
    return lambda text: compiled.fullmatch(text) is not None


def _address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return _HOST_NAME(text)


def _ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _ip_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
        return "%" not in text  # nft matches addresses, not an IPv6 address's zone
    except ValueError:
        return False


def _engine_arg(text: str) -> bool:
    return bool(text) and text.isprintable() and not any(c.isspace() for c in text)


# DNS labels; '_' too, which resolvers (and so nginx) accept in /etc/hosts names and ssh aliases.
_HOST_NAME = _pattern(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
# Components of letters, digits and ._+-, never . or .., no trailing /: a path that means one folder.
_ABSOLUTE_PATH = r"(/(?!\.\.?(/|$))[A-Za-z0-9._+-]+)+"
_HF_PART = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"

ABSOLUTE_PATH = Form("an absolute path of letters, digits and ._+- (no whitespace, shell metacharacters, "
                     "'..' or trailing '/')", "/opt/vllm-fleet", _pattern(_ABSOLUTE_PATH))
PYTHON = Form("an absolute path of letters, digits and ._+-, or a command name like python3.11",
              "python3.11", _pattern(rf"python3(\.\d+)?|{_ABSOLUTE_PATH}"))
HF_REPO_ID = Form("a Hugging Face repository id ORG/NAME of letters, digits and ._- (no '..' or '--', "
                  "neither part starting or ending with '.' or '-', 96 characters at most)",
                  "meta-llama/Llama-3.3-70B-Instruct",
                  _pattern(rf"(?!.*(\.\.|--))(?=.{{3,96}}$){_HF_PART}/{_HF_PART}"))
COMMIT = Form("a commit hash (40 lower-case hex digits)", "0123456789abcdef0123456789abcdef01234567",
              _pattern(r"[0-9a-f]{40}"))
FINGERPRINT = Form("a key fingerprint (40 upper-case hex digits, as `gpg --with-colons` prints it)",
                   "EB693B3035CD5710E231E123A4B469963BF863CC", _pattern(r"[0-9A-F]{40}"))
POSIX_USER = Form("a POSIX user name (a lower-case letter or _, then up to 31 of a-z 0-9 _ -)", "vllm",
                  _pattern(r"[a-z_][a-z0-9_-]{0,31}"))
CPU_LIST = Form("a CPU list like 0-3,8 (numbers and ranges, comma-separated)", "0-3",
                _pattern(r"\d+(-\d+)?(,\d+(-\d+)?)*"))
ADDRESS = Form("an IP address or a host name (letters, digits, '-', '_' and dots)", "10.0.0.5", _address)
URL = Form("an http or https URL of letters, digits and ._~%+,=@:/- (no whitespace or quotes)",
           "https://cuda-mirror.internal/compute/cuda/repos",
           _pattern(r"https?://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%+,=@:-]*)*"))
HTTPS_URL = Form("an https URL of letters, digits and ._~%+,=@:/- (no whitespace or quotes)",
                 "https://mirror.example.internal/grafana",
                 _pattern(r"https://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%+,=@:-]*)*"))
IP_ADDRESS = Form("an IP address (IPv4 or IPv6, no name)", "127.0.0.1", _ip_address)
# Names are refused: nft resolves a name once, when the rules load.
IP_NETWORK = Form("an IP address or network in CIDR form (e.g. 10.0.0.0/24; no host bits set, no name or %zone)",
                  "10.0.0.0/24", _ip_network)
APT_SUITE = Form("an apt suite name of letters, digits and ._- (e.g. stable)", "stable",
                 _pattern(r"[A-Za-z0-9][A-Za-z0-9._-]*"))
# What `apt-cache policy` lists and `apt-get install NAME=VERSION` takes; no epoch (no ':').
DEB_VERSION = Form("a Debian package version without epoch: a digit, then letters, digits and .+~-", "12.1.1",
                   _pattern(r"[0-9][A-Za-z0-9.+~-]*"))
# Grafana's login names, as they reach grafana.ini (no ';' or '#', which start a comment there).
GRAFANA_LOGIN = Form("1 to 64 letters, digits and ._@- starting with a letter or digit", "admin",
                     _pattern(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"))
FILE_NAME = Form("a file name of letters, digits and ._+- (no '/')", "3bf863cc.pub",
                 _pattern(r"[A-Za-z0-9][A-Za-z0-9._+-]*"))
RELEASE_NAME = Form("a manifest name of letters, digits and ._+- (the file name without .yml)",
                    "cpu-vllm-0.32.0", _pattern(r"[A-Za-z0-9][A-Za-z0-9._+-]*"))
SERVED_NAME = Form("1 to 128 letters, digits and ._:/- starting with a letter or digit (no whitespace)",
                   "llama-3.3-70b", _pattern(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"))
RELATIVE_OR_ABSOLUTE_PATH = Form("a path of letters, digits and ._+- components (no whitespace, shell "
                                 "metacharacters or '..')", "inventories/secrets/prod",
                                 _pattern(r"/?(?!\.\.?(/|$))[A-Za-z0-9._+-]+(/(?!\.\.?(/|$))[A-Za-z0-9._+-]+)*"))
DURATION = Form("a Prometheus duration: a number and one of s, m, h, d, w, y (e.g. 15d)", "15d",
                 _pattern(r"\d+[smhdwy]"))
NGINX_SIZE = Form("an nginx size: a number, optionally followed by k, m or g", "64m",
                  _pattern(r"\d+[kKmMgG]?"))
# The edge always serves these; a model's task may need more of vLLM's OpenAI routes (an
# embedding model: /v1/embeddings), never its engine-control or debugging routes.
EDGE_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")
TASK_ROUTES = ("/v1/embeddings", "/v1/responses", "/v1/audio/transcriptions", "/v1/audio/translations",
               "/v1/score", "/v1/rerank")
TASK_ROUTE = Form(f"one of vLLM's OpenAI task routes: {', '.join(TASK_ROUTES)}", "/v1/embeddings",
                  lambda text: text in TASK_ROUTES)
ENGINE_ARG = Form("one vLLM argument without whitespace (systemd splits the flags at whitespace), "
                  "e.g. '--seed' and '7' as two elements", "--seed", _engine_arg)
NET_INTERFACE = Form("a network interface name: 1 to 15 letters, digits and ._- (as `ip link` shows it)", "eth0",
                     _pattern(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,14}"))
RDMA_DEVICE = Form("an RDMA adapter name as `ibv_devices` shows it (letters, digits and _-, optionally :PORT)",
                   "mlx5_0", _pattern(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}(:[0-9]{1,2})?"))
INSTANCE_NAME = Form("1 to 32 lower-case letters, digits and '-', starting with a letter or digit "
                     "(it names the unit vllm@NAME)", "chat-1", _pattern(r"[a-z0-9][a-z0-9-]{0,31}"))
