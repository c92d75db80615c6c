//! SMART-on-FHIR client helpers shared by the authorization tests: keys
//! made with `openssl`, backend-services and app clients registered with the
//! CLI, a cookie-holding browser without JavaScript that signs in and
//! consents, and FHIR calls with a bearer token.

use std::process::{Command, Stdio};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::TestServer;

pub const REDIRECT: &str = "https://app.example.org/callback";

/// Runs the CLI and parses its JSON output.
pub fn cli(s: &TestServer, args: &[&str], stdin: Option<&str>) -> Value {
    let mut child = s
        .ehrx()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ehrx {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn pkce() -> (String, String) {
    let verifier = b64(&rand::random::<[u8; 32]>());
    let challenge = b64(&Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// A private key made by `openssl`, with its public JWK (kid set).
pub struct ClientKey {
    pub key: EncodingKey,
    pub alg: Algorithm,
    pub kid: String,
    pub jwk: Value,
}

pub fn client_key(alg: Algorithm) -> ClientKey {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    let args: &[&str] = match alg {
        Algorithm::RS384 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    };
    let st = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(st.success());
    let pem = std::fs::read(&path).unwrap();
    let key = match alg {
        Algorithm::RS384 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).unwrap();
    let kid = format!("k-{}", uuid::Uuid::new_v4().simple());
    jwk.common.key_id = Some(kid.clone());
    ClientKey {
        key,
        alg,
        kid,
        jwk: serde_json::to_value(&jwk).unwrap(),
    }
}

/// Registers a backend-services client with the CLI.
pub fn backend_client(s: &TestServer, k: &ClientKey, scope: &str) -> String {
    backend_client_with(s, k, scope, &[])
}

/// [`backend_client`] with more `ehrx client add` arguments (e.g.
/// `--organization Organization/ID` for an insurer).
pub fn backend_client_with(s: &TestServer, k: &ClientKey, scope: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [k.jwk]}).to_string()).unwrap();
    let mut args = vec![
        "client",
        "add",
        "--name",
        "Insurer",
        "--type",
        "confidential-asymmetric",
        "--jwks-file",
        jwks.to_str().unwrap(),
        "--scope",
        scope,
    ];
    args.extend_from_slice(extra);
    let out = cli(s, &args, None);
    assert!(out.get("client_secret").is_none());
    out["client_id"].as_str().unwrap().to_string()
}

pub fn assertion(
    s: &TestServer,
    client_id: &str,
    k: &ClientKey,
    exp_in: i64,
    aud: Option<&str>,
) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut h = Header::new(k.alg);
    h.kid = Some(k.kid.clone());
    let claims = json!({
        "iss": client_id, "sub": client_id,
        "aud": aud.map(str::to_string).unwrap_or_else(|| s.url("auth/token")),
        "exp": now + exp_in, "jti": uuid::Uuid::new_v4().to_string()
    });
    jsonwebtoken::encode(&h, &claims, &k.key).unwrap()
}

pub async fn form(s: &TestServer, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let r = s.client.post(s.url(path)).form(pairs).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(json!(text)))
}

pub async fn backend_token(
    s: &TestServer,
    client_id: &str,
    k: &ClientKey,
    scope: &str,
) -> (u16, Value) {
    assertion_grant(s, &assertion(s, client_id, k, 240, None), scope).await
}

