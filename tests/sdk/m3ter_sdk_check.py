"""Drives Meterline with m3ter's official Python SDK, as a customer would.

The SDK is pointed at Meterline by its base URL and otherwise used as
documented: it fetches its own bearer token from /oauth/token with the
access key and secret (HTTP Basic), then calls the REST routes.

Environment:
    METERLINE_URL     gateway base URL, e.g. http://127.0.0.1:8080
    METERLINE_ORG     organization id
    METERLINE_KEY     service-user access key
    METERLINE_SECRET  service-user secret

Run with the SDK installed by `make tools`:
    .tools/venv/bin/python tests/sdk/m3ter_sdk_check.py
Exits 0 when every check passes; otherwise prints what differed and exits 1.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys
import time
import traceback
from typing import Any, Callable, NoReturn

try:
    import httpx
    import m3ter
    from m3ter import M3ter
except ImportError:  # pragma: no cover - depends on the environment
    print("m3ter SDK is not installed: run `make tools` and use .tools/venv/bin/python", file=sys.stderr)
    sys.exit(2)


class Mismatch(Exception):
    """The server answered, but not as m3ter would."""


PASSED: list[str] = []


def fail(message: str) -> NoReturn:
    raise Mismatch(message)


def expect(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def expect_eq(actual: Any, expected: Any, what: str) -> None:
    if actual != expected:
        fail(f"{what}: expected {expected!r}, got {actual!r}")


def expect_raises(error: type[Exception], status: int, what: str, call: Callable[[], Any]) -> Exception:
    try:
        result = call()
    except error as e:
        code = getattr(e, "status_code", None)
        expect_eq(code, status, f"{what}: HTTP status of {error.__name__}")
        return e
    except m3ter.APIStatusError as e:
        fail(f"{what}: expected {error.__name__} ({status}), got {type(e).__name__} ({e.status_code}): {e.message}")
    fail(f"{what}: expected {error.__name__} ({status}), but the call succeeded and returned {result!r}")


def check(name: str) -> Callable[[Callable[[], Any]], Any]:
    """Runs the decorated function now, as one named check."""

    def run(fn: Callable[[], Any]) -> Any:
        result = fn()
        PASSED.append(name)
        print(f"  ok  {name}")
        return result

    return run


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        print(f"error: {name} is not set (source .run/dev.env after `make run`)", file=sys.stderr)
        sys.exit(2)
    return value


def main() -> None:
    base_url = env("METERLINE_URL")
    org_id = env("METERLINE_ORG")
    api_key = env("METERLINE_KEY")
    api_secret = env("METERLINE_SECRET")

    client = M3ter(api_key=api_key, api_secret=api_secret, org_id=org_id, base_url=base_url, timeout=30.0)
    # For calls whose error is the point of the check: no retries (the SDK
    # retries 409 by default, which would only slow the check down).
    strict = client.with_options(max_retries=0)
    # Unique per run, so the check can run again against the same org.
    run = secrets.token_hex(4)
    print(f"m3ter SDK {m3ter.__version__} against {base_url}, org {org_id}, run {run}")

    @check("wrong secret is refused with AuthenticationError (401)")
    def _() -> None:
        bad = M3ter(
            api_key=api_key, api_secret=api_secret + "x", org_id=org_id, base_url=base_url, max_retries=0
        )
        expect_raises(m3ter.AuthenticationError, 401, "token with a wrong secret", lambda: bad.products.list())

    @check("create product")
    def product() -> Any:
        p = client.products.create(code=f"sdk_product_{run}", name="SDK check product")
        expect(bool(p.id), "created product has no id")
        expect_eq(p.code, f"sdk_product_{run}", "product code")
        expect_eq(p.version, 1, "version of a new product")
        return p

    @check("create meter (dataFields, derivedFields)")
    def meter() -> Any:
        m = client.meters.create(
            code=f"sdk_meter_{run}",
            name="SDK check meter",
            product_id=product.id,
            data_fields=[
                {"category": "MEASURE", "code": "bytes", "name": "Bytes", "unit": "By"},
                {"category": "WHO", "code": "customer", "name": "Customer"},
            ],
            derived_fields=[
                {"category": "MEASURE", "code": "gigabytes", "name": "Gigabytes", "unit": "GBy",
                 "calculation": "bytes / 1000000000"},
            ],
        )
        expect(bool(m.id), "created meter has no id")
        expect_eq(m.product_id, product.id, "meter productId")
        expect_eq([f.code for f in (m.data_fields or [])], ["bytes", "customer"], "meter dataFields codes")
        expect_eq([f.code for f in (m.derived_fields or [])], ["gigabytes"], "meter derivedFields codes")
        return m

    @check("create account")
    def account() -> Any:
        a = client.accounts.create(
            code=f"sdk_account_{run}", name="SDK check account", email_address="billing@example.com"
        )
        expect(bool(a.id), "created account has no id")
        expect_eq(a.email_address, "billing@example.com", "account emailAddress")
        expect_eq(a.version, 1, "version of a new account")
        return a

    @check("create plan template")
    def plan_template() -> Any:
        t = client.plan_templates.create(
            name="SDK check template",
            code=f"sdk_template_{run}",
            product_id=product.id,
            currency="USD",
            bill_frequency="MONTHLY",
            standing_charge=0,
        )
        expect(bool(t.id), "created plan template has no id")
        expect_eq(t.product_id, product.id, "plan template productId")
        return t

    @check("create plan")
    def plan() -> Any:
        p = client.plans.create(code=f"sdk_plan_{run}", name="SDK check plan", plan_template_id=plan_template.id)
        expect(bool(p.id), "created plan has no id")
        expect_eq(p.plan_template_id, plan_template.id, "plan planTemplateId")
        return p

    @check("create account plan (account + plan)")
    def account_plan() -> Any:
        ap = client.account_plans.create(
            account_id=account.id, plan_id=plan.id, start_date="2026-01-01T00:00:00Z"
        )
        expect(bool(ap.id), "created account plan has no id")
        expect_eq(ap.account_id, account.id, "account plan accountId")
        expect_eq(ap.plan_id, plan.id, "account plan planId")
        return ap

    @check("create commitment")
    def commitment() -> Any:
        c = client.commitments.create(
            account_id=account.id,
            amount=1200.0,
            currency="USD",
            start_date="2026-01-01",
            end_date="2027-01-01",
        )
        expect(bool(c.id), "created commitment has no id")
        expect_eq(c.account_id, account.id, "commitment accountId")
        expect_eq(c.amount, 1200.0, "commitment amount")
        return c

    @check("retrieve each created entity")
    def _() -> None:
        for resource, created in [
            (client.products, product),
            (client.meters, meter),
            (client.accounts, account),
            (client.plan_templates, plan_template),
            (client.plans, plan),
            (client.account_plans, account_plan),
            (client.commitments, commitment),
        ]:
            got = resource.retrieve(created.id)
            expect_eq(got.id, created.id, f"retrieved {type(got).__name__} id")
            expect_eq(got.version, created.version, f"retrieved {type(got).__name__} version")

    @check("update account with its version")
    def updated() -> Any:
        u = client.accounts.update(
            account.id,
            code=account.code,
            email_address=account.email_address,
            name="SDK check account (renamed)",
            version=account.version,
        )
        expect_eq(u.name, "SDK check account (renamed)", "updated account name")
        expect_eq(u.version, account.version + 1, "version after update")
        again = client.accounts.retrieve(account.id)
        expect_eq((again.name, again.version), (u.name, u.version), "account read back after update")
        return u

    @check("update with a stale version raises ConflictError (409)")
    def _() -> None:
        expect_raises(
            m3ter.ConflictError,
            409,
            "update with a stale version",
            lambda: strict.accounts.update(
                account.id,
                code=account.code,
                email_address=account.email_address,
                name="lost update",
                version=account.version,
            ),
        )
        now = client.accounts.retrieve(account.id)
        expect_eq(now.name, updated.name, "account name after a refused update")

    @check("notifications: webhook, rule with m3ter's 90% calculation, link; set_active")
    def webhook() -> Any:
        hook = client.webhooks.create(
            name=f"sdk_hook_{run}",
            description="SDK check webhook",
            url="https://hooks.example.com/m3ter",
            credentials={"type": "M3TER_SIGNED_REQUEST", "api_key": "sdk-key", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        )
        expect(bool(hook.id), "created webhook has no id")
        rule = client.notification_configurations.create(
            code=f"sdk_rule_{run}",
            name="Commitment 90% spent",
            description="SDK check rule",
            event_name="configuration.commitment.updated",
            calculation="(new.amountSpent >= ((new.amount*100)/90)) AND ((old.amountSpent <= ((old.amount*100)/90)) OR (old.amountSpent == null))",
            active=True,
        )
        expect(bool(rule.id), "created notification rule has no id")
        link = client.integration_configurations.create(
            entity_type="Notification", entity_id=rule.id, destination="Webhook", destination_id=hook.id
        )
        expect(bool(link.id), "created integration config has no id")
        off = client.webhooks.set_active(hook.id, active=False)
        expect_eq(off.active, False, "webhook active after set_active(active=False)")
        return hook

    @check("a notification calculation that does not parse raises BadRequestError (400)")
    def _() -> None:
        e = expect_raises(
            m3ter.BadRequestError,
            400,
            "a rule whose calculation does not parse",
            lambda: strict.notification_configurations.create(
                code=f"sdk_bad_rule_{run}", name="bad", description="bad",
                event_name="configuration.account.updated", calculation="new.amount >",
            ),
        )
        expect("at position" in str(e), f"the error names no position: {e}")

    @check("events: list by resource, retrieve, get_types, get_fields")
    def _() -> None:
        deadline = time.monotonic() + 30
        while True:
            events = list(client.events.list(resource_id=webhook.id, page_size=10))
            if len(events) >= 2:
                break
            expect(time.monotonic() < deadline, f"{len(events)} events of the webhook after 30 s, expected 2")
            time.sleep(0.05)
        names = [e.event_name for e in events]
        expect_eq(names, ["configuration.webhook.created", "configuration.webhook.updated"], "the webhook's events")
        one = client.events.retrieve(events[0].id)
        expect_eq((one.id, one.event_name), (events[0].id, events[0].event_name), "retrieved event")
        types = client.events.get_types()
        expect("configuration.commitment.updated" in (types.events or []), "commitment events missing from get_types")
        fields = client.events.get_fields(event_name="configuration.commitment.updated")
        got = (fields.events or {}).get("configuration.commitment.updated", {})
        expect_eq(got.get("new.amountSpent"), "double", "type of new.amountSpent")

    @check("invalid body raises BadRequestError (400)")
    def _() -> None:
        expect_raises(
            m3ter.BadRequestError,
            400,
            "meter without dataFields",
            lambda: strict.meters.create(
                code=f"sdk_bad_meter_{run}", name="no data fields", data_fields=[], derived_fields=[]
            ),
        )

    @check("list with pageSize smaller than the count pages via nextToken")
    def _() -> None:
        codes = [f"sdk_page_{run}_{i}" for i in range(5)]
        for c in codes:
            client.accounts.create(code=c, name=f"SDK paging {c}", email_address="paging@example.com")
        first = client.accounts.list(page_size=2)
        expect_eq(len(first.data), 2, "items on the first page of size 2")
        expect(bool(first.next_token), "first page of size 2 has no nextToken, though there are more accounts")
        pages = list(first.iter_pages())
        expect(len(pages) >= 3, f"expected at least 3 pages of 2 for 6 or more accounts, got {len(pages)}")
        for i, page in enumerate(pages):
            expect(len(page.data) <= 2, f"page {i} has {len(page.data)} items, more than pageSize 2")
        ids = [a.id for a in client.accounts.list(page_size=2)]  # the auto-paginating iterator
        expect_eq(len(ids), len(set(ids)), "number of distinct ids across pages (an account repeated)")
        seen = {a.code for a in client.accounts.list(page_size=2)}
        missing = [c for c in codes + [account.code] if c not in seen]
        expect(not missing, f"accounts missing from the paged list: {missing}")

    @check("usage.submit: accepted once, a resend is all duplicates, an unknown meter is rejected, [] is a 400")
    def _() -> None:
        ts = datetime.datetime(2026, 1, 15, 10, 0, tzinfo=datetime.timezone.utc)
        measurements = [
            {"uid": f"sdk_submit_{run}_{i}", "meter": meter.code, "account": account.code,
             "ts": ts, "ets": ts + datetime.timedelta(minutes=5), "measure": {"bytes": i * 1000}}
            for i in range(5)
        ]
        first = client.usage.submit(measurements=measurements)
        expect_eq(first.result, "accepted", "result of a submit")
        counts = lambda r: tuple(r.to_dict().get(k) for k in ("accepted", "duplicates", "rejected"))
        expect_eq(counts(first), (5, 0, 0), "(accepted, duplicates, rejected) of a first submit")
        again = client.usage.submit(measurements=measurements)
        expect_eq((again.result, counts(again)), ("accepted", (0, 5, 0)), "result and counts of a resend")
        mixed = client.usage.submit(measurements=[
            {"uid": f"sdk_submit_{run}_x", "meter": f"no_such_meter_{run}", "account": account.code, "ts": ts},
            {"uid": f"sdk_submit_{run}_5", "meter": meter.code, "account": account.code, "ts": ts},
        ])
        expect_eq(counts(mixed), (1, 0, 1), "(accepted, duplicates, rejected) with an unknown meter")
        errors = mixed.to_dict().get("errors") or []
        expect_eq([e.get("errorType") for e in errors], ["UndefinedMeter"], "errorType of the rejected one")
        expect_raises(m3ter.BadRequestError, 400, "submit of no measurements", lambda: strict.usage.submit(measurements=[]))

    @check("file upload: generate_upload_url, PUT to the URL with its headers, jobs.retrieve, jobs.list, original")
    def _() -> None:
        rows = [
            {"uid": f"sdk_upload_{run}_{i}", "meter": meter.code, "account": account.code,
             "ts": "2026-01-15T10:00:00Z", "measure": {"bytes": i * 1000}}
            for i in range(25)
        ]
        data = json.dumps(rows).encode()
        upload = client.usage.file_uploads.generate_upload_url(
            content_length=len(data), content_type="application/json", file_name=f"sdk_{run}.json"
        )
        expect(bool(upload.job_id), "generate_upload_url returned no jobId")
        expect(bool(upload.url), "generate_upload_url returned no url")
        # As with an S3 presigned URL: a plain PUT with the returned headers, no token.
        put = httpx.put(upload.url, content=data, headers=upload.headers or {}, timeout=30.0)
        expect_eq(put.status_code, 200, f"status of the PUT to the upload URL ({put.text})")
        replay = httpx.put(upload.url, content=data, headers=upload.headers or {}, timeout=30.0)
        expect_eq(replay.status_code, 409, "status of a second PUT to the same upload URL")
        # Poll with a deadline until the job is final.
        deadline = time.monotonic() + 60
        while True:
            job = client.usage.file_uploads.jobs.retrieve(upload.job_id)
            if job.status in ("succeeded", "failed"):
                break
            expect(time.monotonic() < deadline, f"upload job still {job.status} after 60 s")
            time.sleep(0.05)
        expect_eq(
            (job.status, job.total_rows, job.processed_rows, job.failed_rows, job.file_name, job.content_length),
            ("succeeded", 25, 25, 0, f"sdk_{run}.json", len(data)),
            "finished upload job (status, totalRows, processedRows, failedRows, fileName, contentLength)",
        )
        listed = [j.id for j in client.usage.file_uploads.jobs.list(page_size=10)]
        expect(upload.job_id in listed, "the upload job is not listed")
        original = client.usage.file_uploads.jobs.get_original_download_url(upload.job_id)
        got = httpx.get(original.url, headers=original.headers or {}, timeout=30.0)
        expect_eq(got.status_code, 200, "status of the download of the original file")
        expect(got.content == data, "the downloaded original differs from the uploaded file")

    @check("data export: ad hoc export of accounts, its job, and the download URL of its file")
    def _() -> None:
        adhoc = client.data_exports.create_adhoc(operational_data_types=["ACCOUNTS"], source_type="OPERATIONAL")
        deadline = time.monotonic() + 60
        while True:
            job = client.data_exports.jobs.retrieve(adhoc.job_id)
            if job.status in ("SUCCEEDED", "FAILED"):
                break
            expect(time.monotonic() < deadline, f"export job still {job.status} after 60 s")
            time.sleep(0.05)
        expect_eq((job.status, job.source_type), ("SUCCEEDED", "OPERATIONAL"), "finished export job (status, sourceType)")
        listed = [j.id for j in client.data_exports.jobs.list(page_size=10)]
        expect(adhoc.job_id in listed, "the export job is not listed")
        link = client.data_exports.jobs.get_download_url(adhoc.job_id)
        expect(link.expiration_time is not None, "the download URL has no expirationTime")
        got = httpx.get(link.url, timeout=30.0)
        expect_eq(got.status_code, 200, "status of the download of the exported file")
        header = got.text.split("\r\n", 1)[0].split(",")
        expect(header[0] == "id" and header[-1] == "deleted", f"unexpected CSV header {header!r}")
        expect(account.id in got.text, "the exported file lacks the account")

    @check("delete, then retrieve raises NotFoundError (404)")
    def _() -> None:
        for resource, created in [
            (client.commitments, commitment),
            (client.account_plans, account_plan),
            (client.meters, meter),
        ]:
            resource.delete(created.id)
            expect_raises(
                m3ter.NotFoundError,
                404,
                f"retrieve a deleted {type(created).__name__}",
                lambda: resource.retrieve(created.id),
            )
        listed = {m.id for m in client.meters.list(page_size=100)}
        expect(meter.id not in listed, "a deleted meter is still listed")


if __name__ == "__main__":
    try:
        main()
    except Mismatch as e:
        print(f"FAIL: {e}", file=sys.stderr)
        print(f"m3ter SDK check: {len(PASSED)} passed, 1 failed", file=sys.stderr)
        sys.exit(1)
    except m3ter.APIStatusError as e:
        print(f"FAIL: unexpected HTTP {e.status_code} from {e.request.method} {e.request.url}: {e.message}", file=sys.stderr)
        print(f"response body: {e.body!r}", file=sys.stderr)
        print(f"m3ter SDK check: {len(PASSED)} passed, 1 failed", file=sys.stderr)
        sys.exit(1)
    except Exception:  # noqa: BLE001 - any other failure is a failed check too
        traceback.print_exc()
        print(f"m3ter SDK check: {len(PASSED)} passed, 1 failed", file=sys.stderr)
        sys.exit(1)
    print(f"m3ter SDK check: {len(PASSED)} passed, 0 failed")
