"""A receiving MTA with one fault, for paloma's exactly-once tests: aiosmtpd, no TLS, no AUTH.

Usage: faulty_smtpd.py PORT OUTDIR MODE [ARG]
Modes:
  slow SECONDS  the first message's final reply (after the dot) comes SECONDS later, as from a
                receiver whose content scan is slow; the message is kept all the same.
  drop          the second message of each session is kept, then the connection is closed
                instead of answering it: accepted, reply lost.
  throttle-once the first RCPT the receiver ever sees is answered 421 4.7.28 (a provider's
                "sending too fast"), every later one accepted; each kept message's arrival
                time (Unix seconds) is appended to OUTDIR/times.log.
  ok            every message answered at once.
Each kept message is written to OUTDIR/<n>.eml, and its recipients appended to
OUTDIR/rcpts.log (one line each), before the reply, so the test sees what the receiver has
whatever paloma was told. Prints "ready" once listening.
"""
import asyncio
import os
import sys
import time

from aiosmtpd.controller import Controller

port, outdir, mode = sys.argv[1:4]
arg = sys.argv[4] if len(sys.argv) > 4 else None
count = 0
throttled = False


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        global throttled
        if mode == "throttle-once" and not throttled:
            throttled = True
            return "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        n = count
        with open(os.path.join(outdir, f"{n}.eml"), "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(os.path.join(outdir, "rcpts.log"), "a") as f:
            for r in envelope.rcpt_tos:
                f.write(r + "\n")
        if mode == "throttle-once":
            with open(os.path.join(outdir, "times.log"), "a") as f:
                f.write("%.3f\n" % time.time())
        session.kept = getattr(session, "kept", 0) + 1
        if mode == "slow" and n == 1:
            await asyncio.sleep(float(arg))
        if mode == "drop" and session.kept == 2:
            server.transport.close()
            return "250 2.0.0 never seen"
        return "250 2.0.0 queued as %d" % n


controller = Controller(Handler(), hostname="127.0.0.1", port=int(port))
controller.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
except KeyboardInterrupt:
    pass
finally:
    controller.stop()
