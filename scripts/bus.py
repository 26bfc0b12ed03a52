"""A small window onto Meterline's bus, for the README tour and for poking
at a running `make run` without the `nats` CLI.

    source .run/dev.env
    .tools/venv/bin/python scripts/bus.py watch                 # every event of $METERLINE_ORG, then live
    .tools/venv/bin/python scripts/bus.py watch --no-follow     # what is there now, then exit
    .tools/venv/bin/python scripts/bus.py request svc.entities.$METERLINE_ORG.product.create \
        '{"body": {"code": "compute", "name": "Compute"}}' --actor billing-engine
    .tools/venv/bin/python scripts/bus.py jobs                  # export jobs of $METERLINE_ORG, newest slot first

Connects to $NATS_URL as $NATS_USER / $NATS_PASSWORD (written to
.run/dev.env by `make run`). Needs nats-py, which `make tools` installs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

try:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import DeliverPolicy
    from nats.js.errors import BucketNotFoundError, NoKeysError
except ImportError:
    print("nats-py is not installed: run `make tools` and use .tools/venv/bin/python", file=sys.stderr)
    sys.exit(2)

EVENTS_STREAM = "EVENTS"
EXPORT_JOBS_BUCKET = "export_jobs"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
ACTOR_HEADER = "Meterline-Actor"


async def connect() -> nats.NATS:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    user = os.environ.get("NATS_USER")
    password = os.environ.get("NATS_PASSWORD")
    return await nats.connect(url, user=user, password=password, name="meterline-bus-py", max_reconnect_attempts=2)


def describe(msg) -> str:
    """One line per event: stream sequence, subject, event name, actor, and
    the entity's version and code or name."""
    seq = msg.metadata.sequence.stream
    try:
        event = json.loads(msg.data)
    except ValueError:
        return f"#{seq} {msg.subject} ({len(msg.data)} bytes, not JSON)"
    name = event.get("eventName") or (msg.headers or {}).get("Meterline-Event-Name", "?")
    state = event.get("new") or event.get("old") or {}
    label = state.get("code") or state.get("name") or ""
    old_version = (event.get("old") or {}).get("version")
    new_version = (event.get("new") or {}).get("version")
    versions = f"v{old_version or '-'}->v{new_version or '-'}"
    return f"#{seq} {msg.subject} {name} by {event.get('actor', '?')} {versions} {label}".rstrip()


async def watch(args: argparse.Namespace) -> int:
    nc = await connect()
    js = nc.jetstream()
    subject = args.subject or f"evt.{args.org}.>"
    policy = DeliverPolicy.NEW if args.new else DeliverPolicy.ALL
    # An ordered consumer: ephemeral, flow-controlled, resumes by itself.
    sub = await js.subscribe(subject, stream=EVENTS_STREAM, ordered_consumer=True, deliver_policy=policy)
    print(f"watching {subject} on stream {EVENTS_STREAM} (Ctrl-C to stop)", file=sys.stderr)
    seen = 0
    try:
        while args.count is None or seen < args.count:
            try:
                msg = await sub.next_msg(timeout=args.idle)
            except NatsTimeout:
                if args.no_follow:
                    break
                continue
            seen += 1
            if args.json:
                print(json.dumps(json.loads(msg.data), indent=2))
            else:
                print(describe(msg), flush=True)
            if args.no_follow and msg.metadata.num_pending == 0:
                break
    finally:
        await nc.drain()
    print(f"{seen} event(s)", file=sys.stderr)
    return 0


async def request(args: argparse.Namespace) -> int:
    nc = await connect()
    try:
        body = json.loads(args.payload) if args.payload else {}
        msg = await nc.request(
            args.subject,
            json.dumps(body).encode(),
            timeout=args.timeout,
            headers={ACTOR_HEADER: args.actor},
        )
    finally:
        await nc.drain()
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        print(f"error {headers[ERROR_CODE_HEADER]}: {headers.get(ERROR_HEADER, '')}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(json.loads(msg.data), indent=2))
    except ValueError:
        print(msg.data.decode(errors="replace"))
    return 0


async def jobs(args: argparse.Namespace) -> int:
    """Export job records of one org from the `export_jobs` bucket: what the
    scheduler requested (and the exporter made of it), newest slot first."""
    nc = await connect()
    records = []
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value(EXPORT_JOBS_BUCKET)
        except BucketNotFoundError:
            print("no export jobs yet (the export_jobs bucket does not exist)", file=sys.stderr)
            return 0
        try:
            keys = await kv.keys()
        except NoKeysError:
            keys = []
        for key in keys:
            if not key.startswith(f"{args.org}."):
                continue
            entry = await kv.get(key)
            record = json.loads(entry.value)
            if args.schedule and record.get("scheduleId") != args.schedule:
                continue
            records.append(record)
    finally:
        await nc.drain()
    records.sort(key=lambda r: r.get("slot", ""), reverse=True)
    for r in records[: args.limit]:
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(f"{r.get('slot')} {r.get('status'):<9} {r.get('trigger'):<9} schedule {r.get('scheduleId', '-')} job {r.get('id')}")
    print(f"{len(records)} job(s)", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Watch Meterline's events and send requests over NATS.")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("watch", help="print events from the EVENTS stream")
    w.add_argument("--org", default=os.environ.get("METERLINE_ORG", "dev"), help="organization (default $METERLINE_ORG)")
    w.add_argument("--subject", help="subject filter (default evt.<org>.>)")
    w.add_argument("--new", action="store_true", help="only events from now on")
    w.add_argument("--no-follow", action="store_true", help="exit once caught up")
    w.add_argument("--count", type=int, help="exit after this many events")
    w.add_argument("--idle", type=float, default=2.0, help="seconds without events before --no-follow exits")
    w.add_argument("--json", action="store_true", help="print each event in full")

    r = sub.add_parser("request", help="send a request to a service and print the reply")
    r.add_argument("subject", help="e.g. svc.entities.<org>.<type>.create")
    r.add_argument("payload", nargs="?", default="", help="JSON body of the request")
    r.add_argument("--actor", default="bus-cli", help="who is asking (Meterline-Actor header)")
    r.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")

    j = sub.add_parser("jobs", help="list export jobs (export_jobs bucket), newest slot first")
    j.add_argument("--org", default=os.environ.get("METERLINE_ORG", "dev"), help="organization (default $METERLINE_ORG)")
    j.add_argument("--schedule", help="only this schedule's jobs")
    j.add_argument("--limit", type=int, default=50, help="at most this many")
    j.add_argument("--json", action="store_true", help="print each record in full")

    args = parser.parse_args()
    commands = {"watch": watch, "request": request, "jobs": jobs}
    try:
        return asyncio.run(commands[args.command](args))
    except KeyboardInterrupt:
        return 0
    except nats.errors.NoServersError:
        print("cannot reach NATS: is `make run` running, and did you `source .run/dev.env`?", file=sys.stderr)
        return 1
    except nats.errors.NoRespondersError:
        print(f"no service answers {args.subject}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
