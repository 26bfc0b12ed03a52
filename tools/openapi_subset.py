#!/usr/bin/env python3
"""Cut Meterline's OpenAPI document out of m3ter's published API document.

Usage: tools/openapi_subset.py M3TER_OPENAPI_JSON > shared/openapi/meterline.json

Meterline serves the m3ter routes listed in PATHS with m3ter's own schemas, so
field names and validation rules (required fields, lengths, patterns, enums)
come from one source. Routes Meterline adds beyond m3ter (writes of
engine-computed billing entities) are added here and marked `x-meterline`.
"""
import copy
import json
import sys

PATHS = [
    "/oauth/token",
    "/organizations/{orgId}/accounts",
    "/organizations/{orgId}/accounts/{id}",
    "/organizations/{orgId}/accountplans",
    "/organizations/{orgId}/accountplans/{id}",
    "/organizations/{orgId}/aggregations",
    "/organizations/{orgId}/aggregations/{id}",
    "/organizations/{orgId}/balances",
    "/organizations/{orgId}/balances/{id}",
    "/organizations/{orgId}/balances/{balanceId}/transactions",
    "/organizations/{orgId}/bills",
    "/organizations/{orgId}/bills/{id}",
    "/organizations/{orgId}/bills/{billId}/lineitems",
    "/organizations/{orgId}/bills/{billId}/lineitems/{id}",
    "/organizations/{orgId}/charges",
    "/organizations/{orgId}/charges/{id}",
    "/organizations/{orgId}/commitments",
    "/organizations/{orgId}/commitments/{id}",
    "/organizations/{orgId}/compoundaggregations",
    "/organizations/{orgId}/compoundaggregations/{id}",
    "/organizations/{orgId}/contracts",
    "/organizations/{orgId}/contracts/{id}",
    "/organizations/{orgId}/meters",
    "/organizations/{orgId}/meters/{id}",
    "/organizations/{orgId}/plans",
    "/organizations/{orgId}/plans/{id}",
    "/organizations/{orgId}/plangroups",
    "/organizations/{orgId}/plangroups/{id}",
    "/organizations/{orgId}/plangrouplinks",
    "/organizations/{orgId}/plangrouplinks/{id}",
    "/organizations/{orgId}/plantemplates",
    "/organizations/{orgId}/plantemplates/{id}",
    "/organizations/{orgId}/pricings",
    "/organizations/{orgId}/pricings/{id}",
    "/organizations/{orgId}/products",
    "/organizations/{orgId}/products/{id}",
    "/organizations/{orgId}/picklists/transactiontypes",
    "/organizations/{orgId}/picklists/transactiontypes/{id}",
    "/organizations/{orgId}/dataexports/destinations",
    "/organizations/{orgId}/dataexports/destinations/{id}",
    "/organizations/{orgId}/dataexports/schedules",
    "/organizations/{orgId}/dataexports/schedules/{id}",
    "/organizations/{orgId}/dataexports/adhoc",
    "/organizations/{orgId}/dataexports/jobs",
    "/organizations/{orgId}/dataexports/jobs/{id}",
    "/organizations/{orgId}/dataexports/jobs/{jobId}/getdownloadurl",
    "/organizations/{orgId}/notifications/configurations",
    "/organizations/{orgId}/notifications/configurations/{id}",
    "/organizations/{orgId}/integrationdestinations/webhooks",
    "/organizations/{orgId}/integrationdestinations/webhooks/{id}",
    "/organizations/{orgId}/integrationconfigs",
    "/organizations/{orgId}/integrationconfigs/{id}",
    "/organizations/{orgId}/scheduledevents/configurations",
    "/organizations/{orgId}/scheduledevents/configurations/{id}",
    "/organizations/{orgId}/measurements",
    "/organizations/{orgId}/fileuploads/measurements/generateUploadUrl",
    "/organizations/{orgId}/fileuploads/measurements/jobs",
    "/organizations/{orgId}/fileuploads/measurements/jobs/{id}",
    "/organizations/{orgId}/fileuploads/measurements/jobs/{id}/original",
    "/organizations/{orgId}/events",
    "/organizations/{orgId}/events/{id}",
    "/organizations/{orgId}/events/types",
    "/organizations/{orgId}/events/fields",
    "/organizations/{orgId}/notifications/evaluate",
    "/organizations/{orgId}/integrationdestinations/webhooks/{id}/active",
]