/// `client_credentials` with a client assertion as given.
pub async fn assertion_grant(s: &TestServer, assertion: &str, scope: &str) -> (u16, Value) {
    form(
        s,
        "auth/token",
        &[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
    .await
}

/// The whole app flow for a public client: authorize, sign in (if
/// `login`), consent, and exchange the code; returns the token response.
pub async fn app_token(
    s: &TestServer,
    client: &str,
    scope: &str,
    login: Option<(&str, &str)>,
    extra: &[(&str, &str)],
) -> Value {
    let (verifier, challenge) = pkce();
    let params = authorize_params(s, client, scope, &challenge, extra);
    let back = consent(s, &browser(), &params, login, None).await;
    let (st, t) = exchange_code(s, client, q(&back, "code").unwrap(), &verifier).await;
    assert_eq!(st, 200, "{t}");
    t
}

/// A FHIR call with a bearer token.
pub async fn fhir(
    s: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut rb = s.client.request(method, s.url(path)).bearer_auth(token);
    if let Some(b) = body {
        rb = rb
            .header("Content-Type", "application/fhir+json")
            .body(b.to_string());
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn get(s: &TestServer, token: &str, path: &str) -> (u16, Value) {
    fhir(s, token, reqwest::Method::GET, path, None).await
}

pub fn ids(bundle: &Value, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["resource"]["resourceType"] == rtype)
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A browser: keeps cookies, does not follow redirects, runs no scripts.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub fn authorize_params(
    s: &TestServer,
    client_id: &str,
    scope: &str,
    challenge: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        ("response_type".into(), "code".into()),
        ("client_id".into(), client_id.into()),
        ("redirect_uri".into(), REDIRECT.into()),
        ("scope".into(), scope.into()),
        ("state".into(), "st-123".into()),
        ("aud".into(), s.base.clone()),
        ("code_challenge".into(), challenge.into()),
        ("code_challenge_method".into(), "S256".into()),
    ];
    for (k, v) in extra {
        p.retain(|(n, _)| n != k);
        if !v.is_empty() {
            p.push((k.to_string(), v.to_string()));
        }
    }
    p
}

pub fn hidden_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html_unescape(&html[start..start + end]))
}

pub fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#x27;", "'")
        .replace("&amp;", "&")
}

/// Every `name="grant" value="…"` on the consent page.
pub fn offered(html: &str) -> Vec<String> {
    html.match_indices("name=\"grant\" value=\"")
        .map(|(i, m)| {
            let rest = &html[i + m.len()..];
            html_unescape(&rest[..rest.find('"').unwrap()])
        })
        .collect()
}

pub fn query_of(location: &str) -> Vec<(String, String)> {
    let q = location.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

pub fn q<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// Signs in (if needed) and allows the consent page; returns the redirect
/// back to the app.
pub async fn consent(
    s: &TestServer,
    b: &reqwest::Client,
    params: &[(String, String)],
    login: Option<(&str, &str)>,
    patient: Option<&str>,
) -> Vec<(String, String)> {
    let r = b
        .get(s.url("auth/authorize"))
        .query(params)
        .send()
        .await
        .unwrap();
    let mut html = r.text().await.unwrap();
    if let Some((user, pw)) = login {
        assert!(
            html.contains("<label for=\"password\">"),
            "login page: {html}"
        );
        let mut f: Vec<(String, String)> = params.to_vec();
        f.push(("username".into(), user.into()));
        f.push(("password".into(), pw.into()));
        let r = b.post(s.url("auth/login")).form(&f).send().await.unwrap();
        assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
        let to = r.headers()["location"].to_str().unwrap().to_string();
        html = b
            .get(s.url(&to))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    }
    assert!(html.contains("<h1>Allow access</h1>"), "{html}");
    let mut f: Vec<(String, String)> = params.to_vec();
    f.push((
        "csrf".into(),
        hidden_value(&html, "csrf").expect("csrf field"),
    ));
    for g in offered(&html) {
        f.push(("grant".into(), g));
    }
    if let Some(p) = patient {
        assert!(html.contains("Choose the patient"), "{html}");
        f.push(("patient".into(), p.into()));
    }
    f.push(("decision".into(), "allow".into()));
    let r = b.post(s.url("auth/consent")).form(&f).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with(REDIRECT), "{loc}");
    query_of(&loc)
}

pub async fn exchange_code(
    s: &TestServer,
    client_id: &str,
    code: &str,
    verifier: &str,
) -> (u16, Value) {
    form(
        s,
        "auth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", client_id),
        ],
    )
    .await
}

