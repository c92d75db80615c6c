//! Command line: `ehrx serve | migrate | import | reindex | explain | subscriber | exchange-cert`.

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
    /// Manage the subscribers of the signed-XML exchange and their certificates.
    Subscriber {
        #[command(subcommand)]
        command: SubscriberCommand,
    },
    /// Print ehrx's exchange certificate (PEM), which subscribers use to
    /// encrypt for ehrx and to verify what ehrx signs. Generates the key pair
    /// on first use.
    ExchangeCert,
}

#[derive(Debug, Subcommand)]
pub enum SubscriberCommand {
    /// Register an organisation with its signing certificate; prints JSON
    /// with the ids of the created Organization (and Endpoint).
    Add {
        #[arg(long)]
        name: String,
        /// hospital, lab, radiology, insurer or pharmacy.
        #[arg(long)]
        kind: String,
        /// The signing certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where the organisation receives documents.
        #[arg(long)]
        endpoint: Option<String>,
        /// Take its documents only over mutual TLS with one of its certificates.
        #[arg(long)]
        require_mtls: bool,
    },
    /// Require (or with `--off`, stop requiring) mutual TLS for a subscriber.
    RequireMtls {
        /// `Organization/ID` or `ID`.
        #[arg(long)]
        organization: String,
        #[arg(long)]
        off: bool,
    },
    /// Add another signing certificate to a subscriber; older ones stay valid
    /// until they expire or are revoked.
    RotateCert {
        /// `Organization/ID` or `ID`.
        #[arg(long)]
        organization: String,
        #[arg(long)]
        cert: PathBuf,
    },
    /// Revoke a certificate by its SHA-256 fingerprint (hex, as `list` prints it).
    RevokeCert {
        #[arg(long)]
        fingerprint: String,
    },
    /// Print every registered certificate as JSON.
    List,
}