# Webhook deliveries that failed every retry, and their replay (Meterline).
DEAD_LETTER_ROUTES = {
    "/organizations/{orgId}/notifications/deadletters": ("get", "MeterlineListDeadLetters", "List webhook deliveries that failed every retry (Meterline)"),
    "/organizations/{orgId}/notifications/deadletters/{id}/replay": ("post", "MeterlineReplayDeadLetter", "Queue a dead-lettered delivery again, with the same notification id (Meterline)"),
}

# Engine-computed entities that m3ter only lets you read: Meterline accepts
# writes of them from the billing engine that computes them.
ENGINE_WRITES = {
    "/organizations/{orgId}/bills": ("post", "BillResponse", "Bill"),
    "/organizations/{orgId}/bills/{id}": ("put", "BillResponse", "Bill"),
    "/organizations/{orgId}/bills/{billId}/lineitems": ("post", "BillLineItemResponse", "BillLineItem"),
    "/organizations/{orgId}/bills/{billId}/lineitems/{id}": ("put", "BillLineItemResponse", "BillLineItem"),
    "/organizations/{orgId}/balances/{balanceId}/transactions/{id}": ("get", "BalanceTransactionResponse", "BalanceTransaction"),
}


# Meterline's own types, in the same document so one validator serves all.
EXTRA_SCHEMAS = {
    "MeterlineOrganization": {
        "type": "object",
        "description": "A Meterline organization: the tenant every other entity belongs to.",
        "required": ["name"],
        "properties": {
            "version": {"type": "integer", "format": "int64"},
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "code": {"type": "string", "minLength": 1, "maxLength": 80},
        },
    },
    "MeterlineServiceUser": {
        "type": "object",
        "description": "An automated API user of one organization; its access keys are issued separately.",
        "required": ["name"],
        "properties": {
            "version": {"type": "integer", "format": "int64"},
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
        },
    },
}


# Meterline's additions to m3ter's own schemas, each marked `x-meterline`.
ACTIVE = {
    "type": "boolean",
    "x-meterline": True,
    "description": "Meterline: whether the Schedule runs (default true). An inactive Schedule "
    "gets no export jobs; making it active again runs an export at once, then at its frequency.",
}
SCHEMA_ADDITIONS = {
    "DataExportConfigurationRequestBase": {"active": ACTIVE},
    "DataExportConfigurationResponseBase": {"active": ACTIVE},
}

# Fields Meterline adds to S3 export destinations, for S3-compatible stores
# (GCS through its XML API, MinIO, Ceph, ...). With static keys the IAM role
# is optional, so `iamRoleArn` is no longer required by the schema (the
# entities service requires it when no keys are given).
S3_DESTINATION_EXTRA = {
    "endpointUrl": {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": "^https?://\\S+$",
                    "description": "Meterline: the URL of an S3-compatible store, e.g. https://storage.googleapis.com for GCS. Absent: AWS S3.", "x-meterline": True},
    "region": {"type": "string", "minLength": 1, "maxLength": 64,
               "description": "Meterline: the bucket's region (default us-east-1).", "x-meterline": True},
    "pathStyle": {"type": "boolean",
                  "description": "Meterline: address the bucket in the path (http://host/bucket/key) rather than the host name; most S3-compatible stores need it.", "x-meterline": True},
    "accessKeyId": {"type": "string", "minLength": 1, "maxLength": 256,
                    "description": "Meterline: static access key id (an HMAC key for GCS). Absent: the exporter's own AWS identity, or `iamRoleArn` assumed by it.", "x-meterline": True},
    "secretAccessKey": {"type": "string", "minLength": 1, "maxLength": 1024,
                        "description": "Meterline: the secret of `accessKeyId`. Sealed when stored; reads show ********.", "x-meterline": True},
}

