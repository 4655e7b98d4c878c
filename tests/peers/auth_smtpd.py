"""A relay for paloma's tests: aiosmtpd with STARTTLS and AUTH (PLAIN/LOGIN), both required.

Usage: auth_smtpd.py PORT CERT KEY USER PASSWORD OUTDIR [clear]
With "clear", STARTTLS is offered but neither it nor TLS for AUTH is required (a local relay
that an operator reaches with `tls = "none"`); AUTH stays required.
Each accepted message is written to OUTDIR/<n>.eml; each AUTH attempt (whatever its outcome)
is appended to OUTDIR/auth.log as "user tls=<bool>" so a test can see that no credential
crossed an unverified or clear session. Prints "ready" once listening.
"""
import asyncio
import os
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, user, password, outdir = sys.argv[1:7]
tls_required = sys.argv[7:8] != ["clear"]
count = 0


class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        with open(os.path.join(outdir, f"{count}.eml"), "wb") as f:
            f.write(envelope.original_content or envelope.content)
        return "250 2.0.0 queued"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
        and auth_data.password.decode() == password
    with open(os.path.join(outdir, "auth.log"), "a") as f:
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        f.write(f"{login} tls={session.ssl is not None}\n")
    return AuthResult(success=ok)


ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
controller = Controller(
    Handler(),
    hostname="127.0.0.1",
    port=int(port),
    tls_context=ctx,
    require_starttls=tls_required,
    auth_required=True,
    auth_require_tls=tls_required,
    authenticator=authenticator,
)
controller.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
except KeyboardInterrupt:
    pass
finally:
    controller.stop()
