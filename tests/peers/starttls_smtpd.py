"""An MX host for paloma's tests: aiosmtpd offering STARTTLS (not requiring it).

Usage: starttls_smtpd.py HOST PORT CERT KEY OUTDIR
Each accepted message is written to OUTDIR/<n>.eml, and "tls=<bool>" appended to
OUTDIR/sessions.log, so a test can see it came over TLS. Prints "ready" once listening.
"""
import asyncio
import os
import ssl
import sys

from aiosmtpd.controller import Controller

host, port, cert, key, outdir = sys.argv[1:6]
count = 0


class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        with open(os.path.join(outdir, f"{count}.eml"), "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(os.path.join(outdir, "sessions.log"), "a") as f:
            f.write(f"tls={session.ssl is not None}\n")
        return "250 2.0.0 queued"


ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
controller = Controller(Handler(), hostname=host, port=int(port), tls_context=ctx)
controller.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
except KeyboardInterrupt:
    pass
finally:
    controller.stop()
