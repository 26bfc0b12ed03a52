"""A webhook receiver for the notifier's tests.

Verifies every request with the official Standard Webhooks library
(`standardwebhooks`, pinned by `make tools`), independently of the
notifier's own signing code, and records what it saw.

    receiver.py <secret>          # "whsec_<base64>" or, with --raw, any text

Prints the port it listens on (127.0.0.1, a free port) as its first line.

POST /h/<name>?plan=<a1>,<a2>,...   answers the n-th request to <name> with
the n-th action (the last one repeats; no plan means "ok"):
    ok      200
    500     500
    429:<s> 429 with Retry-After: <s>
    410     410 Gone
    hang    sends nothing for 60 seconds
    close   closes the connection without an answer
GET /log  every request so far, as a JSON list.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from standardwebhooks.webhooks import Webhook

raw = "--raw" in sys.argv
secret = [a for a in sys.argv[1:] if a != "--raw"][0]
webhook = Webhook(secret.encode() if raw else secret)

lock = threading.Lock()
log = []
counts = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, headers=None, body=b"{}"):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/log":
            with lock:
                body = json.dumps(log).encode()
            self.reply(200, {"Content-Type": "application/json"}, body)
        else:
            self.reply(404)

    def do_POST(self):
        url = urlparse(self.path)
        name = url.path.rsplit("/", 1)[-1]
        plan = parse_qs(url.query).get("plan", ["ok"])[0].split(",")
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        headers = {k: v for k, v in self.headers.items()}
        try:
            webhook.verify(data, headers)
            verified, error = True, None
        except Exception as e:  # noqa: BLE001 - recorded for the test to read
            verified, error = False, repr(e)
        with lock:
            n = counts.get(name, 0)
            counts[name] = n + 1
            action = plan[min(n, len(plan) - 1)]
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            log.append(
                {
                    "name": name,
                    "attempt": n + 1,
                    "action": action,
                    "id": headers.get("webhook-id") or headers.get("Webhook-Id"),
                    "verified": verified,
                    "error": error,
                    "apiKey": self.headers.get("x-m3ter-apikey"),
                    "receivedAt": time.time(),
                    "body": body,
                }
            )
        if action == "ok":
            self.reply(200)
        elif action == "500":
            self.reply(500)
        elif action.startswith("429"):
            after = action.split(":")[1] if ":" in action else "1"
            self.reply(429, {"Retry-After": after})
        elif action == "410":
            self.reply(410)
        elif action == "hang":
            time.sleep(60)
        elif action == "close":
            self.close_connection = True
            self.connection.close()
        else:
            self.reply(400)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that went away (a killed notifier) is part of the tests.
        pass


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
