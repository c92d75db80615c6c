//! `ehrx import`: loading Bundles from files straight into the store.
//!
//! transaction and batch Bundles are processed as the API would process
//! them; a collection Bundle is loaded as one transaction (entries with an
//! id are updated-or-created under that id, the rest created). Files that
//! fail are retried once after the others, so Bundles that depend on each
//! other (conditional references) load in any order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::config::Config;
use crate::fhir::codec;
use crate::interaction::bundle;
use crate::interaction::Env;
use crate::policy::{Access, Maintenance};
use crate::store::{Gate, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Counts per resource type and the files that failed.
#[derive(Debug, Default)]
pub struct Report {
    /// resource type → (created, matched or updated)
    pub counts: BTreeMap<String, (u64, u64)>,
    pub files_loaded: usize,
    pub failed: Vec<(PathBuf, String)>,
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = format!("loaded {} file(s)\n", self.files_loaded);
        if !self.counts.is_empty() {
            s.push_str(&format!(
                "{:<32} {:>9} {:>9}\n",
                "resource type", "created", "existing"
            ));
            for (t, (c, u)) in &self.counts {
                s.push_str(&format!("{t:<32} {c:>9} {u:>9}\n"));
            }
        }
        if !self.failed.is_empty() {
            s.push_str(&format!("{} file(s) failed:\n", self.failed.len()));
            for (p, why) in &self.failed {
                s.push_str(&format!("  {}: {why}\n", p.display()));
            }
        }
        s
    }
}

/// Every Bundle file under `paths` (directories are read one level deep,
/// sorted by name).
fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ImportError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| ImportError::Io(p.clone(), e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    matches!(
                        f.extension().and_then(|e| e.to_str()),
                        Some("json") | Some("xml")
                    )
                })
                .collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// A collection Bundle as a transaction.
fn collection_as_transaction(b: &Value) -> Value {
    let entries: Vec<Value> = b
        .get("entry")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|e| {
                    let r = e.get("resource")?;
                    let t = r.get("resourceType")?.as_str()?;
                    let request = match r.get("id").and_then(Value::as_str) {
                        Some(id) => json!({"method": "PUT", "url": format!("{t}/{id}")}),
                        None => json!({"method": "POST", "url": t}),
                    };
                    let mut out = json!({"resource": r, "request": request});
                    if let Some(f) = e.get("fullUrl") {
                        out["fullUrl"] = f.clone();
                    }
                    Some(out)
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Loads one file; returns the response Bundle or why it failed.
pub async fn load_file(gate: &Gate, env: &Env, path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let is_xml = path.extension().and_then(|e| e.to_str()) == Some("xml");
    let parsed = if is_xml {
        codec::parse_xml(&bytes)
    } else {
        codec::parse_json(&bytes)
    }
    .map_err(|f| match f.expression {
        Some(e) => format!("{} at {e}", f.message),
        None => f.message,
    })?;
    if parsed.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("not a Bundle".into());
    }
    let b = match parsed.get("type").and_then(Value::as_str) {
        Some("transaction") | Some("batch") => parsed,
        Some("collection") | Some("searchset") | Some("document") => {
            collection_as_transaction(&parsed)
        }
        other => return Err(format!("Bundle type {other:?} cannot be imported")),
    };
    bundle::process(gate, env, b)
        .await
        .map_err(|e| e.to_string())
}

/// Adds a response Bundle's entries to the counts; returns the failures of a
/// batch (entries whose status is not 2xx).
fn tally(report: &mut Report, response: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, e) in response
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let status = e
            .pointer("/response/status")
            .and_then(Value::as_str)
            .unwrap_or("");
        let rtype = e
            .pointer("/resource/resourceType")
            .and_then(Value::as_str)
            .or_else(|| {
                e.pointer("/response/location")
                    .and_then(Value::as_str)
                    .and_then(|l| l.split('/').next())
            })
            .unwrap_or("(none)")
            .to_string();
        let counts = report.counts.entry(rtype).or_default();
        if status.starts_with("201") {
            counts.0 += 1;
        } else if status.starts_with('2') {
            counts.1 += 1;
        } else {
            let why = e
                .pointer("/response/outcome/issue/0/diagnostics")
                .and_then(Value::as_str)
                .unwrap_or(status);
            failures.push(format!("entry {i}: {why}"));
        }
    }
    failures
}

/// Imports every file under `paths`.
pub async fn run(
    config: &Config,
    paths: &[PathBuf],
    progress: bool,
) -> Result<Report, ImportError> {
    let files = collect(paths)?;
    let store = config.open_store(config.db_pool_size).await?;
    // The importer is the operator's own tool: unrestricted access, by name.
    let gate = store.gate(Access::maintenance(Maintenance::Import));
    let env = Env::from_config(config);
    let bar = if progress {
        let b = ProgressBar::new(files.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut report = Report::default();
    let mut pending = files;
    let mut last_failures: Vec<(PathBuf, String)>;
    loop {
        last_failures = Vec::new();
        let mut progressed = false;
        for f in &pending {
            bar.set_message(
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            match load_file(&gate, &env, f).await {
                Ok(resp) => {
                    progressed = true;
                    report.files_loaded += 1;
                    let failures = tally(&mut report, &resp);
                    if !failures.is_empty() {
                        report.failed.push((f.clone(), failures.join("; ")));
                    }
                    bar.inc(1);
                }
                Err(why) => last_failures.push((f.clone(), why)),
            }
        }
        if last_failures.is_empty() || !progressed {
            break;
        }
        // Retry what failed now that more has loaded.
        pending = last_failures.iter().map(|(p, _)| p.clone()).collect();
    }
    bar.inc(last_failures.len() as u64);
    bar.finish_and_clear();
    report.failed.extend(last_failures);
    store.close().await;
    Ok(report)
}
