//! SMART browser apps launched in a real Chromium: an app made with SMART's
//! own JavaScript client (`fhirclient`, from npm) is served from another
//! loopback origin than ehrx, and Chromium (driven by `playwright-core`,
//! `tests/browser/drive.mjs`) goes through the standalone launch, ehrx's
//! sign-in and consent pages, and back to the app, which reads the patient
//! and their Observations. This is what proves that CORS and the consent
//! page's Content-Security-Policy let a browser app work, as no HTTP-level
//! test can: the browser enforces them.
//!
//! Needs Debian's `/usr/bin/chromium` and `npm ci` in `tests/browser`
//! (`.ci/run` does both); without them the tests fail and say so.

mod common;

use std::path::{Path, PathBuf};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use common::smart::*;
use common::TestServer;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const SCOPE: &str = "openid fhirUser launch/patient patient/*.rs";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails, saying what to install, when Chromium or the npm packages are
/// missing.
fn check_prerequisites() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`; .ci/run does)"
    );
    for p in [
        "node_modules/playwright-core/package.json",
        "node_modules/fhirclient/build/fhir-client.js",
    ] {
        assert!(
            browser_dir().join(p).exists(),
            "tests/browser/{p} is missing: run `npm ci` in tests/browser (.ci/run does)"
        );
    }
}

/// The test app's files, served from their own origin (another port).
struct App {
    origin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl App {
    async fn start() -> App {
        let file = |path: PathBuf, kind: &'static str| {
            get(move || async move {
                match tokio::fs::read(&path).await {
                    Ok(body) => ([(header::CONTENT_TYPE, kind)], body).into_response(),
                    Err(e) => (
                        axum::http::StatusCode::NOT_FOUND,
                        format!("{}: {e}", path.display()),
                    )
                        .into_response(),
                }
            })
        };
        let dir = browser_dir();
        let html = "text/html; charset=utf-8";
        let router = axum::Router::new()
            .route("/launch.html", file(dir.join("app/launch.html"), html))
            .route("/index.html", file(dir.join("app/index.html"), html))
            .route(
                "/fhir-client.js",
                file(
                    dir.join("node_modules/fhirclient/build/fhir-client.js"),
                    "text/javascript",
                ),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        App {
            origin,
            stop: Some(tx),
        }
    }

    fn redirect_uri(&self) -> String {
        format!("{}/index.html", self.origin)
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A patient with three Observations, written with an administrator's
/// token; returns the patient's id.
async fn patient_with_observations(
    s: &TestServer,
    admin: &str,
    given: &str,
    family: &str,
    observations: &[(&str, f64, &str)],
) -> String {
    // Their general practitioner is `Practitioner/pr-1`, the practitioner
    // who picks among their patients below.
    let (st, p) = fhir(
        s,
        admin,
        reqwest::Method::POST,
        "Patient",
        Some(
            &json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
            "generalPractitioner": [{"reference": "Practitioner/pr-1"}]}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    for (what, value, unit) in observations {
        let (st, o) = fhir(
            s,
            admin,
            reqwest::Method::POST,
            "Observation",
            Some(&json!({"resourceType": "Observation", "status": "final",
                "code": {"text": what},
                "subject": {"reference": format!("Patient/{pid}")},
                "valueQuantity": {"value": value, "unit": unit}})),
        )
        .await;
        assert_eq!(st, 201, "{o}");
    }
    pid
}

/// Registers the test app (a public client) for `app`'s redirect URI.
fn register_app(s: &TestServer, app: &App) -> String {
    cli(
        s,
        &[
            "client",
            "add",
            "--name",
            "Browser Test App",
            "--type",
            "public",
            "--redirect-uri",
            &app.redirect_uri(),
            "--scope",
            SCOPE,
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Runs `drive.mjs` (Chromium through launch, sign-in and consent);
/// returns its report once the app page is ready, and fails with the
/// browser's report otherwise.
async fn drive(options: Value) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("drive.mjs")
            .arg(options.to_string())
            .current_dir(browser_dir())
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js 18 or later is needed)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "drive.mjs printed no report (exit {}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        report["ok"] == true,
        "the browser did not get back to the app: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );
    report
}

fn launch_url(s: &TestServer, app: &App, client: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("iss", s.base.as_str()),
            ("client_id", client),
            ("scope", SCOPE),
        ])
        .finish();
    format!("{}/launch.html?{q}", app.origin)
}

/// The app's page text, checked to be the ready app page on its origin.
fn app_page(report: &Value, app: &App) -> String {
    let url = report["url"].as_str().unwrap_or("");
    let text = report["text"].as_str().unwrap_or("").to_string();
    assert!(
        url.starts_with(&app.redirect_uri()),
        "ended on {url}, not the app: {report:#}"
    );
    assert!(text.contains("Ready"), "the app failed: {report:#}");
    text
}

#[tokio::test]
async fn a_patient_launches_a_browser_app_that_reads_their_record() {
    check_prerequisites();
    let s = TestServer::start_secured().await;
    let admin = admin_token(&s).await;
    let ada = patient_with_observations(
        &s,
        &admin,
        "Ada",
        "Lovelace",
        &[
            ("Body weight", 61.5, "kg"),
            ("Heart rate", 72.0, "/min"),
            ("Hemoglobin", 13.9, "g/dL"),
        ],
    )
    .await;
    patient_with_observations(
        &s,
        &admin,
        "Charles",
        "Babbage",
        &[("Body weight", 80.2, "kg")],
    )
    .await;
    let out = s
        .ehrx()
        .args([
            "user",
            "add",
            "--username",
            "ada@example.org",
            "--password-stdin",
            "--fhir-user",
            &format!("Patient/{ada}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"analytical engine\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = App::start().await;
    let client = register_app(&s, &app);

    let report = drive(json!({
        "chromium": CHROMIUM,
        "launch": launch_url(&s, &app, &client),
        "username": "ada@example.org",
        "password": "analytical engine",
    }))
    .await;
    let text = app_page(&report, &app);
    assert!(text.contains("Patient: Ada Lovelace"), "{text}");
    for shown in [
        "Body weight: 61.5 kg",
        "Heart rate: 72 /min",
        "Hemoglobin: 13.9 g/dL",
    ] {
        assert!(text.contains(shown), "{shown} missing from:\n{text}");
    }
    assert!(!text.contains("80.2"), "another patient's data:\n{text}");
    app.stop();
    s.stop().await;
}

#[tokio::test]
async fn a_practitioner_picks_the_patient_for_a_browser_app() {
    check_prerequisites();
    let s = TestServer::start_secured().await;
    let admin = admin_token(&s).await;
    patient_with_observations(
        &s,
        &admin,
        "Ada",
        "Lovelace",
        &[("Body weight", 61.5, "kg")],
    )
    .await;
    let grace = patient_with_observations(
        &s,
        &admin,
        "Grace",
        "Hopper",
        &[("Heart rate", 64.0, "/min"), ("Glucose", 5.4, "mmol/L")],
    )
    .await;
    practitioner_user(&s, "dr.browser", "pr-1");
    let app = App::start().await;
    let client = register_app(&s, &app);

    let report = drive(json!({
        "chromium": CHROMIUM,
        "launch": launch_url(&s, &app, &client),
        "username": "dr.browser",
        "password": "correct horse battery",
        "patient": grace,
    }))
    .await;
    let text = app_page(&report, &app);
    assert!(text.contains("Patient: Grace Hopper"), "{text}");
    assert!(text.contains("Heart rate: 64 /min"), "{text}");
    assert!(text.contains("Glucose: 5.4 mmol/L"), "{text}");
    assert!(!text.contains("61.5"), "another patient's data:\n{text}");
    app.stop();
    s.stop().await;
}
