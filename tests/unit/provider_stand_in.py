"""A stand-in for a hosted OpenAI-compatible API: a second TLS endpoint on loopback with a
certificate of its own CA, its own key and its own model name."""

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from roles import secrets

PROVIDER_KEY = "provider-key-0123456789"
PROVIDER_MODEL = "provider/llama-70b"


class Provider(ThreadingHTTPServer):
    """An OpenAI-compatible API over TLS on loopback, with a certificate of its own CA for
    localhost: it answers with the model it was asked for and records every request."""

    daemon_threads = True

    def __init__(self, folder):
        self.received: list[dict] = []
        super().__init__(("127.0.0.1", 0), ProviderHandler)
        chain, key = secrets.edge_certificate(folder, "provider", ["localhost"])
        (folder / "provider.pem").write_bytes(chain)
        (folder / "provider.key").write_text(key.reveal())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / "provider.pem", folder / "provider.key")
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.ca = secrets.ca_certificate(folder)
        self.url = f"https://localhost:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ProviderHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.headers.get("Authorization") != f"Bearer {PROVIDER_KEY}":
            return self.answer(401, {"error": {"message": "bad key"}})
        return self.answer(200, {"object": "list", "data": [{"id": PROVIDER_MODEL, "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.headers.get("Authorization") != f"Bearer {PROVIDER_KEY}":
            return self.answer(401, {"error": {"message": "bad key"}})
        if not body.get("stream"):
            return self.answer(200, {"model": body["model"], "choices": [{"text": "from the provider"}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in ("from", "the", "provider"):
            chunk = {"model": body["model"], "choices": [{"delta": {"content": word}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
