"""The one way to a tracking store, for the writer (sweeps) and the reader (analysis) alike.

What both sides need of a store lives here and only here: which store a command means
(`resolve_tracking_uri`: the flag, else $MLFLOW_TRACKING_URI, else MLflow's own default), the file of a
SQLite store (`sqlite_path`), creating and migrating it under its lock (`init_store`), checking that a
store answers in a stated time (`check_store`), a client on an existing store (`open_client`), every page
of a run search (`search_all`), a sweep's trial runs as rows (`trial_rows`), and scoped MLFLOW_HTTP_*
settings (`scoped_environ`, `mlflow_http_env`). sweeps imports nothing else of analysis (its CLI aside,
which dispatches the read-only commands); analysis never imports sweeps.

Creating and migrating a local SQLite store once, under one file lock, before anything uses it.

Why: MLflow creates a fresh SQLite store in whichever process opens it first (tables, then alembic's
migrations, then the default experiment). Two processes doing that at once (`capsweep run` and
`mlflow ui` started together in a new folder) break each other: SQLAlchemy's
`CircularDependencyError('status_details', 'workspace')`, alembic's "Online migration expected to
match one row ... 0 found", "table ... already exists", a duplicate default experiment. So:
- every capsweep command (`run`, `ui`, `report`, `ls`, `status`, `export`, `compare`) opens the store
  through `init_store` first, holding `<db>.lock` (a filelock beside the file): capsweep processes
  never create or migrate it at the same time;
- a process that does not take the lock (a plain `mlflow ui`) can still be creating it. Then we
  wait before touching the file: while the file exists without MLflow's full set of tables and its
  tables or alembic revision keep changing, another process is creating it (MLflow creates the
  tables only when some are missing, so once they all exist opening writes nothing); if nothing
  changes for QUIET_S, that process died and we finish the job. A failed open is retried after a
  wait (bounded), since the other process finishes the schema and our re-open finds it complete.
Any failure left is one line (`StoreInitError`), never a traceback.

Imports: the standard library only at module level (importing analysis pulls in neither torch, ray nor
mlflow); filelock and mlflow inside the functions.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

from capsmodels.contract import (CANDIDATE, DEFAULT_TRACKING_URI, ROLE_KEY, RUN_TRIAL, RUNNING, TAG_PARENT,
                                 TAG_ROLE, TAG_SEED, TAG_STATUS, TAG_TRIAL, TRACKING_URI_ENV, redact)
from capsmodels.errors import CapsweepError

LOCK_SUFFIX = ".lock"           # <db>.lock beside the store
ATTEMPTS = 10                   # opens tried while another process creates the schema
WAIT_S = 0.5                    # first wait between them; grows linearly (0.5, 1.0, 1.5 ... s)
LOCK_TIMEOUT_S = 300.0          # another capsweep process migrating a large store can take a while
QUIET_S = 10.0                  # an unfinished schema unchanged this long: its creator is gone
MAX_WAIT_S = 180.0              # at most this long for another process's schema creation
STORE_TIMEOUT_S = 10.0          # check_store: a store that has not answered by then is refused
STORE_TIMEOUT_ENV = "CAPSWEEP_STORE_TIMEOUT"   # seconds, to wait longer for a slow link (or less)


def resolve_tracking_uri(tracking_uri: Optional[str]) -> str:
    """The store a command means: the URI given, else $MLFLOW_TRACKING_URI, else MLflow's own default
    `sqlite:///mlflow.db` in the working folder (capsmodels.contract.DEFAULT_TRACKING_URI). The one place
    this rule is written: the spec's `mlflow.tracking_uri`, every command's --tracking-uri and the
    report resolve through it."""
    return tracking_uri or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI


def store_timeout_s() -> float:
    """STORE_TIMEOUT_S, or $CAPSWEEP_STORE_TIMEOUT when set to a positive number."""
    try:
        value = float(os.environ.get(STORE_TIMEOUT_ENV, ""))
    except ValueError:
        return STORE_TIMEOUT_S
    return value if value > 0 else STORE_TIMEOUT_S


class StoreInitError(CapsweepError, RuntimeError):
    """The store could not be created or migrated. The message is one line naming the URI."""


def _sqlite_file(uri: str) -> Optional[str]:
    """PATH of a `sqlite:///PATH` URI as written (its query string dropped), else None (another kind of
    store, or SQLite in memory). The one place the SQLite form is parsed."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if raw in ("", ":memory:") else raw


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a `sqlite:///PATH` URI (relative to the working folder), else None (servers,
    databases and in-memory stores migrate themselves)."""
    raw = _sqlite_file(uri)
    return Path(raw).expanduser().resolve() if raw is not None else None


def missing_store(uri: str) -> Optional[str]:
    """The path of a file store named by `uri` that does not exist (a sqlite file, a `file:` folder, a
    bare path), else None. Opening one with MLflow silently creates an empty store, so a reader refuses
    it instead: a typo in the path gives a clear message rather than 'experiment not found'."""
    if uri.startswith("sqlite:///"):
        path = _sqlite_file(uri)
        if path is None:
            return None
    elif uri.startswith("file:"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri[5:]
    elif "://" not in uri:
        path = uri
    else:
        return None
    return None if os.path.exists(path) else path


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + LOCK_SUFFIX)


def init_store(uri: str, create: bool = True, attempts: int = ATTEMPTS, wait_s: float = WAIT_S,
               lock_timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Make the SQLite store at `uri` exist at MLflow's current schema. Returns True when there is a
    store to use (always for non-SQLite URIs; False when `create` is False and the file is absent,
    e.g. a report on a store that does not exist must not create it). Raises StoreInitError."""
    from filelock import FileLock, Timeout
    db = sqlite_path(uri)
    if db is None:
        return True
    if not create and not db.exists():
        return False
    if not db.parent.is_dir():
        raise StoreInitError(f"tracking URI {uri}: folder {db.parent} does not exist")
    lock = FileLock(str(lock_path(db)), timeout=lock_timeout_s)
    try:
        with lock:
            wait_for_other_creator(db)
            _open_with_retries(uri, attempts, wait_s)
    except Timeout:
        raise StoreInitError(f"tracking URI {uri}: another process holds {lock.lock_file} for more than "
                             f"{lock_timeout_s:.0f} s") from None
    except OSError as e:
        raise StoreInitError(f"tracking URI {uri}: cannot lock or open {db}: {_one_line(e)}") from None
    return True


