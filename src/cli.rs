//! Command line: `ehrx serve | migrate | import | reindex | explain |
//! backup | restore | client | user | keys | launch | subscriber |
//! exchange-cert`.

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
    /// Back up the whole database into one file (`--out FILE`), while the
    /// server runs; or check a backup (`ehrx backup verify FILE`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Backup {
        #[command(subcommand)]
        command: Option<BackupCommand>,
        /// The file to write (gzip-compressed JSON lines; written under a
        /// temporary name and renamed when complete).
        #[arg(long, required = true)]
        out: Option<PathBuf>,
    },
    /// Restore a backup into an empty database; a damaged or truncated file
    /// is refused before anything is written. Prints what was restored.
    Restore {
        /// A file written by `ehrx backup`.
        file: PathBuf,
    },
    /// OAuth clients of the authorization server.
    #[command(subcommand)]
    Client(ClientCommand),
    /// People who log in (practitioners, patients, related persons).
    #[command(subcommand)]
    User(UserCommand),
    /// Token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Mint an EHR launch context; prints `{"launch": "…"}`.
    Launch {
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        encounter: Option<String>,
    },
    /// Manage the subscribers of the signed-XML exchange and their certificates.
    Subscriber {
        #[command(subcommand)]
        command: SubscriberCommand,
    },
    /// The audit log: verify it, export it, sign a checkpoint, apply
    /// retention.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print ehrx's exchange certificate (PEM), which subscribers use to
    /// encrypt for ehrx and to verify what ehrx signs with RSA-SHA256.
    /// Generates the keys on first use.
    ExchangeCert {
        /// Print the certificate of the EC P-256 key instead, which verifies
        /// what ehrx signs with ECDSA-SHA256.
        #[arg(long)]
        ecdsa: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Check a backup without restoring it: complete, unaltered, and every
    /// count as its manifest says. Prints the manifest.
    Verify { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the log's Merkle tree from the database and check every
    /// entry, the recorded size and every signed checkpoint; prints a JSON
    /// report naming the first entry changed, inserted or removed, and
    /// exits non-zero if there is one.
    Verify {
        /// Also check against this checkpoint (as `GET /audit/checkpoint`
        /// served it, e.g. kept by a witness).
        #[arg(long)]
        from_checkpoint: Option<PathBuf>,
    },
    /// Write the entries recorded since DATE as NDJSON, each with its
    /// inclusion proof in the newest signed checkpoint (signed now).
    Export {
        /// A FHIR date or instant (`2026-01-31`, `2026-01-31T12:00:00Z`).
        #[arg(long)]
        since: String,
        /// The file to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign a checkpoint of the log as it is now; prints it.
    Checkpoint,
    /// Make a new checkpoint key: the next checkpoints are signed with it,
    /// the older keys stay published (`GET /audit/keys`) for the
    /// checkpoints they signed. Prints the new key's id.
    RotateKey,
    /// Clear the content of entries older than `audit_retention_days`
    /// (never past the newest checkpoint a witness fetched).
    Prune {
        /// Clear entries recorded before this FHIR date or instant instead.
        #[arg(long)]
        before: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register a client; prints its `client_id` (and secret) as JSON.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long = "type", value_enum)]
        kind: crate::auth::clients::ClientKind,
        /// Allowed redirect URI (repeat for several).
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// The client's public keys (JWKS JSON file), for private_key_jwt.
        #[arg(long, conflicts_with = "jwks_url")]
        jwks_file: Option<PathBuf>,
        /// Where the client publishes its JWKS.
        #[arg(long)]
        jwks_url: Option<String>,
        /// The scopes the client may ever be granted (space-separated).
        #[arg(
            long,
            default_value = "openid fhirUser launch launch/patient offline_access online_access patient/*.rs user/*.rs"
        )]
        scope: String,
        /// Bind a backend client to an insurer's Organization
        /// (`Organization/ID`): it then reads only its members' permitted
        /// part (`policies/insurer.json`).
        #[arg(long)]
        organization: Option<String>,
        /// The insurer role in the policy file (default `claims`).
        #[arg(long, requires = "organization")]
        insurer_role: Option<String>,
    },
    /// Print every registered client as JSON (no secrets).
    List,
    /// Refuse a client new tokens and revoke every token it holds (on every
    /// server within `revocation_max_delay_ms`).
    Disable { client_id: String },
    /// Let a disabled client get tokens again.
    Enable { client_id: String },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user; the password is read from standard input.
    Add {
        #[arg(long)]
        username: String,
        /// Read the password from standard input (the only way to pass it).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// The FHIR resource that is this user, e.g. `Practitioner/123`.
        #[arg(long)]
        fhir_user: String,
    },
    /// Print every user as JSON (no password hashes).
    List,
    /// Refuse a user sign-in, end their sessions and revoke their tokens
    /// (on every server within `revocation_max_delay_ms`).
    Disable {
        /// Username or user id.
        user: String,
    },
    /// Let a disabled user sign in again.
    Enable {
        /// Username or user id.
        user: String,
    },
    /// Set a new password, read from standard input; the user's sessions
    /// end and their tokens are revoked.
    SetPassword {
        /// Username or user id.
        user: String,
        /// Read the password from standard input (the only way to pass it).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a new signing key and retire the current one.
    Rotate,
    /// Seal every private key in the database with a new key-encryption key
    /// (opening them with the configured `key_encryption_key_file`), or
    /// store them as PEM again without `--new-key-file`.
    Reseal {
        /// The new key-encryption key (32 bytes, base64).
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
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
