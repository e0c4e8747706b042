"""The tables both engines share, written once with per-engine column types."""
from __future__ import annotations

from dataclasses import dataclass

# 2: inbox.digest; 3: the audit trail (new tables: a store made earlier gets them when it opens); 4: index rows kept
# in the order of their resource, a composite's token part in one form, the texts of tokens apart (store/upgrade.py);
# 5: the composites of an Observation's code and value answered by their rows, theirs no longer kept (store/upgrade.py)
SCHEMA_VERSION = 5

#: index table -> its value columns (after rid and key), in insert order
INDEX_TABLES: dict[str, tuple[str, ...]] = {
    "sp_string": ("value_norm", "value_exact"),
    "sp_token": ("system", "code", "text_norm"),
    "sp_date": ("lo", "hi"),
    "sp_number": ("lo", "hi", "value"),
    "sp_quantity": ("system", "code", "lo", "hi", "value"),
    "sp_reference": ("target_type", "target_id", "url"),
    "sp_uri": ("uri",),
    "sp_composite": ("part1", "part2"),
}


def index_columns(table: str) -> tuple[str, ...]:
    """The columns of an index table in the order its rows are written: rid, key, its values, n (see `index_table_ddl`)."""
    return ("rid", "key", *INDEX_TABLES[table], "n")


#: IndexRows attribute -> index table
ROW_TABLES = {
    "string": "sp_string",
    "token": "sp_token",
    "date": "sp_date",
    "number": "sp_number",
    "quantity": "sp_quantity",
    "reference": "sp_reference",
    "uri": "sp_uri",
    "composite": "sp_composite",
}

_REAL_COLUMNS = {"lo", "hi", "value"}


@dataclass(frozen=True)
class Types:
    serial_pk: str  # auto-incrementing integer primary key
    bigint: str
    real: str
    blob: str
    text: str = "TEXT"  # PostgreSQL: one byte-order collation everywhere, so joins and prefix ranges use the indexes
    clustered: str = ""  # after a CREATE TABLE whose rows are kept in the order of their primary key (SQLite: WITHOUT ROWID)


#: columns added since a store was first made, in the order they came: (table, column, its `Types` field); each
#: engine adds the ones a store lacks when it opens it (ADD COLUMN: no table is rewritten)
ADDED_COLUMNS = (
    ("inbox", "digest", "text"),  # schema 2: what is left of a message whose content was cleared (rebond hl7 prune)
)


#: indexes a store made earlier has and this Rebond no longer keeps up; each engine drops them when it opens a store
DROPPED_INDEXES = (
    # (res_type, lu) of every version: one more B-tree insert each, 3.7 % of a lab panel's WAL pages, for the history
    # of a resource type since a moment alone, which reads the index of every version's time (versions_lu) instead
    "versions_type_lu",
)


def added_columns(types: Types) -> list[tuple[str, str, str]]:
    """(table, column, SQL type) of ADDED_COLUMNS in an engine's types: the same type as a new store's CREATE TABLE."""
    return [(table, column, getattr(types, kind)) for table, column, kind in ADDED_COLUMNS]


