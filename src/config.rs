//! Configuration: defaults, then `ehrx.toml`, then `EHRX_*` environment variables.

use std::path::Path;

use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Socket address to listen on (`EHRX_LISTEN`).
    pub listen: String,
    /// Public base URL of the FHIR endpoint, used in links and `Location`
    /// (`EHRX_BASE_URL`); defaults to `http://{listen}`.
    pub base_url: Option<String>,
    /// `sqlite:…` (default `./ehrx.db`) or `postgres://…` (`EHRX_DATABASE_URL`).
    pub database_url: String,
    /// Largest accepted request body in bytes (`EHRX_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Page size of searches and history when `_count` is absent (`EHRX_DEFAULT_COUNT`).
    pub default_count: usize,
    /// Largest page size a client may ask for (`EHRX_MAX_COUNT`).
    pub max_count: usize,
    /// Database connection pool size (`EHRX_DB_POOL_SIZE`).
    pub db_pool_size: u32,
    /// Log filter in `tracing` syntax (`EHRX_LOG`), e.g. `info,ehrx=debug`.
    pub log: String,
    /// Largest signed document `POST /exchange/documents` accepts, in bytes
    /// (`EHRX_EXCHANGE_MAX_DOCUMENT_BYTES`).
    pub exchange_max_document_bytes: usize,
    /// Deepest element nesting accepted in exchanged XML (`EHRX_EXCHANGE_MAX_DEPTH`).
    pub exchange_max_depth: usize,
    /// Folder of the C-CDA mapping rules (`EHRX_MAPPINGS_DIR`); defaults to
    /// `./mappings` when present, else the rules built into the binary.
    pub mappings_dir: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM; `EHRX_TLS_CERT_FILE`);
    /// clients may then present certificates (mutual TLS per subscriber).
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The private key of `tls_cert_file` (PEM; `EHRX_TLS_KEY_FILE`).
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Development only: serve the FHIR API without authorization
    /// (`EHRX_AUTH_DISABLED=true`). Off unless set explicitly; a warning is
    /// logged at every start while it is on.
    pub auth_disabled: bool,
    /// Lifetime of access and id tokens in seconds
    /// (`EHRX_ACCESS_TOKEN_LIFETIME`), at most a day.
    pub access_token_lifetime: i64,
    /// A file holding the key (32 bytes, base64) that seals the private keys
    /// kept in the database (`EHRX_KEY_ENCRYPTION_KEY_FILE`).
    pub key_encryption_key_file: Option<std::path::PathBuf>,
    /// Longest a request may run before it is answered 503, in seconds
    /// (`EHRX_REQUEST_TIMEOUT`); its database work is abandoned with it.
    pub request_timeout: u64,
    /// Longest one SQL statement may run on PostgreSQL, in seconds
    /// (`EHRX_STATEMENT_TIMEOUT`); the server cancels it after that.
    pub statement_timeout: u64,
    /// Sign-in attempts one account may make per minute
    /// (`EHRX_LOGIN_ATTEMPTS_PER_MINUTE`); more get 429.
    pub login_attempts_per_minute: u32,
    /// Token requests one client may make per minute
    /// (`EHRX_TOKEN_REQUESTS_PER_MINUTE`); more get 429.
    pub token_requests_per_minute: u32,
    /// Longest a revoked access token, or one of a disabled client or
    /// user, may still be honoured by a server process other than the one
    /// that revoked it, in milliseconds (`EHRX_REVOCATION_MAX_DELAY_MS`).
    /// Each process reads the revocation log four times in this span and
    /// stops answering from its memory of checked tokens when it could not
    /// read the log for this long. The process that revoked honours
    /// nothing revoked from the next request on.
    pub revocation_max_delay_ms: u64,
    /// Caps on what one request may ask for (`[limits]`).
    pub limits: crate::limits::Limits,
    /// Origins (`scheme://host[:port]`) whose browser scripts may call the
    /// FHIR API, discovery, token, introspection and revocation endpoints
    /// (CORS; `EHRX_CORS_ORIGINS`, comma-separated); `*` allows any origin.
    /// Empty (the default): the origins of the redirect URIs of the
    /// registered clients.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_origins: Vec<String>,
    /// `text` (the default; colours only on a terminal) or `json` (one JSON
    /// object per line) (`EHRX_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Serve `/metrics`, `/health/live` and `/health/ready` on this socket
    /// address only, instead of beside the API (`EHRX_OPS_LISTEN`).
    pub ops_listen: Option<String>,
    /// Several `ehrx serve` processes share the database (`EHRX_CLUSTER`):
    /// refused unless the database is PostgreSQL.
    pub cluster: bool,
    /// Seconds between scheduled backups; 0 (the default) takes none
    /// (`EHRX_BACKUP_INTERVAL`).
    pub backup_interval: u64,
    /// Where scheduled backups go (`EHRX_BACKUP_DIR`).
    pub backup_dir: std::path::PathBuf,
    /// Scheduled backups kept; older ones are removed (`EHRX_BACKUP_KEEP`).
    pub backup_keep: usize,
    /// Who sees a patient's record when no Consent of theirs decides
    /// (`EHRX_CONSENT_DEFAULT`): `permit-treatment` (the default: their
    /// general practitioner and care teams) or `deny` (nobody).
    pub consent_default: crate::policy::consent::ConsentDefault,
    /// The insurers' policy file (`EHRX_INSURER_POLICY`); the built-in
    /// `policies/insurer.json` when unset.
    pub insurer_policy: Option<std::path::PathBuf>,
    /// How long a break-the-glass grant lasts, in minutes
    /// (`EHRX_EMERGENCY_ACCESS_MINUTES`, 1 to 1440).
    pub emergency_access_minutes: u64,
    /// The resource types whose existing resources a practitioner changes
    /// or deletes only with a second practitioner's approval (four-eyes
    /// amendments; `EHRX_AMENDMENT_TYPES`, comma-separated). Unset: every
    /// type of the Patient compartment but `Consent` (a Patient's
    /// demographic elements and patient-reported data are never gated);
    /// an empty list turns amendments off.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_list_or_commas"
    )]
    pub amendment_types: Option<Vec<String>>,
    /// Record every access in the audit log before answering it
    /// (`EHRX_AUDIT`; default on). Off only to measure what the audit costs.
    pub audit: bool,
    /// Seconds between signed audit checkpoints
    /// (`EHRX_AUDIT_CHECKPOINT_INTERVAL`); 0 signs none on a schedule.
    pub audit_checkpoint_interval: u64,
    /// Days an audit entry's content is kept, cleared at each checkpoint
    /// and by `ehrx audit prune` (`EHRX_AUDIT_RETENTION_DAYS`);
    /// 0 (the default) keeps everything. Entries at or after the newest
    /// checkpoint a witness fetched are never cleared.
    pub audit_retention_days: u64,
    /// Longest the audit log's writer waits, in microseconds, once a batch
    /// has begun, for the entries of requests still being answered,
    /// gathering them into the same commit (`EHRX_AUDIT_BATCH_WINDOW_US`;
    /// SQLite); it commits at once when every request in flight has sent
    /// its entries. Fewer, larger commits under load, at the cost of up to
    /// this much more latency per request. 0 commits whatever has queued
    /// at once.
    pub audit_batch_window_us: u64,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether `s` is an http(s) origin: no path, query, fragment or user.