def _schema_state(db: Path) -> tuple:
    """(table names, alembic revision) read with the standard library, read-only; a file another
    process holds locked reads as a state of its own (so it counts as a change)."""
    import sqlite3
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            tables = tuple(sorted(r[0] for r in con.execute("select name from sqlite_master where type='table'")))
            rev = con.execute("select version_num from alembic_version").fetchone() \
                if "alembic_version" in tables else None
            return tables, rev[0] if rev else None
        finally:
            con.close()
    except sqlite3.Error as e:       # "database is locked" while another process writes it
        return ("unreadable", str(e)), None


def _expected_tables() -> set[str]:
    """The tables MLflow's tracking store needs (it creates the schema when one is missing)."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - registers every model's table
    from mlflow.store.db.base_sql_model import Base
    return set(Base.metadata.tables)


def wait_for_other_creator(db: Path, quiet_s: float = QUIET_S, max_s: float = MAX_WAIT_S) -> float:
    """Wait while another process is creating the store's schema (see the module docstring).
    Returns the seconds waited (0 when the store is complete or absent)."""
    if not db.exists():
        return 0.0
    expected = _expected_tables()
    start = last_change = time.monotonic()
    last = None
    while True:
        state = _schema_state(db)
        now = time.monotonic()
        if expected <= set(state[0]) or "not a database" in str(state[0]):
            return now - start      # complete, or not SQLite at all: opening says so in one line
        if state != last:
            last, last_change = state, now
        if now - last_change >= quiet_s or now - start >= max_s:
            return now - start
        time.sleep(0.1)


def _open_with_retries(uri: str, attempts: int, wait_s: float) -> None:
    last: Optional[BaseException] = None
    for attempt in range(max(1, attempts)):
        try:
            _open(uri)
            return
        except Exception as e:  # noqa: BLE001 - SQLAlchemy, alembic and MlflowException all mean "not yet"
            last = e
            if attempt + 1 < attempts:
                time.sleep(wait_s * (attempt + 1))
    raise StoreInitError(f"tracking URI {uri}: cannot create or migrate the store after {attempts} tries "
                         f"({type(last).__name__}: {_one_line(last)})")


def _open(uri: str) -> None:
    """Open the store as MLflow does (creating tables, migrating, adding the default experiment) and
    read from it. MLflow caches one store object per URI in the process, and only after a successful
    construction, so a failed open here is really re-done on the next try."""
    import logging
    for name in ("alembic", "mlflow.store.db.utils"):    # migration INFO lines are not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient
    MlflowClient(uri).search_experiments(max_results=1)


_DATABASES = ("postgresql", "mysql", "mssql")   # server databases; sqlite needs no connection


def check_store(uri: str, timeout_s: Optional[float] = None, flag: str = "--tracking-uri") -> None:
    """One line (StoreInitError) within about `timeout_s` when the store at `uri` cannot be read: a
    server or database that does not answer (MLflow's own HTTP client retries for minutes, and a
    database connection waits for the OS's TCP timeout), a database URI whose Python driver is not
    installed. The probe runs in a thread that is given up on at the deadline, so no call can hold the
    command past it."""
    import threading
    shown = redact(uri)
    timeout_s = store_timeout_s() if timeout_s is None else timeout_s
    outcome: dict = {}
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s)))}
    saved = {k: os.environ.get(k) for k in env}

    def probe() -> None:
        try:
            if "://" in uri and uri.split("://", 1)[0].split("+")[0] in _DATABASES:
                # one connection first: MLflow's own open retries a refused database 10 times over
                # ~100 s, logging a warning each time, so the real reason would never reach the user
                import sqlalchemy
                from mlflow.store.db.utils import create_sqlalchemy_engine
                engine = create_sqlalchemy_engine(uri)
                try:
                    sqlalchemy.inspect(engine)
                finally:
                    engine.dispose()
            from mlflow.tracking import MlflowClient
            MlflowClient(uri).search_experiments(max_results=1)
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - every failure is reported in one line below
            outcome["error"] = e

    os.environ.update(env)
    try:
        worker = threading.Thread(target=probe, name="capsweep-store-check", daemon=True)
        worker.start()
        worker.join(timeout_s + 2.0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if outcome.get("ok"):
        return
    e = outcome.get("error")
    if e is None or "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
        raise StoreInitError(f"{flag}: the MLflow store at {shown} did not answer within {timeout_s:.0f} s; "
                             "is the server or database up and the address right?")
    if isinstance(e, ImportError) or "No module named" in str(e):
        module = getattr(e, "name", None) or (str(e).split("'")[1] if "'" in str(e) else str(e))
        raise StoreInitError(f"{flag}: {shown} needs the Python driver {module!r}, which is not installed "
                             "(for PostgreSQL: pip install 'psycopg[binary]', as capsweep's cluster extra does)")
    text = str(e)
    reason = next((w for w in ("Connection refused", "Name or service not known", "No route to host",
                               "Temporary failure in name resolution", "Network is unreachable") if w in text),
                  None) or redact(_one_line(e, 200))
    raise StoreInitError(f"{flag}: cannot read the MLflow store at {shown} ({reason})")


def _one_line(e: Optional[BaseException], limit: int = 240) -> str:
    msg = " ".join(str(e).split())
    return msg[:limit] + ("..." if len(msg) > limit else "")


def open_client(uri: str, create: bool = False, check: bool = True):
    """An MlflowClient on the store at `uri`, its SQLite file created/migrated under its lock first;
    None when it is a SQLite file that does not exist and `create` is False (a reader must not create an
    empty store). check: the store must answer within store_timeout_s() (StoreInitError otherwise)."""
    from mlflow.tracking import MlflowClient
    if not init_store(uri, create=create):
        return None
    if check:
        check_store(uri)
    return MlflowClient(uri)


# ---------------------------------------------------------------------------------------------------
# Reading runs and scoping MLflow's HTTP settings

PAGE = 1000     # runs per search_runs page: MLflow's REST cap is 50,000, but big pages cost server memory


def search_all(client, experiment_id: str, filter_string: str = "", progress: bool = False,
               what: str = "runs") -> list:
    """All active runs of `experiment_id` matching `filter_string`, page by page. `progress`: a
    counter on stderr (`loading <what>: N`)."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE,
                                  page_token=token)
        out.extend(page)
        if progress:
            print(f"\rloading {what}: {len(out)}", end="", file=sys.stderr, flush=True)
        token = page.token
        if not token:
            break
    if progress:
        print(file=sys.stderr)
    return out


