//! The audit: every access to a health record is recorded before it is
//! answered, in a log that anyone holding a checkpoint can check later.
//!
//! This module is pure (no SQL, no HTTP); it depends on `fhir` only:
//! - [`event`]: the AuditEvent of one access, shaped after IHE Basic Audit
//!   Log Patterns (BALP), and the searchable columns taken from it;
//! - [`context`]: what the request being served has touched (the patients
//!   of the resources read or written) and who it is for, collected by the
//!   caller-scoped store as it runs;
//! - [`packed`]: how an entry's body is stored (compressed against a fixed
//!   dictionary);
//! - [`tree`]: the log as an RFC 6962 Merkle tree (`ct-merkle`);
//! - [`checkpoint`]: signed checkpoints (tree size and root);
//! - [`verify`]: recomputing the log from its rows and naming the first
//!   entry that was changed, inserted, removed or moved.
//!
//! Persistence and the group-committing writer are `store::audit`; the HTTP
//! seam (the middleware every FHIR, SMART and exchange request passes, the
//! log's endpoints) is `api::audit`.
//!
//! To record an event from elsewhere (consent changes, break-the-glass,
//! amendments), build an [`event::Event`] and hand it to
//! `store::audit::AuditLog::record` (committed before it returns), or call
//! [`context::set_purpose`] during a request so its events carry the
//! purpose of use (e.g. `BTG`, which `$access-log` marks).

pub mod checkpoint;
pub mod context;
pub mod event;
pub mod packed;
pub mod tree;
pub mod verify;

pub use event::{Action, Event, EventType, Outcome};
