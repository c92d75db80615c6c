//! ehrx — the eHealth Record eXchange: a FHIR R4 server.
//!
//! Request path: `api` (HTTP, formats) → `auth` (bearer token → caller)
//! → `policy` (what the caller may do, consulted by every interaction) →
//! `interaction` (the FHIR interactions as plain functions) → `store` (sqlx
//! persistence) with `search` providing criteria and index tokens.

pub mod api;
pub mod audit;
pub mod audit_export;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod error;
pub mod exchange;
pub mod fhir;
pub mod import;
pub mod interaction;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod search;
pub mod server;
pub mod store;

pub use config::Config;
pub use error::{Error, Result};