def ddl(types: Types) -> list[str]:
    statements = [
        "CREATE TABLE IF NOT EXISTS rebond_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS resources (
            rid {types.serial_pk},
            res_type {types.text} NOT NULL,
            res_id {types.text} NOT NULL,
            version {types.bigint} NOT NULL,
            seq {types.bigint} NOT NULL,
            lu {types.real} NOT NULL,
            deleted SMALLINT NOT NULL,
            UNIQUE (res_type, res_id))""",
        f"""CREATE TABLE IF NOT EXISTS versions (
            seq {types.serial_pk},
            res_type {types.text} NOT NULL,
            res_id {types.text} NOT NULL,
            version {types.bigint} NOT NULL,
            lu {types.real} NOT NULL,
            method {types.text} NOT NULL,
            site_id {types.text} NOT NULL,
            txid {types.bigint},
            body {types.blob},
            UNIQUE (res_type, res_id, version))""",
        # what belongs to this node alone and never enters the change feed: accounts, sign-in sessions, cursors
        f"""CREATE TABLE IF NOT EXISTS node_state (
            ns {types.text} NOT NULL,
            key {types.text} NOT NULL,
            value {types.text} NOT NULL,
            updated {types.real} NOT NULL,
            PRIMARY KEY (ns, key))""",
        # messages from other systems (HL7 v2), kept raw before anything is done with them; one per (channel, sender, control id)
        f"""CREATE TABLE IF NOT EXISTS inbox (
            id {types.serial_pk},
            channel {types.text} NOT NULL,
            sender {types.text} NOT NULL,
            control_id {types.text} NOT NULL,
            received {types.real} NOT NULL,
            raw {types.blob} NOT NULL,
            status {types.text} NOT NULL,
            detail {types.text} NOT NULL,
            updated {types.real} NOT NULL,
            digest {types.text},
            UNIQUE (channel, sender, control_id))""",
        "CREATE INDEX IF NOT EXISTS inbox_status ON inbox (channel, status, id)",
        # a site node's own writes, in order, until the central site has them (or a person has settled a conflict)
        f"""CREATE TABLE IF NOT EXISTS journal (
            seq {types.serial_pk},
            res_type {types.text} NOT NULL,
            res_id {types.text} NOT NULL,
            method {types.text} NOT NULL,
            base_version {types.bigint} NOT NULL,
            local_version {types.bigint} NOT NULL,
            body {types.blob},
            written {types.real} NOT NULL,
            status {types.text} NOT NULL,
            detail {types.text} NOT NULL,
            updated {types.real} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS journal_status ON journal (status, seq)",
        "CREATE INDEX IF NOT EXISTS journal_resource ON journal (res_type, res_id, seq)",
        # the audit trail: every access to the data through the API and the web app; a node's own, never on the feed.
        # Its ids begin with the time (security/audit.py time_ordered_id): kept in their order, they serve "newest first"
        # and a range of time, and each line appends at the end instead of filling a second index
        f"""CREATE TABLE IF NOT EXISTS audit (
            id {types.text} PRIMARY KEY,
            recorded {types.real} NOT NULL,
            node {types.text} NOT NULL,
            agent {types.text} NOT NULL,
            role {types.text} NOT NULL,
            source {types.text} NOT NULL,
            channel {types.text} NOT NULL,
            action {types.text} NOT NULL,
            what {types.text} NOT NULL,
            entity {types.text} NOT NULL,
            outcome {types.bigint} NOT NULL,
            patients {types.bigint} NOT NULL,
            listed {types.text} NOT NULL){types.clustered}""",
        "CREATE INDEX IF NOT EXISTS audit_agent ON audit (agent, id)",
        # whose data the accesses touched, to find them by patient: one row per patient for each batch of accesses
        # written together (a second's), with the ids of those that touched the patient, and the span of their times
        f"""CREATE TABLE IF NOT EXISTS audit_patient (
            patient_id {types.text} NOT NULL,
            lo {types.real} NOT NULL,
            hi {types.real} NOT NULL,
            audit_ids {types.text} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS audit_patient_lookup ON audit_patient (patient_id, hi)",
        "CREATE INDEX IF NOT EXISTS versions_lu ON versions (lu)",
        "CREATE INDEX IF NOT EXISTS resources_type_lu ON resources (res_type, lu)",
    ]
    for table in INDEX_TABLES:
        statements.extend(index_table_ddl(types, table))
    statements.append(TOKEN_TEXTS_DDL.format(text=types.text, clustered=types.clustered))
    return statements


def index_table_ddl(types: Types, table: str) -> list[str]:
    """One index table and its indexes.

    Its rows are kept in the order of (rid, key, n), n numbering a resource's rows in the table: SQLite
    keeps them in that order itself (WITHOUT ROWID), so that a write adds to one B-tree and its lookup
    index instead of a table, an index by rid and the lookup index. The lookup index finds rows by value.
    """
    columns = INDEX_TABLES[table]
    cols = ", ".join(f"{c} {types.real if c in _REAL_COLUMNS else types.text}" for c in columns)
    first = {"sp_token": "code", "sp_quantity": "code", "sp_reference": "target_id"}.get(table, columns[0])
    statements = [
        f"CREATE TABLE IF NOT EXISTS {table} (rid {types.bigint} NOT NULL, key {types.text} NOT NULL, {cols},"
        f" n INTEGER NOT NULL, PRIMARY KEY (rid, key, n)){types.clustered}",
        f"CREATE INDEX IF NOT EXISTS {table}_lookup ON {table} (key, {first}, rid)",
    ]
    if table == "sp_date":
        statements.append("CREATE INDEX IF NOT EXISTS sp_date_hi ON sp_date (key, hi, rid)")
    if table == "sp_string":
        statements.append("CREATE INDEX IF NOT EXISTS sp_string_exact ON sp_string (key, value_exact, rid)")
    return statements


#: the texts of the token rows (a coding's display, a concept's text) with the codes they were found with, each once:
#: `:text` finds its codes here, then their rows (checked against their own text). An index of the rows' texts took a
#: page of every commit for each coding written; this table is written only when a code comes with a text not seen
#: before. Rows with a text and no code are found by `code IS NULL` on the lookup index. Nothing is taken out of it:
#: a text no longer used costs one probe that finds no row
TOKEN_TEXTS_DDL = ("CREATE TABLE IF NOT EXISTS sp_token_texts (key {text} NOT NULL, text_norm {text} NOT NULL,"
                   " code {text} NOT NULL, PRIMARY KEY (key, text_norm, code)){clustered}")
