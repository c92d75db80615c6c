//! Shared test set-up: a real ehrx server on an ephemeral loopback port with
//! a fresh database — a temporary SQLite file by default, or a fresh
//! PostgreSQL database when `EHRX_TEST_DATABASE_URL` names a server.
#![allow(dead_code)]

use std::path::PathBuf;

use ehrx::config::Config;
use ehrx::server::Server;
use serde_json::Value;
use sqlx::Connection;

pub mod records;
pub mod smart;

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub database_url: String,
    /// The token `client` sends, once [`TestServer::authorize`]d.
    pub token: Option<String>,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// A server run as its own `ehrx serve` process ([`TestServer::spawn`]).
    pub process: Option<std::process::Child>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(child) = self.process.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// A fresh database URL for one test.
pub async fn fresh_database(dir: &std::path::Path) -> String {
    match std::env::var("EHRX_TEST_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => {
            let name = format!("ehrx_test_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::postgres::PgConnection::connect(&url)
                .await
                .expect("connect to the PostgreSQL test server");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .expect("create test database");
            let (prefix, _) = url.rsplit_once('/').expect("database URL has a path");
            format!("{prefix}/{name}")
        }
        _ => format!("sqlite:{}", dir.join("ehrx.db").display()),
    }
}

/// The `ehrx` binary, with no `EHRX_*` settings inherited from the caller.
pub fn ehrx_bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ehrx"));
    for (k, _) in std::env::vars() {
        if k.starts_with("EHRX_") {
            c.env_remove(k);
        }
    }
    c
}

/// The test data the repository carries (`tests/data/testdata.tar.xz`,
/// sources and licences in `tests/data/SOURCES.md`), unpacked once per build
/// directory into a folder named after the archive's digest.
pub fn data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(unpack_test_data).clone()
}

fn unpack_test_data() -> PathBuf {
    use sha2::Digest as _;
    let archive = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/testdata.tar.xz");
    let bytes = std::fs::read(&archive).expect("tests/data/testdata.tar.xz");
    let digest = hex::encode(&sha2::Sha256::digest(&bytes)[..8]);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("ehrx-test-data-{digest}"));
    if dir.is_dir() {
        return dir;
    }
    // Unpacked beside, then renamed into place: test binaries running at the
    // same time never see a half-unpacked folder.
    let partial = tempfile::tempdir_in(&root).expect("temporary folder for the test data");
    let status = std::process::Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(partial.path())
        .status()
        .expect("run tar (with xz) to unpack the test data");
    assert!(status.success(), "tar -xJf {} failed", archive.display());
    let partial = partial.keep();
    if std::fs::rename(&partial, &dir).is_err() {
        // Another test binary got there first.
        let _ = std::fs::remove_dir_all(&partial);
    }
    dir
}

impl TestServer {
    /// A server with authorization on, whose `client` sends every request
    /// with a real `system/*.cruds` backend-services token: tests of FHIR
    /// behaviour itself go through the token check and the caller-scoped
    /// store like any client (restricted tokens: `tests/gate.rs`,
    /// `tests/smart.rs`).
    pub async fn start() -> TestServer {
        Self::start_authorized(|_| {}).await
    }

    /// [`TestServer::start`] with the configuration adjusted.
    pub async fn start_authorized(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut s = Self::start_with(adjust).await;
        s.authorize(&smart::admin_token(&s).await);
        s
    }

