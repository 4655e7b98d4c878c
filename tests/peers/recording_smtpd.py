"""A receiving MTA that records who sent each message: aiosmtpd, no TLS, no AUTH.

Usage: recording_smtpd.py PORT HOST OUTDIR [throttle-once | throttle-N | greylist]
Each kept message appends one line to OUTDIR/log.tsv before its reply:
  client address <TAB> EHLO name <TAB> recipient(s, comma-separated) <TAB> arrival (Unix s)
so a test sees which source address and name each message came from. With throttle-once,
the first RCPT the receiver ever sees is answered 421 4.7.28 (a provider's "sending too
fast") and every later one accepted; with throttle-N (throttle-3), the first N are. Prints
"ready" once listening. With greylist, each recipient's first RCPT is answered
450 4.2.0 (greylisted), and its client address and recipient appended to OUTDIR/greylisted.tsv.
"""
import asyncio
import os
import sys
import time

from aiosmtpd.controller import Controller

port, host, outdir = sys.argv[1:4]
mode = sys.argv[4] if len(sys.argv) > 4 else "ok"
greylisted = set()
throttles = 1 if mode == "throttle-once" else int(mode.split("-")[1]) if mode.startswith("throttle-") else 0


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        global throttles
        if throttles > 0:
            throttles -= 1
            return "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
        if mode == "greylist" and address not in greylisted:
            greylisted.add(address)
            with open(os.path.join(outdir, "greylisted.tsv"), "a") as f:
                f.write("%s\t%s\n" % (session.peer[0], address))
            return "450 4.2.0 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        line = "%s\t%s\t%s\t%.3f\n" % (
            session.peer[0],
            session.host_name,
            ",".join(envelope.rcpt_tos),
            time.time(),
        )
        with open(os.path.join(outdir, "log.tsv"), "a") as f:
            f.write(line)
        return "250 2.0.0 queued"


controller = Controller(Handler(), hostname=host, port=int(port))
controller.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
except KeyboardInterrupt:
    pass
finally:
    controller.stop()
