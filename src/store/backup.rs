//! The database side of `ehrx backup` and `ehrx restore`: every ehrx table
//! read in one consistent snapshot, and written back into an empty database
//! in one transaction. The file format lives in [`crate::backup`]; this module
//! only moves rows.
//!
//! The snapshot is a read transaction: on SQLite (WAL) a deferred `BEGIN`
//! whose first read pins the snapshot every later read of the transaction
//! sees, so writers go on beside it; on PostgreSQL `REPEATABLE READ READ
//! ONLY`. SQLite pins each file at its first read: the main file first, then
//! the audit log's (listing the tables reads its catalogue), so an entry a
//! write left in `audit_outbox` is in the snapshot's outbox, its log, or
//! both (restoring both appends it once: `audit_head.drained`), never in
//! neither. Tables and columns are read from the database's own catalogue, so
//! tables added by later migrations are carried without changes here; a
//! column of a type other than integer, real or text is refused rather than
//! copied approximately.

use futures_util::TryStreamExt as _;
use sqlx::{AnyConnection, Row};

use super::{Dialect, Store, StoreError, StoreResult, Tx};

/// Tables that belong to the migration tool or the database, not to ehrx.
const SKIPPED: &str = "_sqlx_migrations";

/// The storage class of a column, as the backup carries it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Int,
    Real,
    Text,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// A table with its columns in their declared order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
}

/// Current resources and stored versions of one resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeCount {
    pub current: i64,
    pub versions: i64,
}

/// Maps a declared column type onto what the backup carries.
fn kind_of(dialect: Dialect, table: &str, column: &str, declared: &str) -> StoreResult<Kind> {
    let t = declared.to_ascii_lowercase();
    let kind = match dialect {
        Dialect::Sqlite if t.contains("int") => Some(Kind::Int),
        Dialect::Sqlite if t.contains("real") || t.contains("floa") || t.contains("doub") => {
            Some(Kind::Real)
        }
        Dialect::Sqlite if t.contains("text") || t.contains("char") || t.is_empty() => {
            Some(Kind::Text)
        }
        Dialect::Postgres if matches!(t.as_str(), "bigint" | "integer" | "smallint") => {
            Some(Kind::Int)
        }
        Dialect::Postgres if matches!(t.as_str(), "double precision" | "real") => Some(Kind::Real),
        Dialect::Postgres if matches!(t.as_str(), "text" | "character varying") => Some(Kind::Text),
        _ => None,
    };
    kind.ok_or_else(|| {
        StoreError::Schema(format!(
            "{table}.{column} has type {declared}, which backups do not carry"
        ))
    })
}

/// The tables of ehrx's schema, by name.
async fn tables(conn: &mut AnyConnection, dialect: Dialect) -> StoreResult<Vec<Table>> {
    let names: Vec<String> = match dialect {
        // The audit log's own file is attached as `audit` (store::connect).
        Dialect::Sqlite => sqlx::query(
            "SELECT name FROM (SELECT name, type FROM main.sqlite_master \
             UNION ALL SELECT name, type FROM audit.sqlite_master) \
             WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name <> $1 ORDER BY name",
        ),
        Dialect::Postgres => sqlx::query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' \
             AND table_name <> $1 ORDER BY table_name",
        ),
    }
    .bind(SKIPPED)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>(0))
    .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let rows = match dialect {
            Dialect::Sqlite => {
                sqlx::query("SELECT name, type FROM pragma_table_info($1) ORDER BY cid")
            }
            Dialect::Postgres => sqlx::query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 \
                 ORDER BY ordinal_position",
            ),
        }
        .bind(&name)
        .fetch_all(&mut *conn)
        .await?;
        let mut columns = Vec::with_capacity(rows.len());
        for r in &rows {
            let column: String = r.try_get(0)?;
            let declared: String = r.try_get(1)?;
            let kind = kind_of(dialect, &name, &column, &declared)?;
            columns.push(Column { name: column, kind });
        }
        out.push(Table { name, columns });
    }
    Ok(out)
}

