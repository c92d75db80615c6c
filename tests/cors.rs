//! Cross-origin requests from browser apps, over HTTP with authorization
//! on: which origins get `Access-Control-Allow-Origin` on which endpoints,
//! preflights, and the consent page's `form-action`, which must let the
//! browser follow the redirect back to the app.

mod common;

use common::smart::*;
use common::TestServer;
use serde_json::Value;

/// The origin of [`REDIRECT`], the redirect URI of the test apps.
const APP_ORIGIN: &str = "https://app.example.org";

fn acao(r: &reqwest::Response) -> Option<&str> {
    r.headers()
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
}

fn header_list(r: &reqwest::Response, name: &str) -> Vec<String> {
    r.headers()
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .collect()
}

async fn preflight(s: &TestServer, path: &str, origin: &str, method: &str) -> reqwest::Response {
    s.client
        .request(reqwest::Method::OPTIONS, s.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method)
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,if-match,prefer",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_registered_apps_origin_may_call_discovery_token_and_fhir_endpoints() {
    let s = TestServer::start_secured().await;
    let admin = admin_token(&s).await;
    public_client(&s, "launch/patient patient/*.rs");

    for path in [
        ".well-known/smart-configuration",
        "metadata",
        ".well-known/openid-configuration",
    ] {
        let r = s
            .client
            .get(s.url(path))
            .header("Origin", APP_ORIGIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(acao(&r), Some(APP_ORIGIN), "{path}");
    }

    // Preflights of the FHIR API and the token endpoint.
    for (path, method) in [
        ("Patient", "GET"),
        ("Patient/p1", "PUT"),
        ("Observation?patient=p1", "GET"),
        ("auth/token", "POST"),
        ("auth/introspect", "POST"),
        ("auth/revoke", "POST"),
    ] {
        let r = preflight(&s, path, APP_ORIGIN, method).await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        assert_eq!(acao(&r), Some(APP_ORIGIN), "{path}");
        let methods = header_list(&r, "access-control-allow-methods");
        for m in ["get", "post", "put", "patch", "delete"] {
            assert!(methods.contains(&m.to_string()), "{path}: {methods:?}");
        }
        let headers = header_list(&r, "access-control-allow-headers");
        for h in [
            "authorization",
            "content-type",
            "accept",
            "prefer",
            "if-match",
            "if-none-match",
            "if-none-exist",
            "if-modified-since",
        ] {
            assert!(headers.contains(&h.to_string()), "{path}: {headers:?}");
        }
    }

    // The actual requests: a create shows its Location and ETag to the
    // script; error answers (401 from the API and the token endpoint) are
    // readable too.
    let r = s
        .client
        .post(s.url("Patient"))
        .bearer_auth(&admin)
        .header("Origin", APP_ORIGIN)
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","name":[{"family":"Cors"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(acao(&r), Some(APP_ORIGIN));
    let exposed = header_list(&r, "access-control-expose-headers");
    for h in ["location", "etag", "content-location", "last-modified"] {
        assert!(exposed.contains(&h.to_string()), "{exposed:?}");
    }
    let r = s
        .client
        .get(s.url("Patient"))
        .header("Origin", APP_ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(acao(&r), Some(APP_ORIGIN));
    let r = s
        .client
        .post(s.url("auth/token"))
        .header("Origin", APP_ORIGIN)
        .form(&[("grant_type", "authorization_code"), ("code", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(acao(&r), Some(APP_ORIGIN));
    assert!(r.headers().get_all("vary").iter().any(|v| v
        .to_str()
        .unwrap_or("")
        .to_ascii_lowercase()
        .contains("origin")));

    // A client registered while the server runs is allowed at once.
    let later = "http://127.0.0.1:9/callback";
    cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "Later App",
            "--type",
            "public",
            "--redirect-uri",
            later,
            "--scope",
            "patient/*.rs",
        ],
        None,
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = preflight(&s, "Patient", "http://127.0.0.1:9", "GET").await;
    assert_eq!(acao(&r), Some("http://127.0.0.1:9"));
    s.stop().await;
}

#[tokio::test]
async fn an_unknown_origin_gets_no_cors_headers_and_pages_get_none_at_all() {
    let s = TestServer::start_secured().await;
    public_client(&s, "launch/patient patient/*.rs");
    for other in [
        "https://evil.example.org",
        "http://app.example.org",
        "https://app.example.org:8443",
        "null",
    ] {
        let r = s
            .client
            .get(s.url(".well-known/smart-configuration"))
            .header("Origin", other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(acao(&r), None, "{other}");
        let r = preflight(&s, "Patient", other, "GET").await;
        assert_eq!(acao(&r), None, "{other}");
    }
    // The pages people use, EHR launch contexts and the signed-XML
    // exchange are no business of another origin's scripts: no CORS
    // headers, and no preflight answer (405) even for a registered origin.
    for path in [
        "auth/authorize",
        "auth/login",
        "auth/consent",
        "auth/launch",
        "exchange/documents",
    ] {
        let r = preflight(&s, path, APP_ORIGIN, "POST").await;
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(acao(&r), None, "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn configured_origins_replace_the_registered_ones() {
    let s = TestServer::start_with(|c| {
        c.cors_origins = vec!["http://localhost:3000".into()];
    })
    .await;
    public_client(&s, "patient/*.rs");
    let r = preflight(&s, "Patient", "http://localhost:3000", "GET").await;
    assert_eq!(acao(&r), Some("http://localhost:3000"));
    let r = preflight(&s, "Patient", APP_ORIGIN, "GET").await;
    assert_eq!(acao(&r), None);
    s.stop().await;

    let s = TestServer::start_with(|c| c.cors_origins = vec!["*".into()]).await;
    let r = preflight(&s, "Patient", "https://anywhere.example", "GET").await;
    assert_eq!(acao(&r), Some("*"));
    s.stop().await;
}

#[tokio::test]
async fn the_consent_page_lets_its_form_redirect_to_the_apps_origin() {
    let s = TestServer::start_secured().await;
    practitioner_user(&s, "dr.cors", "pr-1");
    let client = public_client(&s, "launch/patient openid fhirUser patient/*.rs");
    let (_, challenge) = pkce();
    let params = authorize_params(
        &s,
        &client,
        "launch/patient openid fhirUser patient/*.rs",
        &challenge,
        &[],
    );
    let b = browser();
    let r = b
        .get(s.url("auth/authorize"))
        .query(&params)
        .send()
        .await
        .unwrap();
    // The sign-in page: forms go to this server only.
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("form-action 'self';"), "{csp}");
    let mut f = params.clone();
    f.push(("username".into(), "dr.cors".into()));
    f.push(("password".into(), "correct horse battery".into()));
    let r = b.post(s.url("auth/login")).form(&f).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let to = r.headers()["location"].to_str().unwrap().to_string();
    let r = b.get(s.url(&to)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let html = r.text().await.unwrap();
    assert!(html.contains("<h1>Allow access</h1>"), "{html}");
    let form_action = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("form-action"))
        .unwrap_or("");
    assert_eq!(form_action, format!("form-action 'self' {APP_ORIGIN}"));
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    s.stop().await;
}

#[tokio::test]
async fn the_capability_statement_says_cors_is_supported() {
    let s = TestServer::start_secured().await;
    let cs: Value = s.get("metadata").await.json().await.unwrap();
    assert_eq!(cs["rest"][0]["security"]["cors"], true, "{cs}");
    s.stop().await;
}

#[test]
fn cors_origins_are_configured_as_a_list_or_comma_separated() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ehrx.toml");
    std::fs::write(
        &file,
        "cors_origins = [\"http://localhost:3000\", \"https://app.example.org\"]\n",
    )
    .unwrap();
    let c = ehrx::config::Config::load(Some(&file)).unwrap();
    assert_eq!(
        c.cors_origins,
        ["http://localhost:3000", "https://app.example.org"]
    );
    let migrate = |origins: &str| {
        common::ehrx_bin()
            .arg("migrate")
            .current_dir(dir.path())
            .env("EHRX_DATABASE_URL", "sqlite:cors.db")
            .env("EHRX_CORS_ORIGINS", origins)
            .output()
            .unwrap()
    };
    let out = migrate("http://localhost:3000, https://app.example.org:8443");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A redirect URI is not an origin.
    let out = migrate("https://app.example.org/callback");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cors_origins"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