fn is_origin(s: &str) -> bool {
    reqwest::Url::parse(s).is_ok_and(|u| {
        u.path() == "/"
            && u.query().is_none()
            && u.fragment().is_none()
            && u.username().is_empty()
            && u.password().is_none()
    }) && crate::auth::clients::origin_of(s).is_some()
}

/// A list from TOML, or a comma-separated string from the environment.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(l) => l,
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

fn optional_list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    list_or_commas(d).map(Some)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            base_url: None,
            database_url: "sqlite:ehrx.db".into(),
            max_body_bytes: 32 * 1024 * 1024,
            default_count: 50,
            max_count: 1000,
            db_pool_size: 8,
            log: "info".into(),
            exchange_max_document_bytes: 8 * 1024 * 1024,
            exchange_max_depth: 128,
            mappings_dir: None,
            tls_cert_file: None,
            tls_key_file: None,
            auth_disabled: false,
            access_token_lifetime: 3600,
            key_encryption_key_file: None,
            request_timeout: 60,
            login_attempts_per_minute: 10,
            token_requests_per_minute: 300,
            revocation_max_delay_ms: 1000,
            statement_timeout: 30,
            limits: crate::limits::Limits::default(),
            cors_origins: Vec::new(),
            log_format: LogFormat::Text,
            ops_listen: None,
            cluster: false,
            backup_interval: 0,
            backup_dir: "backups".into(),
            backup_keep: 7,
            consent_default: crate::policy::consent::ConsentDefault::PermitTreatment,
            insurer_policy: None,
            emergency_access_minutes: 60,
            amendment_types: None,
            audit: true,
            audit_checkpoint_interval: 60,
            audit_retention_days: 0,
            audit_batch_window_us: 300,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// The insurers' policy: the file `insurer_policy` names, or the
    /// built-in one.
    pub fn insurer_policy(&self) -> Result<crate::policy::insurer::InsurerPolicy, String> {
        match &self.insurer_policy {
            None => Ok(crate::policy::insurer::InsurerPolicy::built_in()),
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("insurer_policy {}: {e}", f.display()))?;
                crate::policy::insurer::InsurerPolicy::parse(&text)
            }
        }
    }

    /// Loads the configuration: built-in defaults, then the TOML file (if it
    /// exists), then `EHRX_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file.unwrap_or_else(|| Path::new("ehrx.toml"));
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(
                Env::prefixed("EHRX_")
                    .ignore(&["test_database_url"])
                    .split("__"),
            )
            .extract()
            .map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.default_count == 0 || self.max_count == 0 || self.default_count > self.max_count {
            return Err(ConfigError(
                "default_count and max_count must be positive, default_count <= max_count".into(),
            ));
        }
        if self.exchange_max_document_bytes == 0 || self.exchange_max_depth == 0 {
            return Err(ConfigError(
                "exchange_max_document_bytes and exchange_max_depth must be positive".into(),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError(
                "tls_cert_file and tls_key_file must be given together".into(),
            ));
        }
        if !(1..=crate::auth::KEY_RETENTION).contains(&self.access_token_lifetime) {
            return Err(ConfigError(format!(
                "access_token_lifetime must be between 1 and {} seconds",
                crate::auth::KEY_RETENTION
            )));
        }
        for origin in &self.cors_origins {
            if origin != "*" && !is_origin(origin) {
                return Err(ConfigError(format!(
                    "cors_origins: '{origin}' is not an origin (scheme://host[:port], or *)"
                )));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError("max_body_bytes must be positive".into()));
        }
        if !(40..=60_000).contains(&self.revocation_max_delay_ms) {
            return Err(ConfigError(
                "revocation_max_delay_ms must be between 40 and 60000".into(),
            ));
        }
        if self.login_attempts_per_minute == 0 || self.token_requests_per_minute == 0 {
            return Err(ConfigError(
                "login_attempts_per_minute and token_requests_per_minute must be positive".into(),
            ));
        }
        if self.request_timeout == 0 || self.statement_timeout == 0 {
            return Err(ConfigError(
                "request_timeout and statement_timeout must be positive".into(),
            ));
        }
        if self.cluster && !self.database_url.starts_with("postgres") {
            return Err(ConfigError(
                "cluster = true needs PostgreSQL (database_url = \"postgres://…\"): SQLite is \
                 one file on one machine, and several servers cannot share it safely; run one \
                 server, or move the data with `ehrx backup` and `ehrx restore`"
                    .into(),
            ));
        }
        if !(1..=1440).contains(&self.emergency_access_minutes) {
            return Err(ConfigError(
                "emergency_access_minutes must be between 1 and 1440".into(),
            ));
        }
        self.insurer_policy().map_err(ConfigError)?;
        for t in self.amendment_types.iter().flatten() {
            if !crate::fhir::types::is_resource_type(t) {
                return Err(ConfigError(format!(
                    "amendment_types: '{t}' is not a FHIR R4 resource type"
                )));
            }
        }
        if self.backup_keep == 0 {
            return Err(ConfigError("backup_keep must be positive".into()));
        }
        let l = &self.limits;
        if [
            l.search_criteria,
            l.search_repeats,
            l.search_or_values,
            l.search_value_bytes,
            l.search_includes,
            l.included_resources,
            l.nesting_depth,
            l.bundle_entries,
            l.patch_operations,
            l.patch_result_bytes,
        ]
        .contains(&0)
        {
            return Err(ConfigError(
                "every value under [limits] must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Opens the configured database (bringing its schema up to date), with
    /// the private keys it keeps sealed by the key-encryption key when one is
    /// configured.
    pub async fn open_store(
        &self,
        pool_size: u32,
    ) -> Result<crate::store::Store, crate::store::StoreError> {
        use crate::store::{secrets::Secrets, Store, StoreError};
        let secrets = match &self.key_encryption_key_file {
            Some(path) => Secrets::from_file(path).map_err(StoreError::Secret)?,
            None => Secrets::default(),
        };
        let statement_timeout = std::time::Duration::from_secs(self.statement_timeout);
        Ok(
            Store::open(&self.database_url, pool_size, statement_timeout)
                .await?
                .with_secrets(secrets),
        )
    }

    /// The public FHIR base URL, without a trailing slash.
    pub fn revocation_max_delay(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.revocation_max_delay_ms)
    }

    /// The types four-eyes amendments gate (`amendment_types`).
    pub fn amendment_types(&self) -> Vec<String> {
        match &self.amendment_types {
            Some(list) => list.clone(),
            None => crate::policy::rights::default_amendment_types(),
        }
    }

    pub fn base_url(&self) -> String {
        match &self.base_url {
            Some(b) => b.trim_end_matches('/').to_string(),
            None if self.tls_cert_file.is_some() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }
}

#[cfg(test)]
mod amendment_types_tests {
    use super::*;

    fn with(toml: &str) -> Config {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap()
    }

    #[test]
    fn amendment_types_default_to_the_compartment_and_can_be_listed_or_emptied() {
        let d = with("");
        assert_eq!(d.amendment_types, None);
        assert!(d.amendment_types().contains(&"Observation".to_string()));
        assert!(with("amendment_types = []").amendment_types().is_empty());
        // As the environment gives it: one comma-separated string.
        assert_eq!(
            with("amendment_types = \"Observation, Condition\"").amendment_types(),
            ["Observation", "Condition"]
        );
        let bad = Config {
            amendment_types: Some(vec!["Nonsense".into()]),
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }
}
