"""MTA-STS policy hosts for paloma's tests: Python's http.server over TLS.

Usage: mta_sts_https.py HOST CERT KEY DIR
Listens on HOST:443. GET /.well-known/mta-sts.txt with `Host: mta-sts.{domain}` answers
DIR/{domain}.txt as text/plain (404 when there is none); each request is appended to
DIR/requests.log as "{host} {path}". CERT must name every mta-sts.{domain} served. Prints
"ready" once listening.
"""
import http.server
import os
import ssl
import sys

host, cert, key, root = sys.argv[1:5]


class Policy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = (self.headers.get("Host") or "").split(":")[0].lower()
        with open(os.path.join(root, "requests.log"), "a") as f:
            f.write(f"{name} {self.path}\n")
        domain = name.removeprefix("mta-sts.")
        path = os.path.join(root, f"{domain}.txt")
        if self.path != "/.well-known/mta-sts.txt" or not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer((host, 443), Policy)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