# Meterline routes beyond m3ter's.
EXTRA_PATHS = {
    "/organizations/{orgId}/dataexports/schedules/{id}/run": {
        "post": {
            "tags": ["ExportSchedule"],
            "summary": "Run an export schedule now (Meterline)",
            "description": "Queues a job for the schedule now, from its cursor: it exports what changed since the schedule's last successful export. For operators re-running a schedule after fixing a destination.",
            "operationId": "MeterlineRunExportSchedule",
            "x-meterline": True,
            "parameters": [
                {"name": "orgId", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "id", "in": "path", "required": True, "description": "The schedule's id.", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "The queued job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AdHocResponse"}}}},
                "4XX": {"$ref": "#/components/responses/Error"},
            },
        }
    },
}


def refs(node, out):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/"):
            out.add(tuple(ref.split("/")[2:4]))
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main():
    src = json.load(open(sys.argv[1]))
    paths = {p: copy.deepcopy(src["paths"][p]) for p in PATHS}
    for p, (method, schema, name) in ENGINE_WRITES.items():
        op = {
            "tags": [name],
            "summary": f"Write {name} (Meterline: from the billing engine)",
            "operationId": f"MeterlineWrite{name}{method.title()}",
            "x-meterline": True,
            "responses": {
                "200": {"description": name, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
                "4XX": {"$ref": "#/components/responses/Error"},
            },
        }
        if method != "get":
            op["requestBody"] = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}, "required": True}
        paths.setdefault(p, {})[method] = op
    for p, item in EXTRA_PATHS.items():
        paths[p] = copy.deepcopy(item)
    for p, (method, op_id, summary) in DEAD_LETTER_ROUTES.items():
        paths.setdefault(p, {})[method] = {
            "tags": ["Notifications"],
            "summary": summary,
            "operationId": op_id,
            "x-meterline": True,
            "responses": {
                "200": {"description": summary, "content": {"application/json": {"schema": {"type": "object"}}}},
                "4XX": {"$ref": "#/components/responses/Error"},
            },
        }
    doc = {
        "openapi": src["openapi"],
        "info": {
            "title": "Meterline API",
            "version": "0.1.0",
            "description": "m3ter-compatible REST API served by the Meterline gateway. "
            "Schemas are m3ter's; operations marked x-meterline are Meterline additions.",
        },
        "servers": [{"url": "/"}],
        "security": src.get("security", []),
        "paths": paths,
        "components": {"securitySchemes": src["components"].get("securitySchemes", {})},
    }
    # Schemas every registry entry uses, even where no route names them.
    seen = {("schemas", n) for n in ["AbstractResponse", "AbstractRequest", "ServiceUserResponse"]}
    todo = set()
    refs(paths, todo)
    todo |= seen
    while todo:
        kind, name = todo.pop()
        seen.add((kind, name))
        node = src["components"][kind][name]
        doc["components"].setdefault(kind, {})[name] = node
        found = set()
        refs(node, found)
        todo |= found - seen
    doc["components"]["schemas"].update(EXTRA_SCHEMAS)
    for name, props in SCHEMA_ADDITIONS.items():
        schema = copy.deepcopy(doc["components"]["schemas"][name])
        schema["properties"].update(props)
        doc["components"]["schemas"][name] = schema
    for name in ["ExportDestinationS3Request", "ExportDestinationS3Response"]:
        schema = doc["components"]["schemas"].get(name)
        if schema is None:
            continue
        schema = copy.deepcopy(schema)
        extra = copy.deepcopy(S3_DESTINATION_EXTRA)
        if name.endswith("Response"):
            extra.pop("secretAccessKey")
            for v in extra.values():
                for k in ["minLength", "maxLength", "pattern"]:
                    v.pop(k, None)
        schema["properties"].update(extra)
        if "required" in schema:
            schema["required"] = [r for r in schema["required"] if r != "iamRoleArn"]
        doc["components"]["schemas"][name] = schema
    for kind in doc["components"]:
        doc["components"][kind] = dict(sorted(doc["components"][kind].items()))
    json.dump(doc, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
