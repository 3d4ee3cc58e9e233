"""VSPC's wire format as the simulator speaks it: paths, the JSON envelope and error bodies.

Errors use VSPC's envelope (`{"errors": [{"message", "type", "code"}]}`) and every server
error goes out as HTTP 520; the token endpoint answers OAuth errors; a queued request
answers 202 with a `Location` to poll (a path relative to the server root).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

API_PREFIX = "/api/v3"
TOKEN_PATH = "/api/v3/token"  # noqa: S105 - a path, not a password
JOB_OBJECTS_PATH = "/api/v3/infrastructure/backupServers/jobs/backupCopyJobs/jobObjects"
IMMEDIATE_OBJECTS_PATH = "/api/v3/infrastructure/backupServers/jobs/simpleBackupCopyJobs/objects"
JOBS_PATH = "/api/v3/infrastructure/backupServers/jobs"
BACKUP_SERVERS_PATH = "/api/v3/infrastructure/backupServers"
ORGANIZATIONS_PATH = "/api/v3/organizations"
# The collections served, by the names syncd gives them (from vspc-catalog-notes.md; written
# out here rather than read from syncd's specs, so the simulator checks them).
COLLECTION_PATHS = {
    "backup_copy_job_objects": JOB_OBJECTS_PATH,
    "immediate_copy_job_objects": IMMEDIATE_OBJECTS_PATH,
    "jobs": JOBS_PATH,
    "backup_servers": BACKUP_SERVERS_PATH,
    "organizations": ORGANIZATIONS_PATH,
}
COLLECTION_OF_PATH = {path: name for name, path in COLLECTION_PATHS.items()}
ASYNC_ACTIONS_PATH = "/api/v3/asyncActions"
# The error bodies seen from VSPC and its proxies: see `error_in_shape`.
ERROR_SHAPES = ("errors", "error", "oauth")

_JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def error_body(status: int, message: str, error_type: str, **extra: Any) -> bytes:
    """VSPC's error envelope holding one error; `extra` adds fields (e.g. `retryAfter`)."""
    error: dict[str, Any] = {"message": message, "type": error_type, "code": status}
    error.update(extra)
    return orjson.dumps({"errors": [error]})


def json_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A response carrying `body`, already JSON, as VSPC labels it."""
    response = web.Response(status=status, body=body, headers=headers)
    response.headers["Content-Type"] = _JSON_CONTENT_TYPE
    return response


def vspc_error(
    status: int, message: str, error_type: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The VSPC error envelope; server errors are always sent as 520."""
    http_status = 520 if status >= 500 else status
    return json_response(http_status, error_body(status, message, error_type), headers)


def error_in_shape(status: int, message: str, shape: str) -> web.Response:
    """An error answer carrying `message` in one of `ERROR_SHAPES`: VSPC's `errors`
    envelope, the `{"error": {"code", "message"}}` of a version check, or an OAuth error."""
    if shape == "oauth":
        return oauth_error("invalid_request", message)
    if shape == "error":
        return json_response(
            status, orjson.dumps({"error": {"code": "BadRequest", "message": message}})
        )
    return json_response(status, error_body(status, message, "logical"))


def oauth_error(error: str, description: str) -> web.Response:
    """The token endpoint's 400: `error` is an OAuth code such as "invalid_grant"."""
    return json_response(
        400, orjson.dumps({"error": error, "error_description": description, "error_uri": None})
    )


def async_running(action_id: str) -> web.Response:
    """202: the answer is being computed; poll `Location` for it."""
    body = orjson.dumps({"data": {"id": action_id, "status": "running"}})
    return json_response(202, body, {"Location": f"{ASYNC_ACTIONS_PATH}/{action_id}"})
