//! `ehrx audit export`: the entries recorded since a date, as NDJSON, each
//! with its inclusion proof in a checkpoint signed for the export, so that
//! whoever receives the file can check every entry against the checkpoint
//! (and the checkpoint against the published key) without the database.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::store::audit::{self, AuditLog};
use crate::store::StoreError;

/// Writes the export to `out` (standard output when `None`); returns the
/// number of entries written.
pub async fn export(log: &AuditLog, since: &str, out: Option<&Path>) -> Result<u64, String> {
    let err = |e: StoreError| e.to_string();
    let checkpoint = log.checkpoint().await.map_err(err)?;
    let Some(checkpoint) = checkpoint else {
        return Ok(0);
    };
    let mut sink: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    writeln!(sink, "{}", json!({ "checkpoint": checkpoint.to_json() }))
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    audit::export(log.store(), since, |e| {
        rows.push(e);
        Ok(())
    })
    .await
    .map_err(err)?;
    let mut n = 0;
    for e in rows {
        if e.seq >= checkpoint.size {
            break;
        }
        let proof = log
            .inclusion(e.seq, checkpoint.size)
            .await
            .map_err(err)?
            .map(|(_, _, path)| path.iter().map(|h| B64.encode(h)).collect::<Vec<_>>())
            .unwrap_or_default();
        let entry: Value = match &e.body {
            Some(b) => serde_json::from_str(b).unwrap_or(Value::Null),
            None => Value::Null,
        };
        let line = json!({
            "index": e.seq,
            "digest": e.digest,
            "body": e.body,
            "entry": entry,
            "inclusion": { "size": checkpoint.size, "proof": proof },
        });
        writeln!(sink, "{line}").map_err(|e| e.to_string())?;
        n += 1;
    }
    sink.flush().map_err(|e| e.to_string())?;
    Ok(n)
}
