//! FHIR R4: wire formats, resource types, and the shapes ehrx builds
//! (OperationOutcome, Bundle), kept apart from HTTP and storage.
pub mod bundle;
pub mod codec;
pub mod json;
pub mod locate;
pub mod media;
pub mod outcome;
pub mod patch;
pub mod reference;
pub mod summary;
pub mod types;
pub mod validate;

pub use media::Format;
pub use outcome::{operation_outcome, Issue};

/// The canonical text form of an instant (`meta.lastUpdated`, and in the
/// store, where it sorts as text).
pub fn format_instant(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Unix seconds as a FHIR instant (as [`format_instant`]).
pub fn unix_instant(secs: i64) -> String {
    format_instant(chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default())
}
