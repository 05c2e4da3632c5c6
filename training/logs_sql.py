"""`rta logs sql "SELECT ..."`: analysts' SQL (DuckDB) over `rta log`'s layout.

Analysts ask ad-hoc questions of the logged traffic (block share per hour, what the explore
slice saw, deals per model version); a SQL engine answers them without loading the log into
Python. DuckDB reads the layout's Parquet files in place (partition pruning on the hive
`date=`/`hour=` directories, column projection), so a query touches only what it names.

Views (stream/logger/schema.py is the layout's contract):

* ``impressions``: every impression row as logged, with the partition columns ``date`` and
  ``hour``. At-least-once: a request can appear more than once after a logger crash, so count
  distinct ``request_id`` or use ``labelled``.
* ``outcomes``: every outcome row as logged (``request_id``, ``event``, ``ts_ms``, ``date``,
  ``hour``); duplicates possible likewise.
* ``labelled``: one row per request as training and replay see it, built by the production
  reader (`training.logs.load_logged`: its dedup rule and its label rule, not a copy of them):
  ``request_id``, ``ts_ms``, the decision columns, and ``label_<task>`` (1 / 0 / NULL when the
  outcome could not be seen: blocked, or its attribution window still open as of ``--as-of-ms``).
  It is read into memory, so it is built only when the query names it.

Output: a table on the terminal (``--format table``, the first ``--max-rows``), CSV (stdout
or ``--out``) or Parquet (``--out``, written by DuckDB's own writer). Bad SQL, a missing
layout or an unwritable output is one line, exit 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from stream.errors import ConfigError, DataError
from stream.logger.schema import IMPRESSIONS_DIR, OUTCOMES_DIR
from stream.logger.storage import LOCATION, RemoteFile, is_uri, join
from training.logs import Attribution, _layout_files, is_logged_layout, load_logged

FORMATS = ("table", "csv", "parquet")
_LABELLED = re.compile(r"\blabelled\b", re.IGNORECASE)
_EMPTY_OUTCOMES = ("SELECT NULL::VARCHAR AS request_id, NULL::VARCHAR AS event, NULL::BIGINT AS ts_ms, "
                   "NULL::DATE AS date, NULL::BIGINT AS hour WHERE false")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _files_list(files: list[Path]) -> str:
    return "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"


def connect(logs: str | Path, attribution: Attribution | None = None, labelled: bool = True) -> Any:
    """A DuckDB connection with the views ``impressions``, ``outcomes`` and (if `labelled`)
    ``labelled`` over the layout at `logs`."""

    root = logs if is_uri(logs) else Path(logs)
    if not is_logged_layout(root):
        raise DataError(f"{root}: not a logged layout (no {IMPRESSIONS_DIR}/ directory; `rta log --out` writes one)")
    counts: dict[str, int] = {}
    imp = _layout_files(join(root, IMPRESSIONS_DIR), counts, "impression")
    if not imp:
        raise DataError(f"{join(root, IMPRESSIONS_DIR)}: no Parquet files (date=YYYY-MM-DD/hour=HH/*.parquet)")
    out = _layout_files(join(root, OUTCOMES_DIR), counts, "outcome")
    con = duckdb.connect()
    read = "read_parquet({}, hive_partitioning = true, union_by_name = true)"
    try:
        if is_uri(root):  # DuckDB scans pyarrow datasets: no httpfs extension to download
            con.register("impressions", _remote_dataset(imp, str(join(root, IMPRESSIONS_DIR))))
        else:
            con.execute(f"CREATE VIEW impressions AS SELECT * FROM {read.format(_files_list(imp))}")
        if out and is_uri(root):
            con.register("outcomes", _remote_dataset(out, str(join(root, OUTCOMES_DIR))))
        else:
            con.execute(f"CREATE VIEW outcomes AS SELECT * FROM {read.format(_files_list(out))}" if out
                        else f"CREATE VIEW outcomes AS {_EMPTY_OUTCOMES}")
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        raise DataError(f"{root}: unreadable layout ({_first_line(exc)})") from None
    if labelled:
        con.register("labelled", labelled_table(root, attribution))
    return con


def _remote_dataset(files: list[RemoteFile], base: str) -> ds.Dataset:
    """The layout's objects under `base` (s3://) as one pyarrow dataset, as the local view reads
    them: columns united by name across files, `date` (DATE) and `hour` (BIGINT) from the hive
    keys. DuckDB pushes projections and filters (partition pruning) into its scan."""
    fs = files[0].fs
    schema = pa.unify_schemas([pq.read_schema(f.path, filesystem=fs) for f in files], promote_options="permissive")
    hive = pa.schema([("date", pa.date32()), ("hour", pa.int64())])
    schema = pa.schema([*(f for f in schema if f.name not in hive.names), *hive])
    return ds.dataset([f.path for f in files], schema=schema, format="parquet", filesystem=fs,
                      partitioning=ds.partitioning(hive, flavor="hive"),
                      partition_base_dir=base.removeprefix("s3://"))


def labelled_table(logs: str | Path, attribution: Attribution | None = None) -> pa.Table:
    """One row per request with ``label_<task>``, from the production reader (dedup + labels)."""
    ls = load_logged(logs, attribution=attribution)
    cols: dict[str, Any] = {"request_id": pa.array(ls.request_id, pa.string()),
                            "ts_ms": pa.array(ls.ts_ms, pa.int64())}
    d = ls.decisions
    for name in d.schema.names:
        cols[name] = d.column(name)
    for j, t in enumerate(ls.tasks):
        lab = ls.labels[:, j]
        missing = np.isnan(lab)
        cols[f"label_{t}"] = pa.array(np.where(missing, 0, lab).astype(np.int8), pa.int8(), mask=missing)
    return pa.table(cols)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_sql(logs: str | Path, sql: str, fmt: str = "table", out: Path | None = None,
            attribution: Attribution | None = None, max_rows: int = 50) -> str | None:
    """Run `sql` over the layout. Returns the text to print (table, or CSV without `out`);
    with `out`, writes the file and returns None."""

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet needs --out FILE")
    if not sql.strip():
        raise ConfigError("the query is empty")
    con = connect(logs, attribution, labelled=bool(_LABELLED.search(sql)))
    query = sql.strip().rstrip(";")
    try:
        if out is not None and fmt in ("csv", "parquet"):
            out.parent.mkdir(parents=True, exist_ok=True)
            opts = "FORMAT parquet, COMPRESSION zstd" if fmt == "parquet" else "FORMAT csv, HEADER true"
            con.execute(f"COPY ({query}) TO {_sql_str(str(out))} ({opts})")
            return None
        rel = con.sql(query)
        if rel is None:
            raise ConfigError("the statement returned no rows to show (use a SELECT)")
        if fmt == "csv":
            return _csv(_arrow(rel))
        names = rel.columns
        rows = rel.limit(max_rows + 1).fetchall()
    except duckdb.Error as exc:
        raise DataError(f"SQL: {_first_line(exc)}") from None
    except OSError as exc:
        raise DataError(f"{out}: {_first_line(exc)}") from None
    text = _table(names, rows[:max_rows])
    if len(rows) > max_rows:
        text += f"\n(more rows: showing the first {max_rows}; --max-rows N, or --format csv/parquet for all)"
    return text


def _arrow(rel: Any) -> pa.Table:
    """A relation's result as one Arrow table (DuckDB 1.x returns a table, 2.x a reader)."""
    got = rel.arrow()
    return got.read_all() if isinstance(got, pa.RecordBatchReader) else got