/// Quotes an identifier read from the catalogue.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Rows per table and counts per resource type, as `conn` sees them.
async fn counts(
    conn: &mut AnyConnection,
    tables: &[Table],
) -> StoreResult<(Vec<(String, i64)>, Vec<(String, TypeCount)>)> {
    let mut rows = Vec::with_capacity(tables.len());
    for t in tables {
        let n: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM {}", quoted(&t.name)))
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        rows.push((t.name.clone(), n));
    }
    let mut types: std::collections::BTreeMap<String, TypeCount> = Default::default();
    for r in sqlx::query(
        "SELECT rtype, COUNT(*) FROM resource WHERE deleted = 0 GROUP BY rtype ORDER BY rtype",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        types.entry(r.try_get(0)?).or_default().current = r.try_get(1)?;
    }
    for r in
        sqlx::query("SELECT rtype, COUNT(*) FROM resource_history GROUP BY rtype ORDER BY rtype")
            .fetch_all(&mut *conn)
            .await?
    {
        types.entry(r.try_get(0)?).or_default().versions = r.try_get(1)?;
    }
    Ok((rows, types.into_iter().collect()))
}

/// The newest migration applied to the database.
async fn schema_version_on(conn: &mut AnyConnection) -> StoreResult<i64> {
    Ok(
        sqlx::query("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?,
    )
}

impl Store {
    /// The newest migration applied to the database.
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let mut conn = self.pool.acquire().await?;
        schema_version_on(&mut conn).await
    }

    /// The newest migration this build knows.
    pub fn latest_schema_version(&self) -> i64 {
        let migrator = match self.dialect {
            Dialect::Sqlite => &super::SQLITE_MIGRATIONS,
            Dialect::Postgres => &super::POSTGRES_MIGRATIONS,
        };
        migrator.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Opens a consistent read-only snapshot of every ehrx table.
    pub async fn snapshot(&self) -> StoreResult<Snapshot> {
        let wide = self.wide().await?;
        let mut tx = match self.dialect {
            Dialect::Sqlite => wide.begin_with("BEGIN").await?,
            Dialect::Postgres => {
                wide.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        };
        if self.dialect == Dialect::Postgres {
            // A large table is read by one long statement.
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut *tx)
                .await?;
        }
        // The first read pins the snapshot (SQLite takes it here).
        let schema_version = schema_version_on(&mut tx).await?;
        let tables = tables(&mut tx, self.dialect).await?;
        let (rows, types) = counts(&mut tx, &tables).await?;
        Ok(Snapshot {
            tx,
            dialect: self.dialect,
            schema_version,
            tables,
            rows,
            types,
        })
    }

    /// The first ehrx table that holds a row, if any (restore needs an empty
    /// database).
    pub async fn first_nonempty_table(&self) -> StoreResult<Option<String>> {
        let mut conn = self.wide().await?.acquire().await?;
        let tables = tables(&mut conn, self.dialect).await?;
        for t in tables {
            let any = sqlx::query(&format!("SELECT 1 FROM {} LIMIT 1", quoted(&t.name)))
                .fetch_optional(&mut *conn)
                .await?;
            if any.is_some() {
                return Ok(Some(t.name));
            }
        }
        Ok(None)
    }

    /// A transaction that loads a backup into this (empty) database.
    pub async fn restorer(&self) -> StoreResult<Restorer> {
        let mut tx = self.begin_in(&self.wide().await?).await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(tx.conn())
                .await?;
        }
        let tables = tables(tx.conn(), self.dialect).await?;
        Ok(Restorer {
            tx,
            dialect: self.dialect,
            tables,
        })
    }
}

/// A consistent view of the whole database, with its counts taken in it.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    dialect: Dialect,
    pub schema_version: i64,
    pub tables: Vec<Table>,
    /// Rows per table.
    pub rows: Vec<(String, i64)>,
    /// Current resources and versions per resource type.
    pub types: Vec<(String, TypeCount)>,
}

impl Snapshot {
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The audit log's newest signed checkpoint in the snapshot, as served
    /// by `GET /audit/checkpoint`.
    pub async fn audit_checkpoint(&mut self) -> StoreResult<Option<serde_json::Value>> {
        Ok(super::audit::latest_checkpoint_on(&mut self.tx)
            .await?
            .map(|c| c.to_json()))
    }