@contextmanager
def scoped_environ(values: Mapping[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for the `with` block and restore them after, so a caller that runs
    inside another program (tests, the sweeps CLI calling the report) leaves its environment as it was.
    override=False: a variable the user set already wins."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if override or k not in os.environ:
            os.environ[k] = str(v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mlflow_http_env(max_retries: int, timeout_s: float, override: bool = False):
    """MLflow's HTTP client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7 with exponential
    backoff) and waits (MLFLOW_HTTP_REQUEST_TIMEOUT, default 120 s) for minutes inside one call; the
    sweep logger buffers and retries itself and the report should fail in seconds, so each sets its
    own bounds for its block. MLflow reads both at every request."""
    return scoped_environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}, override=override)


def quote(s: Optional[str]) -> str:
    """Escape a value for an MLflow filter string literal."""
    return (s or "").replace("\\", "\\\\").replace("'", "\\'")


def child_runs(client, experiment_id: str, parent_id: str, trials_only: bool = False) -> list:
    """Every active run nested under the parent run `parent_id` (trials_only: those tagged as a sweep's
    trial), all pages."""
    flt = f"tags.`{TAG_PARENT}` = '{parent_id}'"
    return search_all(client, experiment_id, flt + (f" and tags.`{TAG_ROLE}` = '{RUN_TRIAL}'" if trials_only else ""))


def trial_rows(client, experiment_id: str, parent_id: str) -> list[dict]:
    """One dict per trial run of the sweep whose parent is `parent_id`: run_id, run_name (as the MLflow
    UI lists it), trial_id, status, role, seed, params (every logged param, the flattened trial config)
    and metrics (each metric's last logged value); sorted by trial id."""
    rows = []
    for r in child_runs(client, experiment_id, parent_id, trials_only=True):
        tags = r.data.tags
        rows.append({"run_id": r.info.run_id, "run_name": r.info.run_name or "", "trial_id": tags.get(TAG_TRIAL, ""),
                     "status": tags.get(TAG_STATUS, RUNNING), "role": r.data.params.get(ROLE_KEY, CANDIDATE),
                     "seed": tags.get(TAG_SEED, ""), "params": dict(r.data.params),
                     "metrics": dict(r.data.metrics)})
    return sorted(rows, key=lambda row: row["trial_id"])
