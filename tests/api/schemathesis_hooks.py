"""Hooks for the schemathesis run of tests/api/schemathesis.rs against quotad's /openapi.json.

- Each call carries the token of its scope: the admin token on the admin calls (a user's plan,
  reconcile, the usage export) and on the usage page, the gateway token on every other call. The tokens come from
  QUOTAD_ST_ADMIN_TOKEN and QUOTAD_ST_GATEWAY_TOKEN, which the Rust test sets.
- No decision body whose `items` name one type twice (filter_body): JSON Schema cannot rule it out.
- No `deny_status` query on the gate (before_call): that form, for nginx, answers without a body.
- The check `json_error_body`: every 4xx quotad answers is the JSON error body
  {"error": "<sentence>", "code": "<CODE>"}, plus a string `field` when present, and nothing else
  (a refused consume, 402, is the decision with `error` and `code`). The usage page's own 401 and
  403 are HTML pages (documented as text/html) and are exempt.
"""

import json
import os
import re

import schemathesis

ADMIN = os.environ["QUOTAD_ST_ADMIN_TOKEN"]
GATEWAY = os.environ["QUOTAD_ST_GATEWAY_TOKEN"]

ADMIN_PATHS = re.compile(
    r"^(/v1/users/[^/]+/(plan|account|limits)|/v1/accounts/[^/]+/(plan|limits)|/v1/admin/(reconcile|usage/export)|/ui/users/[^/]+)$"
)


@schemathesis.auth(refresh_interval=None)
class ScopedToken:
    """The admin token on admin calls and the usage page, the gateway token on the others."""

    def get(self, case, ctx):
        return {"admin": ADMIN, "gateway": GATEWAY}

    def set(self, case, tokens, ctx):
        scope = "admin" if ADMIN_PATHS.match(case.operation.path.replace("{user_id}", "x").replace("{account_id}", "x")) else "gateway"
        case.headers = dict(case.headers or {})
        case.headers["Authorization"] = f"Bearer {tokens[scope]}"


@schemathesis.check
def json_error_body(ctx, response, case):
    """Every 4xx is {"error": "<sentence>", "code": "<CODE>"} (plus `field`), as JSON."""
    status = response.status_code
    # The gate's deny_status form (for nginx's auth_request) sends every answer that is not 2xx
    # as 401 or 403 with the real status in Quotad-Status: check the body as that status.
    real = response.headers.get("quotad-status")
    carried = None
    if real:
        status = int(real[0] if isinstance(real, list) else real)
        carried = response.headers.get("quotad-body")
        carried = carried[0] if isinstance(carried, list) else carried
    if not 400 <= status < 500:
        return None
    if carried is not None:
        # The deny_status form: no body; the JSON body travels in Quotad-Body.
        return check_error_body(status, carried)
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if case.operation.path.startswith("/ui/") and status in (401, 403) and content_type.startswith("text/html"):
        return None
    if not content_type.startswith("application/json"):
        raise AssertionError(f"{status} answered with content-type {content_type!r}, not JSON")
    try:
        body = response.json()
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        raise AssertionError(f"{status} answered a body that is not JSON: {exc}") from exc
    return check_body(status, body)


def check_error_body(status, text):
    """The JSON body carried in the Quotad-Body header, checked as a body."""
    try:
        body = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        raise AssertionError(f"{status} carried a Quotad-Body that is not JSON: {exc}") from exc
    return check_body(status, body)


def check_body(status, body):
    """{"error": "<sentence>", "code": "<CODE>"} (plus `field`); a 402 is the decision besides."""
    if not isinstance(body, dict):
        raise AssertionError(f"{status} answered {body!r}, not an object")
    for key in ("error", "code"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise AssertionError(f"{status} answered without a string {key!r}: {body!r}")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", body["code"]):
        raise AssertionError(f"{status} code {body['code']!r} is not an UPPER_SNAKE code")
    if "field" in body and not isinstance(body["field"], str):
        raise AssertionError(f"{status} field is not a string: {body!r}")
    # A refused consume (402) is the decision with `error` and `code` added; every other 4xx is
    # the error body alone.
    extra = set(body) - {"error", "code", "field"}
    if extra and status != 402:
        raise AssertionError(f"{status} error body has other keys {sorted(extra)}: {body!r}")
    return None



@schemathesis.hook
def filter_body(ctx, body):
    """No decision body whose `items` name one type twice: quotad refuses it (400 INVALID_ITEMS,
    "send each type once"), and no JSON Schema can say "each item's type at most once".
    tests/api/items.rs covers that refusal."""
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        types = [i.get("type") for i in body["items"] if isinstance(i, dict)]
        named = [t for t in types if isinstance(t, str)]
        return len(named) == len(set(named))
    return True


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """No `deny_status` on the gate: in that form (nginx's auth_request) answers carry no body and
    no content type, their bodies riding in headers, which a description cannot say per query
    parameter; tests/api/gate.rs and tests/api/gateways.rs cover that form. Dropped from every
    case, whichever phase made it."""
    if case.query and "deny_status" in case.query:
        case.query = {k: v for k, v in case.query.items() if k != "deny_status"}
