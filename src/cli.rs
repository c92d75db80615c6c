//! Command line: `ehrx serve | migrate | import | reindex | explain`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ehrx",
    version,
    about = "eHealth Record eXchange: a FHIR R4 server"
)]
pub struct Cli {
    /// Configuration file (TOML). Every key can be overridden by an
    /// `EHRX_<KEY>` environment variable.
    #[arg(long, global = true, default_value = "ehrx.toml")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the FHIR server (creates and migrates the database if needed).
    Serve,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Load batch, transaction or collection Bundles from files or directories.
    Import {
        /// JSON or XML Bundle files, or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Rebuild the search indexes of every current resource (after an
    /// upgrade that changes what is indexed).
    Reindex,
    /// Print the SQL and the database's query plan of a search, e.g.
    /// `ehrx explain 'Observation?patient=123&code=http://loinc.org|8867-4'`.
    Explain {
        /// `Type?query` or `Patient/ID/$everything`.
        search: String,
    },
}