    /// Sends `token` with every request of `client` from now on.
    pub fn authorize(&mut self, token: &str) {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("token header"),
        );
        self.client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client");
        self.token = Some(token.to_string());
    }

    /// A server with authorization on (the default configuration).
    pub async fn start_secured() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = fresh_database(dir.path()).await;
        let mut config = Config {
            listen: "127.0.0.1:0".into(),
            database_url: database_url.clone(),
            log: "warn".into(),
            ..Config::default()
        };
        adjust(&mut config);
        let database_url = config.database_url.clone();
        // Bind first to learn the port, then set the base URL to match.
        let port = free_port();
        config.listen = format!("127.0.0.1:{port}");
        let base = format!("http://127.0.0.1:{port}");
        config.base_url = Some(base.clone());
        let server = Server::bind(config).await.expect("server starts");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
        });
        TestServer {
            base,
            client: reqwest::Client::new(),
            database_url,
            token: None,
            _dir: dir,
            shutdown: Some(tx),
            handle: Some(handle),
            process: None,
        }
    }

    /// A real `ehrx serve` process on `database_url`, its configuration
    /// given by `EHRX_*` variables (`env`; its listen address and, unless
    /// `env` sets it, its base URL are its own), its log in
    /// [`TestServer::log`]. Returns once it answers.
    pub async fn spawn(database_url: &str, env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut cmd = ehrx_bin();
        cmd.arg("serve")
            .current_dir(dir.path())
            .env("EHRX_LISTEN", format!("127.0.0.1:{port}"))
            .env("EHRX_BASE_URL", &base)
            .env("EHRX_DATABASE_URL", database_url)
            .env("EHRX_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ehrx serve");
        let mut s = TestServer {
            base,
            client: reqwest::Client::new(),
            database_url: database_url.to_string(),
            token: None,
            _dir: dir,
            shutdown: None,
            handle: None,
            process: Some(child),
        };
        s.wait_ready().await;
        s
    }

    /// Waits until the server answers `/metadata` with 200; panics with
    /// its log if its process ends first or it never does.
    pub async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(r) = self.client.get(self.url("metadata")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(child) = self.process.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("ehrx serve exited ({status}):\n{}", self.log());
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ehrx serve never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// What a spawned server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Sends SIGTERM to a spawned server and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.process.as_mut().expect("a spawned server");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = child.wait().expect("ehrx serve exits");
        self.process = None;
        exit
    }

    /// The `ehrx` binary against this server's database.
    pub fn ehrx(&self) -> std::process::Command {
        let mut c = ehrx_bin();
        c.env("EHRX_DATABASE_URL", &self.database_url)
            .env("EHRX_LOG", "error");
        c
    }

    /// `path` under the base URL; an absolute URL (a paging link) as it is.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            return path.to_string();
        }
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Content-Type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("Content-Type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Creates a resource and returns it as stored.
    pub async fn create(&self, body: &Value) -> Value {
        let rtype = body["resourceType"].as_str().unwrap();
        let r = self.post_json(rtype, body).await;
        assert_eq!(r.status(), 201, "create {rtype}");
        r.json().await.unwrap()
    }

    /// GETs `path`, expects success, returns the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Counts current resources of a type through the search API.
    pub async fn count(&self, rtype: &str) -> i64 {
        self.get_json(&format!("{rtype}?_count=0")).await["total"]
            .as_i64()
            .unwrap()
    }

    /// Number of versions in the system history (every write leaves one).
    pub async fn history_len(&self) -> usize {
        let mut n = 0;
        let mut url = self.url("_history?_count=1000");
        loop {
            let b = self.get_json(&url).await;
            n += b["entry"].as_array().map(|a| a.len()).unwrap_or(0);
            match next_link(&b) {
                Some(next) => url = next,
                None => return n,
            }
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

pub fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// The OperationOutcome's first issue, checked to be one.
pub fn first_issue(outcome: &Value) -> &Value {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    &outcome["issue"][0]
}

/// Where two JSON values first differ, for assertion messages.
pub fn first_difference(a: &Value, b: &Value, path: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return format!("{path}.{k} lost"),
                    Some(w) if v != w => return first_difference(v, w, &format!("{path}.{k}")),
                    _ => {}
                }
            }
            for k in y.keys() {
                if !x.contains_key(k) {
                    return format!("{path}.{k} added");
                }
            }
            path.to_string()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                if v != w {
                    return first_difference(v, w, &format!("{path}[{i}]"));
                }
            }
            path.to_string()
        }
        _ => format!("{path}: {a} became {b}"),
    }
}