def _csv(table: pa.Table) -> str:
    import io

    import pyarrow.csv as pa_csv

    buf = io.BytesIO()
    pa_csv.write_csv(table, buf)
    return buf.getvalue().decode()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _table(names: list[str], rows: list[tuple[Any, ...]]) -> str:
    """Plain aligned columns (numbers right-aligned)."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [all(isinstance(r[i], int | float) or r[i] is None for r in rows) and bool(rows)
               for i in range(len(names))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric, strict=True)).rstrip()

    out = [line(list(names)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


# ---- CLI ------------------------------------------------------------------------------------
@click.group("logs")
def logs() -> None:
    """Analysts: questions to the logged traffic (`rta log`'s layout)."""


@logs.command("sql")
@click.argument("query")
@click.option("--logs", "logs_path", required=True, type=LOCATION,
              help="`rta log` layout (impressions/ + outcomes/): a directory or s3://bucket/prefix.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result here (csv or parquet) instead of printing it.")
@click.option("--max-rows", type=click.IntRange(min=1), default=50, show_default=True,
              help="Rows printed by --format table.")
@click.option("--attribution", default=None,
              help="The labelled view's attribution windows, e.g. 'click=15m,deal=7d'.")
@click.option("--as-of-ms", type=int, default=None, help="The labelled view's labels as of this time.")
def sql_cmd(query: str, logs_path: Path | str, fmt: str, out: Path | None, max_rows: int,
            attribution: str | None, as_of_ms: int | None) -> None:
    """Run a SQL QUERY (DuckDB) over the views impressions, outcomes and labelled."""
    if out is not None and fmt == "table":
        raise click.UsageError("--out writes csv or parquet: add --format csv or --format parquet")
    text = run_sql(logs_path, query, fmt, out, Attribution.parse(attribution, as_of_ms), max_rows)
    if text is not None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        click.echo(f"[rta logs sql] wrote {out}", err=True)
