"""Fetches the files a manifest lists from an HTTP(S) base URL into a folder, every byte checked
against the manifest's size and digest before the file takes its name; checks such a folder; lists
the files of a folder that no manifest names (the deploy prunes a host's wheel store with it).

Used for the release wheels every host pulls from the fleet's artifact cache (an nginx on one fleet
host), model files pulled from that cache, and a gated Hugging Face model downloaded once from the
Hub (or the operator's mirror) with a token. Run by the hosts' python3 (3.10+): standard library only.

A manifest: {"files": [{"path": "config.json", "size": 123, "sha256": "<64 hex>"}, {"path": ...,
"size": ..., "git_sha1": "<40 hex>"}]}; git_sha1 is the blob id the Hub publishes for files not in
LFS: sha1 over b"blob <size>\\0" + content. Exit codes: 0 done; 1 a file missing, wrong or not
fetched (each named on stderr); 2 a bad command line, manifest, token file or base URL (nothing
fetched); 130 / 143 SIGINT / SIGTERM (no partial file left).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import ssl
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

CHUNK = 1 << 20
USER_AGENT = "vllm-fleet-artifacts/1"
PROGRESS_EVERY_S = 15.0
HEX_DIGITS = {"sha256": 64, "git_sha1": 40}  # the digests an entry may carry, and their lengths in hex
DEFAULT_PORTS = {"http": 80, "https": 443}


class UsageError(Exception):
    """A bad manifest, token file, CA bundle or base URL: exit 2 before anything is fetched."""


class FileProblem(Exception):
    """What went wrong with one file, in words an operator acts on (the file's path is put in front)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that the partial files get removed."""


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    kind: str  # "sha256" or "git_sha1"
    digest: str  # lowercase hex

    def hasher(self):
        if self.kind == "sha256":
            return hashlib.sha256()
        return hashlib.sha1(b"blob %d\0" % self.size)  # git hashes the blob's header with its content


def load_manifest(filename: str) -> list[Entry]:
    """The entries of a manifest, every one checked: a manifest must never make anything write outside the folder."""
    try:
        with open(filename, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as error:
        raise UsageError(f"cannot read the manifest {filename}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(f"the manifest {filename} is not JSON: {error}") from None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, list):
        raise UsageError(f"the manifest {filename} has no list of files")
    entries = [parse_entry(item, f"{filename}: files[{index}]") for index, item in enumerate(files)]
    paths = [entry.path for entry in entries]
    for path in {path for path in paths if paths.count(path) > 1}:  # two downloads would race for one name
        raise UsageError(f"the manifest {filename} lists {path} more than once")
    return entries


def parse_entry(item: object, where: str) -> Entry:
    if not isinstance(item, dict):
        raise UsageError(f"{where} is not an object")
    path = item.get("path")
    if problem := unsafe_path(path):
        raise UsageError(f"{where}: refusing the path {path!r}: {problem}")
    size = item.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UsageError(f"{where} ({path}): size must be a whole number of bytes, not {size!r}")
    kinds = [kind for kind in HEX_DIGITS if kind in item]
    if len(kinds) != 1:
        raise UsageError(f"{where} ({path}): needs exactly one of sha256 or git_sha1")
    kind, digest = kinds[0], item[kinds[0]]
    if not isinstance(digest, str) or not re.fullmatch(f"[0-9a-fA-F]{{{HEX_DIGITS[kind]}}}", digest):
        raise UsageError(f"{where} ({path}): {kind} must be {HEX_DIGITS[kind]} hex digits, not {digest!r}")
    return Entry(path, size, kind, digest.lower())


def unsafe_path(path: object) -> str:
    """Why a manifest path could lead outside the folder or is not a plain relative name; "" when it is safe."""
    if not isinstance(path, str) or not path:
        return "a path must be a non-empty string"
    if any(ord(c) < 32 or c == "\x7f" for c in path):  # NUL; a newline would split a line of the output in two
        return "it contains a NUL or another control character"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/"):
        return "it is absolute"
    parts = path.split("/")
    if "" in parts:
        return "it has an empty component"
    if ".." in parts:
        return "it has a .. component"
    if "." in parts:  # harmless, but then two spellings would name one file
        return "it has a . component"
    return ""


def problem_with(entry: Entry, folder: str) -> str:
    """What is wrong with the file an entry names in folder; "" when it is there with its size and digest."""
    target = os.path.join(folder, entry.path)
    try:
        status = os.stat(target)
        if not stat.S_ISREG(status.st_mode):
            return "not a regular file"
        if status.st_size != entry.size:
            return size_mismatch(entry.size, status.st_size)
        hasher = entry.hasher()
        with open(target, "rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as error:
        return f"cannot read {target}: {error.strerror}"
    return "" if hasher.hexdigest() == entry.digest else digest_mismatch(entry, hasher.hexdigest())


def size_mismatch(expected: int, actual: int | str) -> str:
    return f"size mismatch: expected {expected} bytes, got {actual}"


def digest_mismatch(entry: Entry, actual: str) -> str:
    return f"{entry.kind} mismatch: expected {entry.digest}, got {actual}"


def in_parallel(function, items: list, jobs: int) -> list:
    """[function(item) for item in items] on `jobs` threads. They are daemon threads: an interrupted run exits at
    once instead of waiting for a read to time out (what they leave on disk is the caller's to clean up)."""
    results: list = [None] * len(items)
    todo = list(reversed(range(len(items))))  # list.pop() is atomic: each index goes to one thread

    def work():
        with contextlib.suppress(IndexError):
            while True:
                index = todo.pop()
                try:
                    results[index] = function(items[index])
                except Exception as error:  # raised again in the main thread, below
                    results[index] = error

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(jobs, len(items))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def mb(size: float) -> str:
    return f"{size / 1e6:.1f}"


def say(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: whole lines from several threads
    sys.stderr.flush()


def origin_of(url: str) -> tuple:
    """(scheme, host, port) with the default port filled in: what a token is bound to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is no number: an origin of its own
        port = parts.netloc
    return scheme, parts.hostname or "", port


def origin_text(url: str) -> str:
    """scheme://host[:port] of a URL, without any user:password@ (that is no origin to print)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class OriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but the Authorization header stays behind when one leaves the base URL's
    origin: the Hub redirects LFS files to a CDN with a presigned URL, which must not see the token (and S3-style
    presigned URLs answer 400 to a request that carries one). Remembers where it was sent last, for the errors."""

    def __init__(self, origin: tuple, url: str):
        self.origin = origin
        self.last_url = url

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            self.last_url = newurl
            if origin_of(newurl) != self.origin:
                new.remove_header("Authorization")
        return new


def http_problem(url: str, error: urllib.error.HTTPError) -> str:
    refused = "refused (a gated or private repository needs a valid token)"
    words = {401: refused, 403: refused, 404: "not found"}.get(error.code) or str(error.reason or "error")
    answered_by = error.url or url
    if origin_of(answered_by) != origin_of(url):
        words += f" (answered by {origin_text(answered_by)}, where {url} redirected)"
    return f"{url}: HTTP {error.code}: {words}"


def reason_words(reason: object, timeout: float) -> str:
    """Why a server could not be reached, in the words of the fix."""
    if isinstance(reason, TimeoutError):
        return f"timed out: no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing listens on that port: is the server up?)"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted ({reason.verify_message}; --ca names the CA bundle to trust)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


class Fetcher:
    """Downloads manifest entries from one base URL into one folder. The token, if any, goes only to the base URL's
    own origin. Partial files are registered so that an interrupted run can remove them all (abandon)."""

    def __init__(self, base_url: str, dest: str, token: str, timeout: float, ca: str | None):
        self.base_url = base_url.rstrip("/") + "/"
        self.origin = origin_of(base_url)
        self.dest, self.token, self.timeout = dest, token, timeout
        try:
            self.context = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as error:
            raise UsageError(f"cannot load the CA bundle {ca}: {getattr(error, 'strerror', None) or error}") from None
        self.lock = threading.Lock()  # for the partial files and the count of files done
        self.total = self.done = 0
        self.partials: set[str] = set()
        self.stopped = False

    def fetch(self, entry: Entry) -> str:
        """Fetches one entry into place: "" when it arrived whole and verified, else what went wrong."""
        url = self.base_url + urllib.parse.quote(entry.path)  # keeps "/"; "+" becomes %2B, which nginx decodes
        started = time.monotonic()
        try:
            self.download(entry, url)
        except FileProblem as problem:
            return f"{entry.path}: {problem}"
        except http.client.IncompleteRead:
            return f"{entry.path}: {url}: the server closed the connection before the end of the file"
        except TimeoutError:
            return f"{entry.path}: {url}: timed out: no data for {self.timeout:g} s"
        except OSError as error:  # a connection reset or a TLS error in the middle of the transfer
            return f"{entry.path}: {url}: the download broke off: {error.strerror or error}"
        except Exception as error:  # reported with its file rather than raised past the other files
            return f"{entry.path}: {url}: {type(error).__name__}: {error}"
        rate = entry.size / 1e6 / max(time.monotonic() - started, 1e-6)
        with self.lock:
            self.done += 1
            say(f"fetch: [{self.done}/{self.total}] {entry.path} {mb(entry.size)} MB ({rate:.1f} MB/s)")
        return ""

    def download(self, entry: Entry, url: str) -> None:
        """Streams into a hidden partial file beside the target (one file system: os.replace is atomic), hashing as
        it goes; the file takes its name only with the right size and digest."""
        target = os.path.join(self.dest, entry.path)
        with self.open(url) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) != entry.size:
                raise FileProblem(f"{size_mismatch(entry.size, int(length))} (from {url})")
            partial, descriptor = self.new_partial(target)
            try:
                with os.fdopen(descriptor, "wb") as out:
                    received, actual = self.stream(entry, response, out, url)
                if received != entry.size:
                    raise FileProblem(f"{size_mismatch(entry.size, received)} (from {url})")
                if actual != entry.digest:
                    raise FileProblem(f"{digest_mismatch(entry, actual)} (from {url})")
                try:
                    os.replace(partial, target)
                except OSError as error:
                    raise FileProblem(f"cannot put {target} in place: {error.strerror}") from None
            finally:
                self.discard(partial)

    def open(self, url: str):
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        redirects = OriginRedirects(self.origin, url)
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context), redirects)
        try:
            return opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise FileProblem(http_problem(url, error)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:  # the last two: waiting for headers
            reason = reason_words(getattr(error, "reason", error), self.timeout)
            raise FileProblem(f"cannot reach {origin_text(redirects.last_url)}: {reason}") from None

    def new_partial(self, target: str) -> tuple[str, int]:
        """A new hidden .partial file in the target's folder, made with the umask's mode (the file keeps it)."""
        folder, name = os.path.split(target)
        partial = os.path.join(folder, f".{name[:200]}.{os.urandom(4).hex()}.partial")
        with self.lock:  # abandon() holds it too: once it has run, no partial file can be made
            if self.stopped:
                raise FileProblem("interrupted")
            try:
                os.makedirs(folder, exist_ok=True)
                descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except OSError as error:
                raise FileProblem(f"cannot write in {folder}: {error.strerror}") from None
            self.partials.add(partial)
        return partial, descriptor

    def stream(self, entry: Entry, response, out, url: str) -> tuple[int, str]:
        """Copies the response into out, hashing it: (bytes received, hex digest). Never reads past the size."""
        hasher, received, last_said = entry.hasher(), 0, time.monotonic()
        while chunk := response.read(CHUNK):
            if self.stopped:
                raise FileProblem("interrupted")
            received += len(chunk)
            if received > entry.size:
                raise FileProblem(f"{size_mismatch(entry.size, 'more')} (from {url})")
            hasher.update(chunk)
            try:
                out.write(chunk)
            except OSError as error:
                raise FileProblem(f"cannot write {out.name}: {error.strerror}") from None
            if time.monotonic() - last_said >= PROGRESS_EVERY_S:
                last_said = time.monotonic()
                say(f"fetch: {entry.path} {100 * received // entry.size}% ({mb(received)} of {mb(entry.size)} MB)")
        return received, hasher.hexdigest()

    def discard(self, partial: str) -> None:
        with self.lock:
            self.partials.discard(partial)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)  # gone already when the file took its name

    def abandon(self) -> None:
        """Stops every download and removes every partial file, for an interrupted run."""
        with self.lock:
            self.stopped = True
            partials = list(self.partials)
        for partial in partials:
            self.discard(partial)


def read_token(filename: str) -> str:
    """The token from a file the deploy wrote for this command alone: removed at once, before any network I/O, so
    that nothing of it stays on the host. Never printed, not even in part."""
    try:
        try:
            with open(filename, "rb") as f:
                token = f.read().decode("ascii", "replace").strip()  # a decoding error would quote a byte of it
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filename)
    except OSError as error:
        raise UsageError(f"cannot read and remove the token file {filename}: {error.strerror}") from None
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # http.client would put a bad header value in its error message
        raise UsageError(f"the token file {filename} holds no token, or one with characters a header cannot carry")
    return token


def run_fetch(args: argparse.Namespace) -> int:
    token = read_token(args.token_file) if args.token_file else ""
    entries = load_manifest(args.manifest)
    parts = urllib.parse.urlsplit(args.base_url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise UsageError(f"the base URL must be http:// or https:// and name a host, not {args.base_url!r}")
    fetcher = Fetcher(args.base_url, args.dest, token, args.timeout, args.ca)
    started = time.monotonic()
    problems = in_parallel(lambda entry: problem_with(entry, args.dest), entries, args.jobs)
    wanted = [entry for entry, problem in zip(entries, problems) if problem]
    fetcher.total = len(wanted)
    say(f"fetch: {len(entries)} files, {mb(sum(e.size for e in entries))} MB listed; {len(entries) - len(wanted)} "
        f"already here (verified), {len(wanted)} to fetch ({mb(sum(e.size for e in wanted))} MB) "
        f"from {origin_text(args.base_url)}{parts.path}")
    try:
        failures = [failure for failure in in_parallel(fetcher.fetch, wanted, args.jobs) if failure]
    except BaseException:  # KeyboardInterrupt, Terminated
        fetcher.abandon()
        raise
    if failures:  # the token never shows, even where a server put it in its answer
        say("\n".join(failures).replace(token, "<token>") if token else "\n".join(failures))
        return 1
    summary = {"fetched": len(wanted), "kept": len(entries) - len(wanted), "bytes": sum(e.size for e in wanted),
               "seconds": round(time.monotonic() - started, 3)}
    print(f"FETCHED {json.dumps(summary)}", flush=True)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    entries = load_manifest(args.manifest)
    problems = in_parallel(lambda entry: problem_with(entry, args.dir), entries, args.jobs)
    bad = [f"{entry.path}: {problem}" for entry, problem in zip(entries, problems) if problem]
    if bad:
        say("\n".join(bad))
        return 1
    print(f"verified {len(entries)} files, {mb(sum(entry.size for entry in entries))} MB")
    return 0


def run_unlisted(args: argparse.Namespace) -> int:
    listed = {entry.path for manifest in args.manifest for entry in load_manifest(manifest)}
    try:
        with os.scandir(args.dir) as found:
            names = sorted(item.name for item in found if not item.name.startswith(".")
                           and item.is_file(follow_symlinks=False) and item.name not in listed)
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise UsageError(f"cannot list {args.dir}: {error.strerror}") from None
    for name in names:
        print(name)
    return 0


def parser_of() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch and verify the files a manifest lists")
    fetch.add_argument("--base-url", required=True, help="the URL the manifest's paths are relative to")
    fetch.add_argument("--manifest", required=True)
    fetch.add_argument("--dest", required=True, help="the folder the files go to")
    fetch.add_argument("--token-file", help="a file holding a bearer token for the base URL's origin; removed at once")
    fetch.add_argument("--jobs", type=int, default=4, help="files fetched at once")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer or data before giving up")
    fetch.add_argument("--ca", help="PEM bundle of the CAs to trust for HTTPS (default: the system's)")
    fetch.set_defaults(run=run_fetch)
    verify = commands.add_parser("verify", help="check that a folder holds the files a manifest lists")
    verify.add_argument("--manifest", required=True)
    verify.add_argument("--dir", required=True)
    verify.add_argument("--jobs", type=int, default=4, help="files hashed at once")
    verify.set_defaults(run=run_verify)
    unlisted = commands.add_parser("unlisted", help="the files directly in a folder that no manifest lists")
    unlisted.add_argument("--dir", required=True)
    unlisted.add_argument("--manifest", action="append", default=[], help="repeatable; none: every file is unlisted")
    unlisted.set_defaults(run=run_unlisted)
    return parser


def raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = parser_of()
    args = parser.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        parser.error("--jobs must be 1 or more")
    in_main_thread = threading.current_thread() is threading.main_thread()  # the one thread signals reach
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    # Started in the background of a shell, a process inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: an interrupt would leave the download running.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main_thread else None
    try:
        return args.run(args)
    except UsageError as error:
        say(f"artifacts: {error}")
        return 2
    except KeyboardInterrupt:
        say("artifacts: interrupted; no partial file left")
        return 130
    except Terminated:
        say("artifacts: terminated; no partial file left")
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)


if __name__ == "__main__":
    sys.exit(main())