pub fn public_client(s: &TestServer, scope: &str) -> String {
    cli(
        s,
        &[
            "client",
            "add",
            "--name",
            "Patient App",
            "--type",
            "public",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            scope,
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn practitioner_user(s: &TestServer, username: &str, practitioner: &str) {
    let out = cli(
        s,
        &[
            "user",
            "add",
            "--username",
            username,
            "--password-stdin",
            "--fhir-user",
            &format!("Practitioner/{practitioner}"),
        ],
        Some("correct horse battery\n"),
    );
    assert_eq!(out["fhirUser"], format!("Practitioner/{practitioner}"));
}

pub fn claims_of(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// Every entry `(mode, Type/id)` on every page of a search, with a token.
pub async fn all_pages(s: &TestServer, token: &str, path: &str) -> (u16, Vec<(String, String)>) {
    let mut url = s.url(path);
    let mut out = Vec::new();
    loop {
        let r = s.client.get(&url).bearer_auth(token).send().await.unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            return (status, out);
        }
        let page: Value = r.json().await.unwrap();
        for e in page["entry"].as_array().into_iter().flatten() {
            let res = &e["resource"];
            out.push((
                e["search"]["mode"].as_str().unwrap_or("").to_string(),
                format!(
                    "{}/{}",
                    res["resourceType"].as_str().unwrap(),
                    res["id"].as_str().unwrap()
                ),
            ));
        }
        match super::next_link(&page) {
            Some(next) => url = next,
            None => return (200, out),
        }
    }
}

/// An access token of the patient themself (an account whose `fhirUser`
/// is `Patient/{patient}`), launched with `patient` as context (login and
/// consent driven like a browser).
pub async fn patient_token(s: &TestServer, patient: &str, scope: &str) -> String {
    let launch = cli(s, &["launch", "--patient", patient], None)["launch"]
        .as_str()
        .unwrap()
        .to_string();
    let user = format!("pt.{}", uuid::Uuid::new_v4().simple());
    let out = cli(
        s,
        &[
            "user",
            "add",
            "--username",
            &user,
            "--password-stdin",
            "--fhir-user",
            &format!("Patient/{patient}"),
        ],
        Some("correct horse battery\n"),
    );
    assert_eq!(out["fhirUser"], format!("Patient/{patient}"));
    let client = public_client(s, &format!("launch {scope}"));
    let t = app_token(
        s,
        &client,
        &format!("launch {scope}"),
        Some((&user, "correct horse battery")),
        &[("launch", &launch)],
    )
    .await;
    assert_eq!(t["patient"], patient);
    t["access_token"].as_str().unwrap().to_string()
}

/// A token with `system/*.cruds` from a backend-services client registered
/// for it: the administrator that writes test data.
pub async fn admin_token(s: &TestServer) -> String {
    let k = client_key(Algorithm::RS384);
    let id = backend_client(s, &k, "system/*.cruds");
    let (st, t) = backend_token(s, &id, &k, "system/*.cruds").await;
    assert_eq!(st, 200, "{t}");
    t["access_token"].as_str().unwrap().to_string()
}

/// Stores every R4 example (`PUT Type/id`, eight at a time) with `token`.
/// AuditEvents are recorded by the server only (a PUT of one is refused),
/// so their examples are left out.
pub async fn load_r4_examples(s: &TestServer, token: &str) {
    use futures_util::stream::{self, StreamExt};
    let dir = super::data_dir().join("fhir-examples/r4-json");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("AuditEvent"))
        })
        .collect();
    let failures: Vec<String> = stream::iter(files)
        .map(|f| async move {
            let body: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
            let path = format!(
                "{}/{}",
                body["resourceType"].as_str().unwrap(),
                body["id"].as_str().unwrap()
            );
            let (st, _) = fhir(s, token, reqwest::Method::PUT, &path, Some(&body)).await;
            (!(200..300).contains(&st)).then(|| format!("{path}: {st}"))
        })
        .buffer_unordered(8)
        .filter_map(|x| async { x })
        .collect()
        .await;
    assert!(failures.is_empty(), "{failures:?}");
}
