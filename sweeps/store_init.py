"""Create and migrate a local SQLite MLflow store once, under one file lock, before anything uses it.

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

Imports: the standard library and filelock only at module level (analysis imports this module and
must not pull in torch or ray); mlflow inside the functions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

LOCK_SUFFIX = ".lock"           # <db>.lock beside the store
ATTEMPTS = 10                   # opens tried while another process creates the schema
WAIT_S = 0.5                    # first wait between them; grows linearly (0.5, 1.0, 1.5 ... s)
LOCK_TIMEOUT_S = 300.0          # another capsweep process migrating a large store can take a while
QUIET_S = 10.0                  # an unfinished schema unchanged this long: its creator is gone
MAX_WAIT_S = 180.0              # at most this long for another process's schema creation
STORE_TIMEOUT_S = 10.0          # check_store: a store that has not answered by then is refused
STORE_TIMEOUT_ENV = "CAPSWEEP_STORE_TIMEOUT"   # seconds, to wait longer for a slow link (or less)


def store_timeout_s() -> float:
    """STORE_TIMEOUT_S, or $CAPSWEEP_STORE_TIMEOUT when set to a positive number."""
    import os
    try:
        value = float(os.environ.get(STORE_TIMEOUT_ENV, ""))
    except ValueError:
        return STORE_TIMEOUT_S
    return value if value > 0 else STORE_TIMEOUT_S


class StoreInitError(RuntimeError):
    """The store could not be created or migrated. The message is one line naming the URI."""


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a `sqlite:///PATH` URI (relative to the working folder), else None (servers,
    databases and in-memory stores migrate themselves)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    if raw in ("", ":memory:"):
        return None
    return Path(raw).expanduser().resolve()


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
    import os
    import threading
    from analysis.redact import redact_uri
    shown = redact_uri(uri)
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
                  None) or redact_uri(_one_line(e, 200))
    raise StoreInitError(f"{flag}: cannot read the MLflow store at {shown} ({reason})")


def _one_line(e: Optional[BaseException], limit: int = 240) -> str:
    msg = " ".join(str(e).split())
    return msg[:limit] + ("..." if len(msg) > limit else "")
