"""A VSPC REST API v3 simulator: the backup copy job objects of both copy modes, the jobs,
backup servers and organizations that name them, and its auth.

It is a real `aiohttp.web` application, used by the tests (over real sockets), by
`syncd simulate` for demos, and by the benchmarks. It follows the reference notes in
`vspc-api-notes.md`: bearer auth with API keys or password-grant tokens (refresh tokens
rotate), the `X-Client-Version` check, `limit`/`offset`/`sort`/`filter`/`select` as VSPC reads
them, every server error as HTTP 520, 429 throttling with `retryAfter`, and 202 async actions.
A 202's `Location` is a path relative to the server root (`/api/v3/asyncActions/<uuid>`);
polling it answers 202 until the action is done, then 200 with the page that the original
request would have got at the time it was made.

Misbehaviour is scripted with `Fault`s injected into `SimulatorState` (on every collection,
or one), and `SimulatorState.unavailable_collections` answers 404 for a collection, as an
older VSPC does. Call `SimulatorState.invalidate` after editing a tenant's items by hand.

Modules: `dataset` (generated tenants), `queries` (query parameters), `state` (the simulated
server's data and bookkeeping), `faults` (fault kinds and their handlers), `wire` (paths and
response bodies), `app` (the aiohttp application). Everything a user needs is here.
"""

from syncd.simulator.app import cmd_simulate, create_app, run_simulator, serve
from syncd.simulator.dataset import COLLECTIONS, LINK_COLLECTIONS, SimTenant, make_dataset
from syncd.simulator.faults import FAULT_KINDS, TOKEN_FAULT_KINDS, Fault, FaultKind
from syncd.simulator.queries import DEFAULT_LIMIT, MAX_OFFSET, PROPERTIES
from syncd.simulator.state import (
    REQUEST_LOG_SIZE,
    AsyncAction,
    RequestRecord,
    SimulatorState,
    TokenPair,
)
from syncd.simulator.wire import (
    API_PREFIX,
    ASYNC_ACTIONS_PATH,
    BACKUP_SERVERS_PATH,
    COLLECTION_PATHS,
    ERROR_SHAPES,
    IMMEDIATE_OBJECTS_PATH,
    JOB_OBJECTS_PATH,
    JOBS_PATH,
    ORGANIZATIONS_PATH,
    TOKEN_PATH,
)

__all__ = [
    "API_PREFIX",
    "ASYNC_ACTIONS_PATH",
    "BACKUP_SERVERS_PATH",
    "COLLECTIONS",
    "COLLECTION_PATHS",
    "DEFAULT_LIMIT",
    "ERROR_SHAPES",
    "FAULT_KINDS",
    "IMMEDIATE_OBJECTS_PATH",
    "JOBS_PATH",
    "JOB_OBJECTS_PATH",
    "LINK_COLLECTIONS",
    "MAX_OFFSET",
    "ORGANIZATIONS_PATH",
    "PROPERTIES",
    "REQUEST_LOG_SIZE",
    "TOKEN_FAULT_KINDS",
    "TOKEN_PATH",
    "AsyncAction",
    "Fault",
    "FaultKind",
    "RequestRecord",
    "SimTenant",
    "SimulatorState",
    "TokenPair",
    "cmd_simulate",
    "create_app",
    "make_dataset",
    "run_simulator",
    "serve",
]