    /// Streams every row of `table` to `each` (which may stop the copy with
    /// an error of its own).
    pub async fn rows<E: From<StoreError>>(
        &mut self,
        table: &Table,
        mut each: impl FnMut(Vec<Cell>) -> Result<(), E>,
    ) -> Result<(), E> {
        let select: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                let q = quoted(&c.name);
                match (c.kind, self.dialect) {
                    (Kind::Int, _) => format!("CAST({q} AS BIGINT)"),
                    (Kind::Real, Dialect::Sqlite) => format!("CAST({q} AS REAL)"),
                    (Kind::Real, Dialect::Postgres) => format!("CAST({q} AS DOUBLE PRECISION)"),
                    (Kind::Text, _) => q,
                }
            })
            .collect();
        let sql = format!("SELECT {} FROM {}", select.join(", "), quoted(&table.name));
        let mut stream = sqlx::query(&sql).fetch(&mut *self.tx);
        while let Some(row) = stream.try_next().await.map_err(StoreError::from)? {
            let mut cells = Vec::with_capacity(table.columns.len());
            for (i, c) in table.columns.iter().enumerate() {
                let cell = match c.kind {
                    Kind::Int => row.try_get::<Option<i64>, _>(i).map(|v| v.map(Cell::Int)),
                    Kind::Real => row.try_get::<Option<f64>, _>(i).map(|v| v.map(Cell::Real)),
                    Kind::Text => row
                        .try_get::<Option<String>, _>(i)
                        .map(|v| v.map(Cell::Text)),
                }
                .map_err(StoreError::from)?;
                cells.push(cell.unwrap_or(Cell::Null));
            }
            each(cells)?;
        }
        Ok(())
    }

    /// Ends the read transaction.
    pub async fn finish(self) -> StoreResult<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// Loads rows into an empty database inside one write transaction; nothing
/// is visible until [`Restorer::commit`], and dropping it rolls back.
pub struct Restorer {
    tx: Tx,
    dialect: Dialect,
    tables: Vec<Table>,
}

impl Restorer {
    /// This database's definition of `name`, if it has that table.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Inserts `rows` (in `columns` order) into `table`.
    pub async fn insert(
        &mut self,
        table: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = columns.iter().map(|c| quoted(&c.name)).collect();
        let per_row = columns.len().max(1);
        for chunk in rows.chunks((4000 / per_row).max(1)) {
            let mut sql = format!(
                "INSERT INTO {} ({}) VALUES ",
                quoted(table),
                names.join(", ")
            );
            let mut n = 0;
            for (i, _) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let marks: Vec<String> = (0..columns.len())
                    .map(|_| {
                        n += 1;
                        format!("${n}")
                    })
                    .collect();
                sql.push_str(&format!("({})", marks.join(", ")));
            }
            let mut q = sqlx::query(&sql);
            for row in chunk {
                for (cell, column) in row.iter().zip(columns) {
                    q = match (cell, column.kind) {
                        (Cell::Int(v), _) => q.bind(*v),
                        (Cell::Real(v), _) => q.bind(*v),
                        (Cell::Text(v), _) => q.bind(v.as_str()),
                        (Cell::Null, Kind::Int) => q.bind(None::<i64>),
                        (Cell::Null, Kind::Real) => q.bind(None::<f64>),
                        (Cell::Null, Kind::Text) => q.bind(None::<String>),
                    };
                }
            }
            q.execute(self.tx.conn()).await?;
        }
        Ok(())
    }

    /// Rows per table and counts per resource type as restored so far.
    pub async fn counts(&mut self) -> StoreResult<(Vec<(String, i64)>, Vec<(String, TypeCount)>)> {
        let tables = self.tables.clone();
        counts(self.tx.conn(), &tables).await
    }

    /// Moves PostgreSQL's sequences past the restored keys, then commits
    /// (raising the circle generation: a server already running on this
    /// database reads every circle afresh).
    pub async fn commit(mut self) -> StoreResult<()> {
        self.tx.circle_changed();
        if self.dialect == Dialect::Postgres {
            let serials = sqlx::query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND column_default LIKE 'nextval(%'",
            )
            .fetch_all(self.tx.conn())
            .await?;
            for r in serials {
                let (table, column): (String, String) = (r.try_get(0)?, r.try_get(1)?);
                sqlx::query(&format!(
                    "SELECT setval(pg_get_serial_sequence($1, $2), \
                     COALESCE((SELECT MAX({c}) FROM {t}), 0) + 1, false)",
                    c = quoted(&column),
                    t = quoted(&table)
                ))
                .bind(&table)
                .bind(&column)
                .fetch_one(self.tx.conn())
                .await?;
            }
        }
        self.tx.commit().await
    }
}
