//! Taking access away while the server remembers the tokens it checked:
//! a revoked token, a token past its expiry, and the tokens of a disabled
//! client or user are refused — at once by the process that revoked, and
//! by another `ehrx serve` process on the same database within the
//! documented `revocation_max_delay_ms`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::smart::*;
use common::TestServer;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

/// The revocation delay the servers of these tests run with.
const DELAY_MS: u64 = 300;

fn with_delay(c: &mut ehrx::config::Config) {
    c.revocation_max_delay_ms = DELAY_MS;
}

/// Waits out the documented delay: after it, no process may honour what
/// was revoked before it began.
async fn wait_out_the_delay() {
    tokio::time::sleep(Duration::from_millis(DELAY_MS)).await;
}

/// A backend client with `system/Patient.rs`, its key and a token.
async fn backend(s: &TestServer) -> (String, ClientKey, String) {
    let k = client_key(Algorithm::RS384);
    let id = backend_client(s, &k, "system/Patient.rs");
    let (st, t) = backend_token(s, &id, &k, "system/Patient.rs").await;
    assert_eq!(st, 200, "{t}");
    let token = t["access_token"].as_str().unwrap().to_string();
    (id, k, token)
}

/// The status of `GET {base}/Patient` with `token`, and the
/// `WWW-Authenticate` header if any.
async fn patients(base: &str, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{base}/Patient"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), challenge)
}

