//! Caps on the work one request may cause.
//!
//! A caller is assumed hostile: every list, depth, repeat and length it can
//! send has a ceiling, answered with a 4xx OperationOutcome rather than a
//! stalled worker, an exhausted pool or an aborted process. The values come
//! from the configuration at start; they live here, process-wide, because
//! the parsers that enforce them (search criteria, XML, narratives) sit deep
//! in call trees that carry no request context: each request runs in the
//! scope of its server's limits ([`scope`]); other work (the command-line
//! tools) uses the process-wide value ([`install`]).

use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// The caps, each configurable: `[limits]` in `ehrx.toml`, or
/// `EHRX_LIMITS__<NAME>` (e.g. `EHRX_LIMITS__SEARCH_REPEATS=8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Search criteria (parameters that select) in one request.
    pub search_criteria: usize,
    /// Repeats of one search parameter (`date=ge…&date=le…` is two).
    pub search_repeats: usize,
    /// Comma-separated alternatives in one search value.
    pub search_or_values: usize,
    /// Length of one search value, in bytes.
    pub search_value_bytes: usize,
    /// `_include` and `_revinclude` parameters in one search.
    pub search_includes: usize,
    /// Resources added to one page by `_include`/`_revinclude`.
    pub included_resources: usize,
    /// Element nesting of an XML body and of a narrative's XHTML.
    pub nesting_depth: usize,
    /// Entries of one batch or transaction.
    pub bundle_entries: usize,
    /// Operations of one JSON Patch document.
    pub patch_operations: usize,
    /// Serialised size of a resource a JSON Patch may produce, in bytes.
    pub patch_result_bytes: usize,
}

/// The defaults: generous for clinical use, far below what hurts.
const DEFAULT: Limits = Limits {
    search_criteria: 64,
    search_repeats: 16,
    search_or_values: 100,
    search_value_bytes: 4096,
    search_includes: 16,
    included_resources: 1000,
    nesting_depth: 128,
    bundle_entries: 20_000,
    patch_operations: 1000,
    patch_result_bytes: 16 * 1024 * 1024,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT
    }
}

static LIMITS: RwLock<Limits> = RwLock::new(DEFAULT);

tokio::task_local! {
    static SCOPED: Limits;
}

/// The caps in force: the request's, else the process-wide ones.
pub fn get() -> Limits {
    SCOPED
        .try_with(|l| *l)
        .unwrap_or_else(|_| match LIMITS.read() {
            Ok(l) => *l,
            Err(poisoned) => *poisoned.into_inner(),
        })
}

/// Runs `f` (a request) under `limits`.
pub async fn scope<F: std::future::Future>(limits: Limits, f: F) -> F::Output {
    SCOPED.scope(limits, f).await
}

/// Puts `limits` in force (at start, from the configuration).
pub fn install(limits: Limits) {
    match LIMITS.write() {
        Ok(mut l) => *l = limits,
        Err(poisoned) => *poisoned.into_inner() = limits,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_static_initial_value_is_the_default() {
        assert_eq!(super::get(), super::Limits::default());
    }
}
