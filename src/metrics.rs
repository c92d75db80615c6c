//! Operational metrics, rendered for Prometheus at `GET /metrics`.
//!
//! Counters and histograms are recorded through the `metrics` facade into
//! one process-wide Prometheus recorder. Labels carry only bounded,
//! non-identifying values: the matched route template (`/{rtype}/{id}`, never
//! the URI), the method, the status code and fixed reason names, so no
//! resource id, query or other personal data ever reaches a metric.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `ehrx_http_requests_total` | method, route, status | requests answered |
//! | `ehrx_http_request_duration_seconds` | method, route | time to answer (histogram) |
//! | `ehrx_search_duration_seconds` | kind (`type`, `system`) | time to answer a search (histogram) |
//! | `ehrx_db_pool_connections` | state (`idle`, `in_use`) | database connections open |
//! | `ehrx_db_pool_max_connections` | | the pool's size |
//! | `ehrx_auth_failures_total` | endpoint (`api`, `oauth`), reason | refused tokens and OAuth requests |
//! | `ehrx_exchange_documents_total` | direction (`in`, `out`), outcome | signed documents received and sent |
//! | `ehrx_backups_total` | result (`ok`, `failed`) | scheduled backups |
//! | `ehrx_audit_events_total` | | audit entries appended by the group-commit writer |
//! | `ehrx_audit_batches_total` | result (`ok`, `failed`) | group-commit batches |
//! | `ehrx_audit_batch_events` | | entries per batch (summary) |
//! | `ehrx_audit_batch_requests` | | requests waiting on one batch (summary) |
//! | `ehrx_audit_commit_seconds` | | time to append and commit one batch (histogram) |
//! | `ehrx_audit_wait_seconds` | | time a response waited for its batch: the audit's lag (histogram) |
//! | `ehrx_audit_failures_total` | what (`append`, `checkpoint`) | audit writes that failed (their requests got 503) |
//! | `ehrx_audit_checkpoint_size` | | entries covered by the newest signed checkpoint |

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same
/// handle). `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("metrics are off: {e}");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "ehrx_http_requests_total",
        "HTTP requests answered, by method, route template and status"
    );
    describe_histogram!(
        "ehrx_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route template"
    );
    describe_histogram!(
        "ehrx_search_duration_seconds",
        Unit::Seconds,
        "Time to answer a FHIR search"
    );
    describe_gauge!(
        "ehrx_db_pool_connections",
        "Database connections open, idle or in use"
    );
    describe_gauge!("ehrx_db_pool_max_connections", "Size of the database pool");
    describe_counter!(
        "ehrx_auth_failures_total",
        "Refused bearer tokens (api) and refused OAuth requests (oauth), by reason"
    );
    describe_counter!(
        "ehrx_exchange_documents_total",
        "Signed documents received (in) and produced (out), by outcome"
    );
    describe_counter!("ehrx_backups_total", "Scheduled backups, by result");
    describe_counter!(
        "ehrx_audit_events_total",
        "Audit entries appended by the group-commit writer"
    );
    describe_counter!("ehrx_audit_batches_total", "Audit group-commit batches");
    describe_histogram!("ehrx_audit_batch_events", "Audit entries per batch");
    describe_histogram!(
        "ehrx_audit_batch_requests",
        "Requests waiting on one audit batch"
    );
    describe_histogram!(
        "ehrx_audit_commit_seconds",
        Unit::Seconds,
        "Time to append and commit one audit batch"
    );
    describe_histogram!(
        "ehrx_audit_wait_seconds",
        Unit::Seconds,
        "Time a response waited for its audit batch"
    );
    describe_counter!(
        "ehrx_audit_failures_total",
        "Audit writes that failed, by what"
    );
    describe_gauge!(
        "ehrx_audit_checkpoint_size",
        "Entries covered by the newest signed audit checkpoint"
    );
}

/// The metrics in the Prometheus text format, with the pool's use sampled
/// now.
pub fn render(pool: crate::store::PoolUse) -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    metrics::gauge!("ehrx_db_pool_connections", "state" => "idle").set(pool.idle as f64);
    metrics::gauge!("ehrx_db_pool_connections", "state" => "in_use")
        .set(pool.size.saturating_sub(pool.idle) as f64);
    metrics::gauge!("ehrx_db_pool_max_connections").set(pool.max as f64);
    handle.render()
}

/// One answered request. `route` is the matched route template.
pub fn request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let (method, route) = (method.to_string(), route.to_string());
    metrics::counter!(
        "ehrx_http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(
        "ehrx_http_request_duration_seconds",
        "method" => method.clone(),
        "route" => route.clone()
    )
    .record(elapsed.as_secs_f64());
    let search = match (method.as_str(), route.as_str()) {
        ("GET", "/") => Some("system"),
        ("GET", "/{rtype}") | ("POST", "/{rtype}/_search") => Some("type"),
        _ => None,
    };
    if let Some(kind) = search {
        metrics::histogram!("ehrx_search_duration_seconds", "kind" => kind)
            .record(elapsed.as_secs_f64());
    }
}

/// A refused bearer token (`api`) or OAuth request (`oauth`); `reason` is a
/// fixed code such as `invalid_token` or `invalid_grant`.
pub fn auth_failure(endpoint: &'static str, reason: &'static str) {
    metrics::counter!("ehrx_auth_failures_total", "endpoint" => endpoint, "reason" => reason)
        .increment(1);
}

/// A signed document received (`in`) or produced (`out`), with its outcome
/// (`accepted`, `refused`, `sent`).
pub fn exchange_document(direction: &'static str, outcome: &'static str) {
    metrics::counter!(
        "ehrx_exchange_documents_total",
        "direction" => direction,
        "outcome" => outcome
    )
    .increment(1);
}

/// A scheduled backup ended.
pub fn backup_finished(ok: bool) {
    metrics::counter!("ehrx_backups_total", "result" => if ok { "ok" } else { "failed" })
        .increment(1);
}

/// One audit group-commit batch: `events` entries for `requests` waiting
/// requests, committed (or not) in `elapsed`.
pub fn audit_batch(events: usize, requests: usize, elapsed: Duration, ok: bool) {
    metrics::counter!("ehrx_audit_batches_total", "result" => if ok { "ok" } else { "failed" })
        .increment(1);
    if ok {
        metrics::counter!("ehrx_audit_events_total").increment(events as u64);
    } else {
        audit_failure("append");
    }
    metrics::histogram!("ehrx_audit_batch_events").record(events as f64);
    metrics::histogram!("ehrx_audit_batch_requests").record(requests as f64);
    metrics::histogram!("ehrx_audit_commit_seconds").record(elapsed.as_secs_f64());
}

/// How long a response waited for its audit batch.
pub fn audit_wait(elapsed: Duration) {
    metrics::histogram!("ehrx_audit_wait_seconds").record(elapsed.as_secs_f64());
}

/// An audit write that failed (`append`, `checkpoint`).
pub fn audit_failure(what: &'static str) {
    metrics::counter!("ehrx_audit_failures_total", "what" => what).increment(1);
}

/// A signed audit checkpoint covering `size` entries.
pub fn audit_checkpoint(size: u64) {
    metrics::gauge!("ehrx_audit_checkpoint_size").set(size as f64);
}