async fn revoke(s: &TestServer, client_id: &str, k: &ClientKey, token: &str) {
    let a = assertion(s, client_id, k, 200, None);
    let (st, body) = form(
        s,
        "auth/revoke",
        &[
            ("token", token),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
}

/// A second `ehrx serve` process on `s`'s database with the same base URL
/// (the tokens' issuer and audience), on its own port.
async fn second_server(s: &TestServer) -> TestServer {
    TestServer::spawn(
        &s.database_url,
        &[
            ("EHRX_BASE_URL", &s.base),
            ("EHRX_REVOCATION_MAX_DELAY_MS", &DELAY_MS.to_string()),
        ],
    )
    .await
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_by_the_server_that_revoked_it() {
    let s = TestServer::start_with(with_delay).await;
    let (id, k, token) = backend(&s).await;
    // Checked twice, so the second answer came from the remembered token.
    assert_eq!(patients(&s.base, &token).await.0, 200);
    assert_eq!(patients(&s.base, &token).await.0, 200);
    revoke(&s, &id, &k, &token).await;
    let (st, challenge) = patients(&s.base, &token).await;
    assert_eq!(st, 401);
    assert!(challenge.contains("revoked"), "{challenge}");
}

#[tokio::test]
async fn a_revoked_token_is_refused_by_another_server_process_within_the_delay() {
    let s = TestServer::start_with(with_delay).await;
    let (id, k, token) = backend(&s).await;
    let other = second_server(&s).await;
    // The second process honours the token the first one issued.
    assert_eq!(patients(&other.base, &token).await.0, 200);
    assert_eq!(patients(&other.base, &token).await.0, 200);
    revoke(&s, &id, &k, &token).await;
    wait_out_the_delay().await;
    let (st, challenge) = patients(&other.base, &token).await;
    assert_eq!(st, 401);
    assert!(challenge.contains("revoked"), "{challenge}");
    // The other way round: a token issued by the second process, remembered
    // by the first, revoked at the second.
    let token_url = s.url("auth/token");
    let a = assertion(&other, &id, &k, 240, Some(&token_url));
    let (st, t) = assertion_grant(&other, &a, "system/Patient.rs").await;
    assert_eq!(st, 200, "{t}");
    let second = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(patients(&s.base, &second).await.0, 200);
    assert_eq!(patients(&s.base, &second).await.0, 200);
    let a = assertion(&other, &id, &k, 200, Some(&token_url));
    let (st, body) = form(
        &other,
        "auth/revoke",
        &[
            ("token", second.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(patients(&other.base, &second).await.0, 401);
    wait_out_the_delay().await;
    assert_eq!(patients(&s.base, &second).await.0, 401);
}

#[tokio::test]
async fn a_remembered_token_past_its_expiry_is_refused() {
    let s = TestServer::start_with(|c| {
        with_delay(c);
        c.access_token_lifetime = 1;
    })
    .await;
    let (_, _, token) = backend(&s).await;
    assert_eq!(patients(&s.base, &token).await.0, 200);
    assert_eq!(patients(&s.base, &token).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (st, challenge) = patients(&s.base, &token).await;
    assert_eq!(st, 401);
    assert!(challenge.contains("expired"), "{challenge}");
}

#[tokio::test]
async fn a_disabled_client_loses_its_tokens_and_gets_no_new_one() {
    let s = TestServer::start_with(with_delay).await;
    let (id, k, token) = backend(&s).await;
    let other = second_server(&s).await;
    assert_eq!(patients(&s.base, &token).await.0, 200);
    assert_eq!(patients(&other.base, &token).await.0, 200);
    let listed = cli(&s, &["client", "list"], None);
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == id.as_str())
        .expect("the client is listed");
    assert_eq!(me["disabled"], Value::Null);
    assert!(me.get("secret_hash").is_none() && me.get("client_secret").is_none());
    // Disabled by the CLI, another process: both servers learn of it.
    cli(&s, &["client", "disable", &id], None);
    wait_out_the_delay().await;
    assert_eq!(patients(&s.base, &token).await.0, 401);
    assert_eq!(patients(&other.base, &token).await.0, 401);
    let (st, e) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    assert_eq!(
        (st, e["error"].as_str()),
        (401, Some("invalid_client")),
        "{e}"
    );
    let listed = cli(&s, &["client", "list"], None);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["client_id"] == id.as_str() && c["disabled"].is_i64()));
    // Enabled again, it gets new tokens; the old one stays revoked.
    cli(&s, &["client", "enable", &id], None);
    let (st, t) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        patients(&s.base, t["access_token"].as_str().unwrap())
            .await
            .0,
        200
    );
    assert_eq!(patients(&s.base, &token).await.0, 401);
}

#[tokio::test]
async fn disabling_an_unknown_client_or_user_fails_with_a_message() {
    let s = TestServer::start_with(with_delay).await;
    for args in [
        ["client", "disable", "no-such-client"],
        ["user", "disable", "nobody"],
    ] {
        let out = s.ehrx().args(args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("there is no"), "{err}");
    }
}

/// The password [`practitioner_user`] gives.
const PASSWORD: &str = "correct horse battery";

/// A practitioner user (password [`PASSWORD`]) signed in through a public
/// app: their token response.
async fn practitioner_token(s: &TestServer, username: &str) -> Value {
    let admin = admin_token(s).await;
    let (st, p) = fhir(
        s,
        &admin,
        reqwest::Method::POST,
        "Practitioner",
        Some(&json!({"resourceType": "Practitioner", "name": [{"family": "Revoke"}]})),
    )
    .await;
    assert_eq!(st, 201, "{p}");
    practitioner_user(s, username, p["id"].as_str().unwrap());
    user_token(s, username, PASSWORD).await
}

/// Signs `username` in through a new public app; the token response.
async fn user_token(s: &TestServer, username: &str, password: &str) -> Value {
    let client = public_client(s, "openid fhirUser user/*.rs");
    app_token(
        s,
        &client,
        "openid fhirUser user/Patient.rs",
        Some((username, password)),
        &[],
    )
    .await
}

/// The status of signing in on the authorize pages (401 when refused).
async fn sign_in(s: &TestServer, username: &str, password: &str) -> u16 {
    let client = public_client(s, "openid fhirUser user/*.rs");
    let (_, challenge) = pkce();
    let mut f = authorize_params(
        s,
        &client,
        "openid fhirUser user/Patient.rs",
        &challenge,
        &[],
    );
    f.push(("username".into(), username.into()));
    f.push(("password".into(), password.into()));
    browser()
        .post(s.url("auth/login"))
        .form(&f)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_disabled_user_loses_their_tokens_and_cannot_sign_in() {
    let s = TestServer::start_with(with_delay).await;
    let t = practitioner_token(&s, "dr.revoke").await;
    let token = t["access_token"].as_str().unwrap();
    let other = second_server(&s).await;
    assert_eq!(patients(&s.base, token).await.0, 200);
    assert_eq!(patients(&other.base, token).await.0, 200);
    let listed = cli(&s, &["user", "list"], None);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "dr.revoke"
            && u["disabled"].is_null()
            && u.get("password_hash").is_none()));
    cli(&s, &["user", "disable", "dr.revoke"], None);
    wait_out_the_delay().await;
    assert_eq!(patients(&s.base, token).await.0, 401);
    assert_eq!(patients(&other.base, token).await.0, 401);
    assert_eq!(
        sign_in(&s, "dr.revoke", PASSWORD).await,
        401,
        "a disabled user signs in like a wrong password"
    );
    cli(&s, &["user", "enable", "dr.revoke"], None);
    let again = user_token(&s, "dr.revoke", PASSWORD).await;
    let again = again["access_token"].as_str().unwrap();
    assert_eq!(patients(&s.base, again).await.0, 200);
}

#[tokio::test]
async fn a_new_password_ends_the_old_tokens_and_the_old_password() {
    let s = TestServer::start_with(with_delay).await;
    let new = "the second password";
    let t = practitioner_token(&s, "dr.newpass").await;
    let token = t["access_token"].as_str().unwrap();
    assert_eq!(patients(&s.base, token).await.0, 200);
    cli(
        &s,
        &["user", "set-password", "dr.newpass", "--password-stdin"],
        Some(new),
    );
    wait_out_the_delay().await;
    assert_eq!(patients(&s.base, token).await.0, 401);
    assert_eq!(
        sign_in(&s, "dr.newpass", PASSWORD).await,
        401,
        "the old password no longer signs in"
    );
    let again = user_token(&s, "dr.newpass", new).await;
    let again = again["access_token"].as_str().unwrap();
    assert_eq!(patients(&s.base, again).await.0, 200);
    // A password the policy refuses changes nothing.
    let out = s
        .ehrx()
        .args(["user", "set-password", "dr.newpass", "--password-stdin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"short\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10 characters"));
}
