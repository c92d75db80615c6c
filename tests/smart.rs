//! The SMART-on-FHIR authorization server and its enforcement on the FHIR
//! API, driven over HTTP as apps, browsers and backend systems would: real
//! keys (made with `openssl`), real signatures, a real cookie-holding
//! browser without JavaScript, clients and users registered with the CLI.

mod common;

use std::process::{Command, Stdio};

use common::smart::*;
use common::{first_issue, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";

/// Types outside the Patient compartment whose resources are one patient's
/// data (found through their `patient` search parameter).
const PATIENT_DATA_OUTSIDE_THE_COMPARTMENT: [&str; 4] =
    ["Device", "Task", "Contract", "GuidanceResponse"];

/// Types a `patient/` token reaches through no interaction at all.
const UNREACHABLE_WITH_PATIENT_SCOPES: [&str; 3] = ["Bundle", "MessageHeader", "Binary"];

/// Test data, written by a backend client with `system/*.cruds`:
/// two patients, each with a lab and a vital-signs Observation and an
/// Encounter.
/// The practitioners of these tests: the general practitioners of both
/// patients of [`world`], so that the circle of trust lets them in.
const GENERAL_PRACTITIONERS: [&str; 7] = ["pr1", "pr-1", "pr-2", "pr-9", "pr-race", "p", "pr-oidc"];

struct World {
    admin: String,
    p1: String,
    p2: String,
    lab1: String,
    vital1: String,
    lab2: String,
    enc1: String,
}

async fn world(s: &TestServer) -> World {
    let admin = admin_token(s).await;
    let mut made = Vec::new();
    for family in ["Alpha", "Beta"] {
        let (st, p) = fhir(
            s,
            &admin,
            reqwest::Method::POST,
            "Patient",
            Some(
                &json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Pat"]}],
                    "generalPractitioner": GENERAL_PRACTITIONERS
                        .iter()
                        .map(|p| json!({"reference": format!("Practitioner/{p}")}))
                        .collect::<Vec<_>>()}),
            ),
        )
        .await;
        assert_eq!(st, 201, "{p}");
        let pid = p["id"].as_str().unwrap().to_string();
        let (_, enc) = fhir(
            s,
            &admin,
            reqwest::Method::POST,
            "Encounter",
            Some(&json!({"resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": format!("Patient/{pid}")}})),
        )
        .await;
        let mut obs = Vec::new();
        for cat in ["laboratory", "vital-signs"] {
            let (st, o) = fhir(
                s,
                &admin,
                reqwest::Method::POST,
                "Observation",
                Some(&json!({"resourceType": "Observation", "status": "final",
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": cat}]}],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": {"reference": format!("Patient/{pid}")},
                    "encounter": {"reference": format!("Encounter/{}", enc["id"].as_str().unwrap())}})),
            )
            .await;
            assert_eq!(st, 201, "{o}");
            obs.push(o["id"].as_str().unwrap().to_string());
        }
        made.push((pid, obs, enc["id"].as_str().unwrap().to_string()));
    }
    World {
        admin,
        p1: made[0].0.clone(),
        p2: made[1].0.clone(),
        lab1: made[0].1[0].clone(),
        vital1: made[0].1[1].clone(),
        lab2: made[1].1[0].clone(),
        enc1: made[0].2.clone(),
    }
}

#[tokio::test]
async fn discovery_documents_and_public_endpoints() {
    let s = TestServer::start_secured().await;
    let c: Value = s
        .get(".well-known/smart-configuration")
        .await
        .json()
        .await
        .unwrap();
    for f in [
        "issuer",
        "jwks_uri",
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
        "grant_types_supported",
        "token_endpoint_auth_methods_supported",
        "token_endpoint_auth_signing_alg_values_supported",
        "scopes_supported",
        "response_types_supported",
    ] {
        assert!(c.get(f).is_some(), "smart-configuration lacks {f}");
    }
    assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
    let caps: Vec<&str> = c["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in [
        "launch-ehr",
        "launch-standalone",
        "authorize-post",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "context-ehr-patient",
        "context-ehr-encounter",
        "context-standalone-patient",
        "permission-offline",
        "permission-online",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
    ] {
        assert!(caps.contains(&cap), "capability {cap} missing");
    }
    let oidc: Value = s
        .get(".well-known/openid-configuration")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(oidc["issuer"], c["issuer"]);
    assert_eq!(
        oidc["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    let jwks: Value = s
        .client
        .get(c["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "no private parts in the JWKS"
    );
    // The CapabilityStatement names the OAuth endpoints.
    let cs: Value = s.get("metadata").await.json().await.unwrap();
    let sec = &cs["rest"][0]["security"];
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let ops: Vec<&str> = cs["rest"][0]["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "everything",
            "signed-document",
            "correction-request",
            "approve",
            "reject"
        ]
    );
    let uris = &sec["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert!(uris["extension"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["url"] == "token" && e["valueUri"] == c["token_endpoint"]));
}

#[tokio::test]
async fn the_fhir_api_needs_a_valid_bearer_token() {
    let s = TestServer::start_secured().await;
    for path in ["Patient", "Patient/x", "_history", "Patient/x/$everything"] {
        let r = s.get(path).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let oo: Value = r.json().await.unwrap();
        assert_eq!(first_issue(&oo)["code"], "login");
    }
    let r = s
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": []}),
        )
        .await;
    assert_eq!(r.status(), 401);
    // A forged token (signed by someone else's key) is refused.
    let k = client_key(Algorithm::RS384);
    let mut h = Header::new(Algorithm::RS384);
    h.kid = Some("forged".into());
    let forged = jsonwebtoken::encode(&h, &json!({"iss": s.base, "aud": s.base, "sub": "x", "exp": 4102444800i64, "scope": "system/*.cruds", "jti": "j", "client_id": "c"}), &k.key).unwrap();
    let r = s
        .client
        .get(s.url("Patient"))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(s.get("metadata").await.status(), 200);
}

#[tokio::test]
async fn backend_services_client_credentials_with_rs384_and_es384() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    for alg in [Algorithm::RS384, Algorithm::ES384] {
        let k = client_key(alg);
        let id = backend_client(&s, &k, "system/Observation.rs system/Patient.rs");
        // Asked for more than registered: narrowed.
        let (st, t) = backend_token(
            &s,
            &id,
            &k,
            "system/Observation.rs system/Patient.cruds system/Condition.rs",
        )
        .await;
        assert_eq!(st, 200, "{t}");
        assert_eq!(t["token_type"], "Bearer");
        assert_eq!(t["scope"], "system/Observation.rs system/Patient.rs");
        assert!(t.get("refresh_token").is_none());
        let token = t["access_token"].as_str().unwrap();
        let (st, b) = get(&s, token, "Observation").await;
        assert_eq!(st, 200);
        assert_eq!(b["total"], 4);
        let (st, oo) = get(&s, token, "Condition").await;
        assert_eq!(st, 403, "{oo}");
        assert_eq!(first_issue(&oo)["code"], "forbidden");
        let (st, _) = fhir(
            &s,
            token,
            reqwest::Method::POST,
            "Patient",
            Some(&json!({"resourceType": "Patient"})),
        )
        .await;
        assert_eq!(st, 403, "create needs c");
    }
    // Assertion checks: replayed jti, too long a lifetime, wrong audience,
    // wrong key, HS256.
    let k = client_key(Algorithm::RS384);
    let id = backend_client(&s, &k, "system/*.rs");
    let a = assertion(&s, &id, &k, 240, None);
    let tok = |a: String| {
        let s = &s;
        async move { assertion_grant(s, &a, "system/*.rs").await }
    };
    assert_eq!(tok(a.clone()).await.0, 200);
    let (st, e) = tok(a).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (401, Some("invalid_client")),
        "{e}"
    );
    assert!(e["error_description"].as_str().unwrap().contains("jti"));
    let (st, e) = tok(assertion(&s, &id, &k, 600, None)).await;
    assert_eq!(st, 401, "{e}");
    assert!(
        e["error_description"].as_str().unwrap().contains("300"),
        "{e}"
    );
    let (st, _) = tok(assertion(
        &s,
        &id,
        &k,
        240,
        Some("https://elsewhere.example/token"),
    ))
    .await;
    assert_eq!(st, 401);
    let other = client_key(Algorithm::RS384);
    let forged = ClientKey {
        kid: k.kid.clone(),
        ..other
    };
    let (st, _) = tok(assertion(&s, &id, &forged, 240, None)).await;
    assert_eq!(st, 401);
    let hs = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"iss": id, "sub": id, "aud": s.url("auth/token"), "exp": chrono::Utc::now().timestamp() + 60, "jti": "h"}), &EncodingKey::from_secret(b"secret")).unwrap();
    let (st, e) = tok(hs).await;
    assert_eq!(st, 401, "{e}");
    // Patient and user scopes cannot be had without a user.
    let (st, e) = backend_token(&s, &id, &k, "patient/*.rs").await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_scope")));
    drop(w);
}

#[tokio::test]
async fn granular_scopes_limit_an_insurer_to_laboratory_results() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let k = client_key(Algorithm::ES384);
    let granular = format!("system/Observation.rs?category={LAB}");
    let id = backend_client(&s, &k, &granular);
    let (st, t) = backend_token(&s, &id, &k, &granular).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["scope"], granular);
    let token = t["access_token"].as_str().unwrap();
    let (st, b) = get(&s, token, "Observation").await;
    assert_eq!(st, 200);
    assert_eq!(ids(&b, "Observation"), {
        let mut v = vec![w.lab1.clone(), w.lab2.clone()];
        v.sort();
        v
    });
    assert_eq!(b["total"], 2, "totals count only what may be seen");
    assert_eq!(
        get(&s, token, &format!("Observation/{}", w.lab1)).await.0,
        200
    );
    // What the token may not see answers like what does not exist.
    assert_eq!(
        get(&s, token, &format!("Observation/{}", w.vital1)).await.0,
        404
    );
    // Includes never leak: the Encounter and Patient are not in scope.
    let (_, b) = get(
        &s,
        token,
        "Observation?_include=Observation:subject&_include=Observation:encounter",
    )
    .await;
    assert!(
        ids(&b, "Patient").is_empty() && ids(&b, "Encounter").is_empty(),
        "{b}"
    );
    // Chaining into a type outside the scopes is refused.
    let (st, _) = get(&s, token, "Observation?subject:Patient.name=Alpha").await;
    assert_eq!(st, 403);
}

#[tokio::test]
async fn patient_standalone_launch_with_self_sign_up_and_pkce() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let client = public_client(
        &s,
        "openid fhirUser launch/patient offline_access patient/*.rs patient/Observation.cruds",
    );
    let (verifier, challenge) = pkce();
    let params = authorize_params(&s, &client, "openid fhirUser launch/patient offline_access patient/Patient.rs patient/Observation.rs user/Patient.rs", &challenge, &[("nonce", "n-42")]);
    let b = browser();
    // Not signed in: the login page, with a link to sign up.
    let r = b
        .get(s.url("auth/authorize"))
        .query(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<html lang=\"en\">")
            && html.contains("<h1>Sign in</h1>")
            && html.contains("<label for=\"username\">")
    );
    let mut f = params.clone();
    for (k, v) in [
        ("given", "Sam"),
        ("family", "Selfsign"),
        ("birthDate", "1990-02-03"),
        ("email", "sam@example.org"),
        ("password", "a long enough password"),
    ] {
        f.push((k.into(), v.into()));
    }
    let r = b.post(s.url("auth/signup")).form(&f).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let back = query_of(r.headers()["location"].to_str().unwrap());
    let redirect = consent(&s, &b, &back, None, None).await;
    assert_eq!(q(&redirect, "state"), Some("st-123"));
    let code = q(&redirect, "code").unwrap().to_string();
    let (st, t) = exchange_code(&s, &client, &code, &verifier).await;
    assert_eq!(st, 200, "{t}");
    // user/ scopes are not for patients; what was granted is said.
    assert_eq!(
        t["scope"],
        "openid fhirUser launch/patient offline_access patient/Patient.rs patient/Observation.rs"
    );
    let me = t["patient"].as_str().unwrap().to_string();
    assert_eq!(t["need_patient_banner"], true);
    assert!(t["refresh_token"].is_string());
    let id = claims_of(t["id_token"].as_str().unwrap());
    assert_eq!(id["fhirUser"], format!("Patient/{me}"));
    assert_eq!(id["nonce"], "n-42");
    assert_eq!(id["aud"], client);
    let token = t["access_token"].as_str().unwrap();
    let (st, p) = get(&s, token, &format!("Patient/{me}")).await;
    assert_eq!(st, 200);
    assert_eq!(p["name"][0]["family"], "Selfsign");
    assert_eq!(get(&s, token, &format!("Patient/{}", w.p1)).await.0, 404);
    let (_, b2) = get(&s, token, "Patient").await;
    assert_eq!(ids(&b2, "Patient"), vec![me.clone()]);
    let (_, b3) = get(&s, token, "Observation").await;
    assert_eq!(b3["total"], 0, "no one else's observations");
    // The code is single-use; replaying it revokes what it gave.
    let (st, e) = exchange_code(&s, &client, &code, &verifier).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(get(&s, token, &format!("Patient/{me}")).await.0, 401);
}

#[tokio::test]
async fn pkce_redirects_and_audience_are_checked() {
    let s = TestServer::start_secured().await;
    let client = public_client(&s, "patient/*.rs launch/patient");
    let b = browser();
    let (verifier, challenge) = pkce();
    let go = |params: Vec<(String, String)>| {
        let b = b.clone();
        let url = s.url("auth/authorize");
        async move { b.get(url).query(&params).send().await.unwrap() }
    };
    // plain and missing PKCE: back to the app with invalid_request.
    for extra in [
        vec![("code_challenge_method", "plain")],
        vec![("code_challenge_method", ""), ("code_challenge", "")],
    ] {
        let r = go(authorize_params(
            &s,
            &client,
            "patient/*.rs",
            &challenge,
            &extra,
        ))
        .await;
        assert_eq!(r.status(), 303);
        let back = query_of(r.headers()["location"].to_str().unwrap());
        assert_eq!(q(&back, "error"), Some("invalid_request"));
        assert_eq!(q(&back, "state"), Some("st-123"));
    }
    let r = go(authorize_params(
        &s,
        &client,
        "patient/*.rs",
        &challenge,
        &[("aud", "https://other.example/fhir")],
    ))
    .await;
    let back = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&back, "error"), Some("invalid_request"));
    assert!(q(&back, "error_description").unwrap().contains("aud"));
    let r = go(authorize_params(
        &s,
        &client,
        "patient/Nothing.rs",
        &challenge,
        &[],
    ))
    .await;
    assert_eq!(
        q(
            &query_of(r.headers()["location"].to_str().unwrap()),
            "error"
        ),
        Some("invalid_scope")
    );
    // An unregistered redirect URI is never redirected to.
    let r = go(authorize_params(
        &s,
        &client,
        "patient/*.rs",
        &challenge,
        &[("redirect_uri", "https://evil.example/cb")],
    ))
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("location").is_none());
    // The wrong verifier does not redeem a code.
    practitioner_user(&s, "dr.pkce", "pr1");
    let params = authorize_params(&s, &client, "patient/*.rs", &challenge, &[]);
    let redirect = consent(
        &s,
        &b,
        &params,
        Some(("dr.pkce", "correct horse battery")),
        None,
    )
    .await;
    let code = q(&redirect, "code").unwrap();
    let (st, e) = exchange_code(&s, &client, code, &pkce().0).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    let _ = verifier;
    // A wrong password shows the login page again with an alert.
    let mut f = params.clone();
    f.push(("username".into(), "dr.pkce".into()));
    f.push(("password".into(), "wrong password!".into()));
    let r = browser()
        .post(s.url("auth/login"))
        .form(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("role=\"alert\""));
}

#[tokio::test]
async fn ehr_launch_and_practitioner_standalone_launch_bind_the_patient() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    practitioner_user(&s, "dr.who", "pr-1");
    let secret_client = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "Chart App",
            "--type",
            "confidential-symmetric",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "launch launch/patient openid fhirUser online_access patient/*.rs user/*.rs",
        ],
        None,
    );
    let client = secret_client["client_id"].as_str().unwrap().to_string();
    let secret = secret_client["client_secret"].as_str().unwrap().to_string();
    // EHR launch: the launch id carries patient and encounter.
    let launch = cli(
        &s,
        &["launch", "--patient", &w.p1, "--encounter", &w.enc1],
        None,
    )["launch"]
        .as_str()
        .unwrap()
        .to_string();
    let (verifier, challenge) = pkce();
    let b = browser();
    let params = authorize_params(
        &s,
        &client,
        "launch openid fhirUser online_access patient/Observation.rs patient/Encounter.rs",
        &challenge,
        &[("launch", &launch)],
    );
    let redirect = consent(
        &s,
        &b,
        &params,
        Some(("dr.who", "correct horse battery")),
        None,
    )
    .await;
    let code = q(&redirect, "code").unwrap();
    // client_secret_basic; a wrong secret first.
    let exchange = |user: String, pass: String, code: String| {
        let s = &s;
        let verifier = verifier.clone();
        async move {
            let r = s
                .client
                .post(s.url("auth/token"))
                .basic_auth(user, Some(pass))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", verifier.as_str()),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, e) = exchange(client.clone(), "not-the-secret".into(), code.to_string()).await;
    assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")));
    let (st, t) = exchange(client.clone(), secret.clone(), code.to_string()).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], w.p1.as_str());
    assert_eq!(t["encounter"], w.enc1.as_str());
    assert_eq!(
        claims_of(t["id_token"].as_str().unwrap())["fhirUser"],
        "Practitioner/pr-1"
    );
    let token = t["access_token"].as_str().unwrap();
    let (_, b1) = get(&s, token, "Observation").await;
    assert_eq!(b1["total"], 2);
    assert_eq!(
        get(&s, token, &format!("Observation/{}", w.lab2)).await.0,
        404
    );
    // Compartment confinement reaches _revinclude, $everything and history.
    let (_, b2) = get(&s, token, "Encounter?_revinclude=Observation:encounter").await;
    assert_eq!(ids(&b2, "Encounter"), vec![w.enc1.clone()]);
    assert_eq!(ids(&b2, "Observation").len(), 2);
    assert_eq!(
        get(&s, token, &format!("Patient/{}/$everything", w.p2))
            .await
            .0,
        403
    );
    assert_eq!(get(&s, token, "Observation/_history").await.0, 403);
    assert_eq!(
        get(&s, token, &format!("Observation/{}/_history", w.lab1))
            .await
            .0,
        200
    );
    // Refresh with rotation (client_secret_post); a reused refresh token
    // kills the grant.
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    let (st, t2) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &client),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t2}");
    assert_ne!(t2["refresh_token"], t["refresh_token"]);
    let new_token = t2["access_token"].as_str().unwrap().to_string();
    assert_eq!(get(&s, &new_token, "Observation").await.0, 200);
    let (st, e) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &client),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(
        get(&s, &new_token, "Observation").await.0,
        401,
        "the whole grant is revoked"
    );

    // Standalone: the practitioner picks the patient (same browser session).
    let (verifier, challenge) = pkce();
    let params = authorize_params(
        &s,
        &client,
        "launch/patient patient/Patient.rs",
        &challenge,
        &[],
    );
    let redirect = consent(&s, &b, &params, None, Some(&w.p2)).await;
    let (st, t) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", q(&redirect, "code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
            ("client_id", &client),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], w.p2.as_str());
    assert!(
        t.get("refresh_token").is_none(),
        "neither offline_access nor online_access was asked"
    );
}

#[tokio::test]
async fn transactions_are_confined_entry_by_entry_and_stay_atomic() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let launch = cli(&s, &["launch", "--patient", &w.p1], None)["launch"]
        .as_str()
        .unwrap()
        .to_string();
    practitioner_user(&s, "dr.tx", "pr-2");
    let client = public_client(&s, "launch patient/*.cruds");
    // Task: a practitioner's change of a record is an amendment, kept as
    // a Task for another practitioner to approve.
    let t = app_token(
        &s,
        &client,
        "launch patient/Observation.cruds patient/Task.c",
        Some(("dr.tx", "correct horse battery")),
        &[("launch", &launch)],
    )
    .await;
    let token = t["access_token"].as_str().unwrap();
    let obs = |pid: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "note"}, "subject": {"reference": format!("Patient/{pid}")}});
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs(&w.p1), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs(&w.p2), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let before = get(&s, &w.admin, "Observation?_summary=count").await.1["total"].clone();
    let (st, oo) = fhir(&s, token, reqwest::Method::POST, "", Some(&bundle)).await;
    assert_eq!(st, 403, "{oo}");
    assert!(
        first_issue(&oo)["expression"][0]
            .as_str()
            .unwrap()
            .starts_with("Bundle.entry[1]"),
        "{oo}"
    );
    assert_eq!(
        get(&s, &w.admin, "Observation?_summary=count").await.1["total"],
        before,
        "nothing written"
    );
    // Writing inside the compartment works; moving a record out does not.
    let (st, o) = fhir(
        &s,
        token,
        reqwest::Method::POST,
        "Observation",
        Some(&obs(&w.p1)),
    )
    .await;
    assert_eq!(st, 201);
    let mut moved = o.clone();
    moved["subject"]["reference"] = json!(format!("Patient/{}", w.p2));
    let (st, _) = fhir(
        &s,
        token,
        reqwest::Method::PUT,
        &format!("Observation/{}", o["id"].as_str().unwrap()),
        Some(&moved),
    )
    .await;
    assert_eq!(st, 403);
    assert_eq!(
        fhir(
            &s,
            token,
            reqwest::Method::DELETE,
            &format!("Observation/{}", w.lab2),
            None
        )
        .await
        .0,
        204,
        "deleting another patient's record answers like deleting a missing one"
    );
    assert_eq!(
        get(&s, &w.admin, &format!("Observation/{}", w.lab2))
            .await
            .0,
        200,
        "and deletes nothing"
    );
    assert_eq!(
        fhir(
            &s,
            token,
            reqwest::Method::DELETE,
            &format!("Observation/{}", w.lab1),
            None
        )
        .await
        .0,
        202,
        "deleting a record of their patient is an amendment awaiting approval"
    );
}

#[tokio::test]
async fn introspection_revocation_and_key_rotation() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let k = client_key(Algorithm::RS384);
    let id = backend_client(&s, &k, "system/Patient.rs");
    let (_, t) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    let token = t["access_token"].as_str().unwrap().to_string();
    let introspect = |tok: String| {
        let s = &s;
        let w_admin = w.admin.clone();
        async move {
            let r = s
                .client
                .post(s.url("auth/introspect"))
                .bearer_auth(w_admin)
                .form(&[("token", tok.as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let info = introspect(token.clone()).await;
    assert_eq!(info["active"], true);
    assert_eq!(info["scope"], "system/Patient.rs");
    assert_eq!(info["client_id"], id.as_str());
    assert_eq!(introspect("nonsense".into()).await["active"], false);
    // Introspection itself needs credentials.
    let r = s
        .client
        .post(s.url("auth/introspect"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Keys rotate; tokens signed by the old key stay valid, new ones use the new key.
    let old_kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let new_kid = cli(&s, &["keys", "rotate"], None)["kid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(old_kid, new_kid);
    let jwks: Value = s.get("auth/jwks").await.json().await.unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()));
    assert_eq!(get(&s, &token, "Patient").await.0, 200);
    let (_, t2) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    assert_eq!(
        jsonwebtoken::decode_header(t2["access_token"].as_str().unwrap())
            .unwrap()
            .kid
            .unwrap(),
        new_kid
    );
    // Revocation (RFC 7009) by the owning client takes effect at once.
    let a = assertion(&s, &id, &k, 200, None);
    let (st, _) = form(
        &s,
        "auth/revoke",
        &[
            ("token", &token),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(introspect(token.clone()).await["active"], false);
    let r = s
        .client
        .get(s.url("Patient"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("revoked"));
}

/// The scope matrix: a `patient/` token for patient A (`Patient/example`
/// of the R4 examples) gets nothing of any other patient's, for every
/// resource type of the Patient compartment and the types outside it that
/// hold one patient's data, through read, vread, history, search (by id
/// too), `_include`, `_revinclude`, chaining, `_has`, batch entries,
/// updates, deletes and `$everything`. What A may not see answers as if it
/// did not exist (404, and 204 for a delete), never 403.
#[tokio::test]
async fn a_patient_token_reaches_nothing_of_another_patient_through_any_interaction() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let admin = w.admin.clone();
    load_r4_examples(&s, &admin).await;

    let a = "example";
    let token = patient_token(&s, a, "patient/*.cruds").await;
    let compartments: Value =
        serde_json::from_str(&std::fs::read_to_string("conformance/compartments.json").unwrap())
            .unwrap();
    // AuditEvents are the server's record, not stored resources: a
    // patient's token finds its own (tests/audit.rs), which no compartment
    // search of stored resources lists.
    let types: Vec<String> = compartments["Patient"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|t| t.as_str() != "AuditEvent")
        .cloned()
        .collect();
    // What belongs to A, by the compartment definition, read with the
    // unrestricted token; and everything else of those types.
    let mut mine: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut others: Vec<String> = Vec::new();
    for t in &types {
        let (_, inside) = all_pages(&s, &admin, &format!("Patient/{a}/{t}?_count=500")).await;
        let inside: Vec<String> = if t == "Patient" {
            vec![format!("Patient/{a}")]
        } else {
            inside.into_iter().map(|(_, r)| r).collect()
        };
        let (st, all) = all_pages(&s, &admin, &format!("{t}?_count=500")).await;
        assert_eq!(st, 200);
        for (_, r) in all {
            if !inside.contains(&r) {
                others.push(r);
            }
        }
        // Search with A's token returns exactly A's part.
        let (st, got) = all_pages(&s, &token, &format!("{t}?_count=500")).await;
        assert_eq!(st, 200, "{t}");
        let mut got: Vec<String> = got.into_iter().map(|(_, r)| r).collect();
        got.sort();
        let mut want = inside.clone();
        want.sort();
        assert_eq!(got, want, "search {t}");
        mine.extend(inside);
    }
    // Types outside the compartment that still hold one patient's data:
    // A's own are A's, those of any other patient are not.
    for t in PATIENT_DATA_OUTSIDE_THE_COMPARTMENT {
        let (_, own) = all_pages(&s, &admin, &format!("{t}?patient={a}&_count=500")).await;
        let own: Vec<String> = own.into_iter().map(|(_, r)| r).collect();
        let (st, anyone) =
            all_pages(&s, &admin, &format!("{t}?patient:missing=false&_count=500")).await;
        assert_eq!(st, 200, "{t}");
        for (_, r) in anyone {
            if !own.contains(&r) {
                others.push(r);
            }
        }
        mine.extend(own);
    }
    assert!(
        mine.len() > 20,
        "the example patient has a record: {}",
        mine.len()
    );
    assert!(others.len() > 100, "others: {}", others.len());
    let other_types: std::collections::HashSet<&str> = others
        .iter()
        .map(|r| r.split('/').next().unwrap())
        .collect();
    assert!(other_types.len() > 30, "{other_types:?}");
    for r in &others {
        let (t, id) = r.split_once('/').unwrap();
        for path in [
            r.clone(),
            format!("{r}/_history/1"),
            format!("{r}/_history"),
        ] {
            let (st, oo) = get(&s, &token, &path).await;
            assert_eq!(st, 404, "GET {path}: {oo}");
        }
        let (_, b) = get(&s, &token, &format!("{t}?_id={id}")).await;
        assert_eq!(b["total"], 0, "{t}?_id={id}");
        let (st, _) = fhir(&s, &token, reqwest::Method::DELETE, r, None).await;
        assert_eq!(st, 204, "DELETE {r}");
    }
    // A batch of GETs of the others: every entry answers as if missing.
    let entries: Vec<Value> = others
        .iter()
        .take(60)
        .map(|r| json!({"request": {"method": "GET", "url": r}}))
        .collect();
    let (st, b) = fhir(
        &s,
        &token,
        reqwest::Method::POST,
        "",
        Some(&json!({"resourceType": "Bundle", "type": "batch", "entry": entries})),
    )
    .await;
    assert_eq!(st, 200);
    for e in b["entry"].as_array().unwrap() {
        assert!(
            e["response"]["status"].as_str().unwrap().starts_with("404"),
            "{e}"
        );
    }
    // Includes, reverse includes, chains and _has stay inside: nothing of
    // another patient's record, and none of the types a patient/ token
    // cannot reach at all.
    let outside = |found: &[(String, String)]| -> Vec<String> {
        found
            .iter()
            .map(|(_, r)| r.clone())
            .filter(|r| {
                let t = r.split('/').next().unwrap();
                let patient_data = types.iter().any(|c| c == t)
                    || PATIENT_DATA_OUTSIDE_THE_COMPARTMENT.contains(&t);
                (patient_data && !mine.contains(r)) || UNREACHABLE_WITH_PATIENT_SCOPES.contains(&t)
            })
            .collect()
    };
    for path in [
        "Observation?_include=*&_count=500".to_string(),
        "Encounter?_include=*&_revinclude=*&_count=500".to_string(),
        format!("Patient?_revinclude=*&_id={a}"),
        "Condition?_include=Condition:subject&_revinclude:iterate=Provenance:target".to_string(),
        format!("Patient/{a}/$everything?_count=500"),
    ] {
        let (st, found) = all_pages(&s, &token, &path).await;
        assert_eq!(st, 200, "{path}");
        assert_eq!(outside(&found), Vec::<String>::new(), "{path}");
    }
    let (st, found) = all_pages(
        &s,
        &token,
        "Observation?subject:Patient.name=Chalmers,Everywoman,Donald",
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(outside(&found), Vec::<String>::new());
    let (_, b) = get(&s, &token, "Patient?_has:Observation:patient:status=final").await;
    assert!(
        b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["resource"]["id"] == a),
        "{b}"
    );
    let other_patient = others.iter().find(|r| r.starts_with("Patient/")).unwrap();
    assert_eq!(
        get(&s, &token, &format!("{other_patient}/$everything"))
            .await
            .0,
        404
    );
    assert_eq!(
        get(&s, &token, &format!("{other_patient}/Observation"))
            .await
            .1["total"],
        0
    );
    assert_eq!(get(&s, &token, "_history").await.0, 403);
    // Writes into another patient's record are refused, and A's own work.
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": other_patient}});
    assert_eq!(
        fhir(&s, &token, reqwest::Method::POST, "Observation", Some(&obs))
            .await
            .0,
        403
    );
    let mine_obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{a}")}});
    assert_eq!(
        fhir(
            &s,
            &token,
            reqwest::Method::POST,
            "Observation",
            Some(&mine_obs)
        )
        .await
        .0,
        201
    );
}

#[tokio::test]
async fn expired_unknown_and_forged_credentials_are_refused() {
    let s = TestServer::start_with(|c| c.access_token_lifetime = 1).await;
    let k = client_key(Algorithm::RS384);
    let id = backend_client(&s, &k, "system/*.rs");
    let (st, t) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["expires_in"], 1);
    let token = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(get(&s, &token, "Patient").await.0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = s
        .client
        .get(s.url("Patient"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("expired"));
    let tok = |a: String| {
        let s = &s;
        async move { assertion_grant(s, &a, "system/*.rs").await }
    };
    // An assertion that has expired.
    let (st, e) = tok(assertion(&s, &id, &k, -30, None)).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (401, Some("invalid_client")),
        "{e}"
    );
    // A kid the client never registered.
    let unknown = ClientKey {
        kid: "not-registered".into(),
        ..client_key(Algorithm::RS384)
    };
    let (st, e) = tok(assertion(&s, &id, &unknown, 60, None)).await;
    assert_eq!(st, 401);
    assert!(
        e["error_description"].as_str().unwrap().contains("kid"),
        "{e}"
    );
    // alg: none.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(json!({"iss": id, "sub": id, "aud": s.url("auth/token"), "exp": chrono::Utc::now().timestamp() + 60, "jti": "n"}).to_string().as_bytes())
    );
    let (st, _) = tok(none).await;
    assert_eq!(st, 401);
    // HS256 with the client's own public key as the HMAC secret.
    let public_pem = {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let st = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let out = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        let pem = std::fs::read(&key).unwrap();
        let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS384).unwrap();
        jwk.common.key_id = Some("rsa-1".into());
        (out.stdout, serde_json::to_value(&jwk).unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [public_pem.1]}).to_string()).unwrap();
    let rsa_client = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "R",
            "--type",
            "confidential-asymmetric",
            "--jwks-file",
            jwks.to_str().unwrap(),
            "--scope",
            "system/*.rs",
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(&h, &json!({"iss": rsa_client, "sub": rsa_client, "aud": s.url("auth/token"), "exp": chrono::Utc::now().timestamp() + 60, "jti": "c"}), &EncodingKey::from_secret(&public_pem.0)).unwrap();
    let (st, e) = tok(confused).await;
    assert_eq!(st, 401, "{e}");
    // A bearer token with alg none is no token at all.
    let r = s
        .client
        .get(s.url("Patient"))
        .bearer_auth(format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(b"{}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn ehr_users_mint_launch_contexts_and_authorize_accepts_post() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    practitioner_user(&s, "dr.post", "pr-9");
    let client = public_client(&s, "launch openid fhirUser user/*.rs patient/*.rs");
    // A practitioner's own token (standalone, user scopes)…
    let t = app_token(
        &s,
        &client,
        "user/Patient.rs openid fhirUser",
        Some(("dr.post", "correct horse battery")),
        &[],
    )
    .await;
    let user_token = t["access_token"].as_str().unwrap().to_string();
    // …mints a launch context (POST /auth/launch).
    let r = s
        .client
        .post(s.url("auth/launch"))
        .bearer_auth(&user_token)
        .json(&json!({"patient": w.p2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let launch = r.json::<Value>().await.unwrap()["launch"]
        .as_str()
        .unwrap()
        .to_string();
    // Patients and backend systems cannot.
    let r = s
        .client
        .post(s.url("auth/launch"))
        .bearer_auth(&w.admin)
        .json(&json!({"patient": w.p2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The app's authorize request arrives as a form POST (authorize-post).
    let (verifier, challenge) = pkce();
    let params = authorize_params(
        &s,
        &client,
        "launch patient/Patient.rs",
        &challenge,
        &[("launch", &launch)],
    );
    let b = browser();
    let mut f = params.clone();
    f.push(("username".into(), "dr.post".into()));
    f.push(("password".into(), "correct horse battery".into()));
    let r = b.post(s.url("auth/login")).form(&f).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let r = b
        .post(s.url("auth/authorize"))
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("<h1>Allow access</h1>"));
    let mut f = params.clone();
    f.push(("csrf".into(), hidden_value(&html, "csrf").unwrap()));
    f.push(("grant".into(), "launch".into()));
    f.push(("grant".into(), "patient/Patient.rs".into()));
    f.push(("decision".into(), "allow".into()));
    // A forged consent (wrong csrf) is refused.
    let mut forged = f.clone();
    forged.retain(|(k, _)| k != "csrf");
    forged.push(("csrf".into(), "forged".into()));
    assert_eq!(
        b.post(s.url("auth/consent"))
            .form(&forged)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let r = b.post(s.url("auth/consent")).form(&f).send().await.unwrap();
    let back = query_of(r.headers()["location"].to_str().unwrap());
    let (st, t) = exchange_code(&s, &client, q(&back, "code").unwrap(), &verifier).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], w.p2.as_str());
    assert_eq!(t["scope"], "launch patient/Patient.rs");
    // Denying sends access_denied back to the app.
    let (_, challenge) = pkce();
    let params = authorize_params(&s, &client, "patient/Patient.rs", &challenge, &[]);
    let html = b
        .get(s.url("auth/authorize"))
        .query(&params)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut f = params.clone();
    f.push(("csrf".into(), hidden_value(&html, "csrf").unwrap()));
    f.push(("decision".into(), "deny".into()));
    let r = b.post(s.url("auth/consent")).form(&f).send().await.unwrap();
    assert_eq!(
        q(
            &query_of(r.headers()["location"].to_str().unwrap()),
            "error"
        ),
        Some("access_denied")
    );
}

/// An authorization code and a refresh token are each redeemed once, even
/// by twenty requests racing for them: one gets tokens, the others
/// `invalid_grant` (on SQLite and on PostgreSQL alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redemptions_of_one_code_or_refresh_token_succeed_once() {
    use futures_util::future::join_all;
    let s = TestServer::start_secured().await;
    practitioner_user(&s, "dr.race", "pr-race");
    let client = public_client(&s, "offline_access user/*.rs");
    let b = browser();
    let mut login = Some(("dr.race", "correct horse battery"));
    let mut code_and_verifier = || {
        let (s, b, client, login) = (&s, b.clone(), client.clone(), login.take());
        async move {
            let (verifier, challenge) = pkce();
            let params = authorize_params(
                s,
                &client,
                "offline_access user/Patient.rs",
                &challenge,
                &[],
            );
            let back = consent(s, &b, &params, login, None).await;
            (q(&back, "code").unwrap().to_string(), verifier)
        }
    };
    let one_of_twenty = |results: &[(u16, Value)], what: &str| {
        let won = results.iter().filter(|(st, _)| *st == 200).count();
        assert_eq!(won, 1, "{what}: {results:?}");
        for (st, e) in results.iter().filter(|(st, _)| *st != 200) {
            assert_eq!(
                (*st, e["error"].as_str()),
                (400, Some("invalid_grant")),
                "{what}: {e}"
            );
        }
    };

    let (code, verifier) = code_and_verifier().await;
    let redemptions = (0..20).map(|_| {
        let (s, client, code, verifier) = (&s, &client, &code, &verifier);
        async move { exchange_code(s, client, code, verifier).await }
    });
    let results = join_all(redemptions).await;
    one_of_twenty(&results, "authorization_code");

    // A refresh token from a code redeemed once, then raced for.
    let (code, verifier) = code_and_verifier().await;
    let (st, t) = exchange_code(&s, &client, &code, &verifier).await;
    assert_eq!(st, 200, "{t}");
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    let refreshes = (0..20).map(|_| {
        let (s, client, refresh) = (&s, &client, &refresh);
        async move {
            form(
                s,
                "auth/token",
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh),
                    ("client_id", client),
                ],
            )
            .await
        }
    });
    let results = join_all(refreshes).await;
    one_of_twenty(&results, "refresh_token");
}

// The assertion groups of the SMART App Launch STU2 conformance suite
// (Inferno `smart_stu2`), one test per group.

#[tokio::test]
async fn inferno_discovery_group() {
    let s = TestServer::start_secured().await;
    let r = s.get(".well-known/smart-configuration").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let c: Value = r.json().await.unwrap();
    for f in [
        "authorization_endpoint",
        "token_endpoint",
        "capabilities",
        "code_challenge_methods_supported",
        "grant_types_supported",
        "issuer",
        "jwks_uri",
    ] {
        assert!(c.get(f).is_some(), "{f}");
    }
    let methods = c["code_challenge_methods_supported"].as_array().unwrap();
    assert!(methods.contains(&json!("S256")) && !methods.contains(&json!("plain")));
    assert!(c["grant_types_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("authorization_code")));
    assert!(c["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .all(Value::is_string));
    // The CapabilityStatement's OAuth URIs agree with the well-known file.
    let cs: Value = s.get("metadata").await.json().await.unwrap();
    let uris = cs["rest"][0]["security"]["extension"][0]["extension"]
        .as_array()
        .unwrap()
        .clone();
    let uri = |n: &str| {
        uris.iter()
            .find(|e| e["url"] == n)
            .map(|e| e["valueUri"].clone())
            .unwrap()
    };
    assert_eq!(uri("authorize"), c["authorization_endpoint"]);
    assert_eq!(uri("token"), c["token_endpoint"]);
    assert_eq!(uri("introspect"), c["introspection_endpoint"]);
    assert_eq!(uri("revoke"), c["revocation_endpoint"]);
}

#[tokio::test]
async fn inferno_pkce_s256_only_group() {
    let s = TestServer::start_secured().await;
    let client = public_client(&s, "patient/*.rs");
    let (verifier, challenge) = pkce();
    let b = browser();
    for (method, ch) in [
        ("plain", verifier.as_str()),
        ("S512", challenge.as_str()),
        ("", ""),
    ] {
        let p = authorize_params(
            &s,
            &client,
            "patient/*.rs",
            ch,
            &[("code_challenge_method", method)],
        );
        let r = b
            .get(s.url("auth/authorize"))
            .query(&p)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{method}");
        assert_eq!(
            q(
                &query_of(r.headers()["location"].to_str().unwrap()),
                "error"
            ),
            Some("invalid_request")
        );
    }
    // A code without a verifier, or with the challenge itself as verifier, is not redeemed.
    practitioner_user(&s, "dr.pkce2", "p");
    let p = authorize_params(&s, &client, "patient/*.rs", &challenge, &[]);
    let back = consent(
        &s,
        &b,
        &p,
        Some(("dr.pkce2", "correct horse battery")),
        None,
    )
    .await;
    let code = q(&back, "code").unwrap();
    let (st, e) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", &client),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    let (st, e) = exchange_code(&s, &client, code, &challenge).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test]
async fn inferno_client_types_group() {
    let s = TestServer::start_secured().await;
    practitioner_user(&s, "dr.types", "p");
    let b = browser();
    let mut first = true;
    let mut run = |client: String, auth: Vec<(String, String)>, basic: Option<(String, String)>| {
        let (s, b) = (&s, b.clone());
        let login = if first {
            Some(("dr.types", "correct horse battery"))
        } else {
            None
        };
        first = false;
        async move {
            let (verifier, challenge) = pkce();
            let p = authorize_params(s, &client, "user/*.rs", &challenge, &[]);
            let back = consent(s, &b, &p, login, None).await;
            let mut f: Vec<(String, String)> = vec![
                ("grant_type".into(), "authorization_code".into()),
                ("code".into(), q(&back, "code").unwrap().into()),
                ("redirect_uri".into(), REDIRECT.into()),
                ("code_verifier".into(), verifier),
            ];
            f.extend(auth);
            let mut rb = s.client.post(s.url("auth/token")).form(&f);
            if let Some((u, pw)) = basic {
                rb = rb.basic_auth(u, Some(pw));
            }
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Public: client_id only.
    let public = public_client(&s, "user/*.rs");
    let (st, t) = run(public.clone(), vec![("client_id".into(), public)], None).await;
    assert_eq!(st, 200, "{t}");
    // Confidential symmetric: client_secret_basic.
    let sym = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "S",
            "--type",
            "confidential-symmetric",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "user/*.rs",
        ],
        None,
    );
    let (id, secret) = (
        sym["client_id"].as_str().unwrap().to_string(),
        sym["client_secret"].as_str().unwrap().to_string(),
    );
    let (st, t) = run(id.clone(), vec![], Some((id.clone(), secret))).await;
    assert_eq!(st, 200, "{t}");
    // …which may not act as a public client.
    let (st, e) = run(id.clone(), vec![("client_id".into(), id)], None).await;
    assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")));
    // Confidential asymmetric: private_key_jwt on the authorization code grant.
    let k = client_key(Algorithm::ES384);
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [k.jwk]}).to_string()).unwrap();
    let asym = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "A",
            "--type",
            "confidential-asymmetric",
            "--redirect-uri",
            REDIRECT,
            "--jwks-file",
            jwks.to_str().unwrap(),
            "--scope",
            "user/*.rs",
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = assertion(&s, &asym, &k, 120, None);
    let (st, t) = run(
        asym,
        vec![
            (
                "client_assertion_type".into(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ),
            ("client_assertion".into(), a),
        ],
        None,
    )
    .await;
    assert_eq!(st, 200, "{t}");
}

#[tokio::test]
async fn inferno_token_response_and_granted_scopes_group() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let _ = w;
    practitioner_user(&s, "dr.tr", "p");
    let client = public_client(
        &s,
        "launch/patient openid fhirUser offline_access patient/Observation.rs patient/Patient.rs",
    );
    let (verifier, challenge) = pkce();
    let asked = "launch/patient openid fhirUser offline_access patient/Observation.rs patient/Condition.rs patient/Patient.rs";
    let p = authorize_params(&s, &client, asked, &challenge, &[]);
    let b = browser();
    let back = consent(
        &s,
        &b,
        &p,
        Some(("dr.tr", "correct horse battery")),
        Some(&w.p1),
    )
    .await;
    let r = s
        .client
        .post(s.url("auth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", q(&back, "code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
            ("client_id", &client),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["pragma"], "no-cache");
    let t: Value = r.json().await.unwrap();
    assert!(t["token_type"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("bearer"));
    assert!(
        t["access_token"].is_string() && t["expires_in"].is_i64() && t["refresh_token"].is_string()
    );
    assert_eq!(t["patient"], w.p1.as_str());
    // Granted is a subset of requested, and says what was left out.
    let granted: Vec<&str> = t["scope"].as_str().unwrap().split(' ').collect();
    let requested: Vec<&str> = asked.split(' ').collect();
    assert!(granted.iter().all(|g| requested.contains(g)), "{granted:?}");
    assert!(
        !granted.contains(&"patient/Condition.rs"),
        "not registered, not granted"
    );
    let token = t["access_token"].as_str().unwrap();
    assert_eq!(get(&s, token, "Condition").await.0, 403);
    assert_eq!(get(&s, token, &format!("Patient/{}", w.p1)).await.0, 200);
}

#[tokio::test]
async fn inferno_openid_connect_group() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let (st, _) = fhir(
        &s,
        &w.admin,
        reqwest::Method::PUT,
        "Practitioner/pr-oidc",
        Some(
            &json!({"resourceType": "Practitioner", "id": "pr-oidc", "name": [{"family": "Oidc"}]}),
        ),
    )
    .await;
    assert_eq!(st, 201);
    practitioner_user(&s, "dr.oidc", "pr-oidc");
    let client = public_client(&s, "openid fhirUser user/*.rs");
    let t = app_token(
        &s,
        &client,
        "openid fhirUser user/Practitioner.rs",
        Some(("dr.oidc", "correct horse battery")),
        &[("nonce", "abc")],
    )
    .await;
    let oidc: Value = s
        .get(".well-known/openid-configuration")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(oidc["issuer"], s.base.as_str());
    assert!(oidc["response_types_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("code")));
    assert!(oidc["subject_types_supported"].is_array());
    let jwks: Value = s
        .client
        .get(oidc["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id_token = t["id_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    let kid = header.kid.unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap()
            .clone(),
    )
    .unwrap();
    let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
    v.set_audience(&[&client]);
    v.set_issuer(&[&s.base]);
    let claims = jsonwebtoken::decode::<Value>(
        id_token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    for c in ["iss", "sub", "aud", "exp", "iat", "fhirUser"] {
        assert!(claims.get(c).is_some(), "{c}");
    }
    assert_eq!(claims["nonce"], "abc");
    // fhirUser resolves with the access token.
    let fhir_user = claims["fhirUser"].as_str().unwrap();
    let (st, me) = get(&s, t["access_token"].as_str().unwrap(), fhir_user).await;
    assert_eq!(st, 200);
    assert_eq!(me["name"][0]["family"], "Oidc");
}

#[tokio::test]
async fn inferno_token_refresh_group() {
    let s = TestServer::start_secured().await;
    practitioner_user(&s, "dr.refresh", "p");
    let client = public_client(&s, "offline_access user/*.rs");
    let t = app_token(
        &s,
        &client,
        "offline_access user/Patient.rs user/Observation.rs",
        Some(("dr.refresh", "correct horse battery")),
        &[],
    )
    .await;
    // Without a scope parameter: the same scopes again.
    let (st, t2) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t["refresh_token"].as_str().unwrap()),
            ("client_id", &client),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t2}");
    assert_eq!(t2["scope"], t["scope"]);
    assert!(
        t2["access_token"].is_string() && t2["expires_in"].is_i64() && t2["token_type"] == "Bearer"
    );
    // With a narrower scope parameter: narrower scopes.
    let (st, t3) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t2["refresh_token"].as_str().unwrap()),
            ("client_id", &client),
            ("scope", "offline_access user/Patient.rs"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t3}");
    assert_eq!(t3["scope"], "offline_access user/Patient.rs");
    assert_eq!(
        get(&s, t3["access_token"].as_str().unwrap(), "Observation")
            .await
            .0,
        403
    );
    // Wider than granted: refused.
    let (st, e) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t3["refresh_token"].as_str().unwrap()),
            ("client_id", &client),
            ("scope", "user/*.cruds"),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_scope")));
}

#[tokio::test]
async fn inferno_backend_services_errors_group() {
    let s = TestServer::start_secured().await;
    let k = client_key(Algorithm::RS384);
    let id = backend_client(&s, &k, "system/*.rs");
    let a = assertion(&s, &id, &k, 120, None);
    let post = |pairs: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let r = s
                .client
                .post(s.url("auth/token"))
                .form(&pairs)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let at = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string();
    // Invalid grant type.
    let (st, e) = post(vec![
        ("grant_type", "not_a_grant".into()),
        ("scope", "system/*.rs".into()),
        ("client_assertion_type", at.clone()),
        ("client_assertion", a.clone()),
    ])
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    // Invalid client_assertion_type.
    let (st, e) = post(vec![
        ("grant_type", "client_credentials".into()),
        ("scope", "system/*.rs".into()),
        ("client_assertion_type", "not_an_assertion_type".into()),
        ("client_assertion", a.clone()),
    ])
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    // An invalid JWT.
    let (st, e) = post(vec![
        ("grant_type", "client_credentials".into()),
        ("scope", "system/*.rs".into()),
        ("client_assertion_type", at.clone()),
        ("client_assertion", "not.a.jwt".into()),
    ])
    .await;
    assert!(st == 400 || st == 401, "{st}");
    assert_eq!(e["error"], "invalid_client");
    // The untouched assertion still works (nothing above consumed its jti).
    let (st, t) = post(vec![
        ("grant_type", "client_credentials".into()),
        ("scope", "system/*.rs".into()),
        ("client_assertion_type", at),
        ("client_assertion", a),
    ])
    .await;
    assert_eq!(st, 200, "{t}");
}

// Independent client code: SMART on FHIR's own Python client library and
// PyJWT (both from PyPI; `.ci/run` installs them).

fn interop_script(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

#[tokio::test]
async fn the_fhirclient_library_does_a_standalone_launch() {
    use std::io::{BufRead, BufReader, Write};
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let out = cli(
        &s,
        &[
            "user",
            "add",
            "--username",
            "alpha@example.org",
            "--password-stdin",
            "--fhir-user",
            &format!("Patient/{}", w.p1),
        ],
        Some("patient password 1\n"),
    );
    assert_eq!(out["fhirUser"], format!("Patient/{}", w.p1));
    let client = public_client(&s, "launch/patient openid fhirUser patient/*.rs");
    let mut py = Command::new("python3")
        .arg(interop_script("fhirclient_standalone.py"))
        .args([
            s.base.as_str(),
            client.as_str(),
            REDIRECT,
            "launch/patient openid fhirUser patient/*.rs",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let authorize = tokio::task::spawn_blocking(move || {
        let l = lines.next();
        (l, lines)
    })
    .await
    .unwrap();
    let (first, mut lines) = authorize;
    let authorize_url = match first {
        Some(Ok(l)) => l,
        other => {
            let out = py.wait_with_output().unwrap();
            panic!(
                "fhirclient printed {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    assert!(
        authorize_url.starts_with(&s.url("auth/authorize")),
        "{authorize_url}"
    );
    let params = query_of(&authorize_url);
    assert_eq!(q(&params, "code_challenge_method"), Some("S256"));
    let back = consent(
        &s,
        &browser(),
        &params,
        Some(("alpha@example.org", "patient password 1")),
        None,
    )
    .await;
    let callback = with_pairs(REDIRECT, &back);
    let mut stdin = py.stdin.take().unwrap();
    writeln!(stdin, "{callback}").unwrap();
    drop(stdin);
    let result = tokio::task::spawn_blocking(move || lines.next())
        .await
        .unwrap();
    let status = py.wait_with_output().unwrap();
    let line = match result {
        Some(Ok(l)) => l,
        other => panic!(
            "fhirclient failed: {other:?}: {}",
            String::from_utf8_lossy(&status.stderr)
        ),
    };
    let got: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got["ready"], true);
    assert_eq!(got["patient_id"], w.p1.as_str());
    assert_eq!(got["family"], "Alpha");
    let mut want = vec![w.lab1.clone(), w.vital1.clone()];
    want.sort();
    assert_eq!(got["observations"], json!(want));
}

fn with_pairs(uri: &str, pairs: &[(String, String)]) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish();
    format!("{uri}?{q}")
}

#[tokio::test]
async fn pyjwt_assertions_get_backend_services_tokens() {
    let s = TestServer::start_secured().await;
    let w = world(&s).await;
    let _ = w;
    for (alg, curve) in [("RS384", None), ("ES384", Some("P-384"))] {
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("key.pem");
        let mut c = Command::new("openssl");
        c.arg("genpkey");
        match curve {
            None => c.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            Some(cv) => c.args([
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{cv}"),
            ]),
        };
        assert!(c
            .arg("-out")
            .arg(&pem_path)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success());
        let pem = std::fs::read(&pem_path).unwrap();
        let (key, a) = match curve {
            None => (EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS384),
            Some(_) => (EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES384),
        };
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, a).unwrap();
        jwk.common.key_id = Some(format!("py-{alg}"));
        let k = ClientKey {
            key,
            alg: a,
            kid: format!("py-{alg}"),
            jwk: serde_json::to_value(&jwk).unwrap(),
        };
        let id = backend_client(&s, &k, "system/Patient.rs");
        let mut py = Command::new("python3");
        py.arg(interop_script("backend_services.py")).args([
            s.base.as_str(),
            id.as_str(),
            pem_path.to_str().unwrap(),
            k.kid.as_str(),
            alg,
            "system/Patient.rs",
        ]);
        // The server runs on this test's runtime: wait for Python off it.
        let out = tokio::task::spawn_blocking(move || py.output().expect("python3"))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["token_status"], 200, "{got}");
        assert_eq!(got["scope"], "system/Patient.rs");
        assert_eq!(got["read_status"], 200);
        assert_eq!(got["total"], 2);
    }
}

#[tokio::test]
async fn backend_keys_can_be_registered_by_jwks_url() {
    let s = TestServer::start_secured().await;
    let k = client_key(Algorithm::ES384);
    // The client publishes its JWKS on its own (loopback) web server.
    let jwks = json!({"keys": [k.jwk]});
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let id = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "By URL",
            "--type",
            "confidential-asymmetric",
            "--jwks-url",
            &url,
            "--scope",
            "system/*.rs",
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, t) = backend_token(&s, &id, &k, "system/Patient.rs").await;
    assert_eq!(st, 200, "{t}");
    // Plain HTTP is only accepted on the loopback interface.
    let far = cli(
        &s,
        &[
            "client",
            "add",
            "--name",
            "Far",
            "--type",
            "confidential-asymmetric",
            "--jwks-url",
            "http://keys.example.org/jwks.json",
            "--scope",
            "system/*.rs",
        ],
        None,
    )["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, e) = backend_token(&s, &far, &k, "system/Patient.rs").await;
    assert_eq!(st, 401);
    assert!(
        e["error_description"].as_str().unwrap().contains("https"),
        "{e}"
    );
}

#[tokio::test]
async fn the_exchange_endpoint_authenticates_by_signature_not_by_token() {
    let s = TestServer::start_secured().await;
    // No bearer token: the document is judged by its signature (here: none).
    let r = s
        .client
        .post(s.url("exchange/documents"))
        .header("Content-Type", "application/xml")
        .body("<ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>")
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 401);
    assert!(r.status().is_client_error());
    let oo: Value = r.json().await.unwrap();
    assert!(
        first_issue(&oo)["diagnostics"]
            .as_str()
            .unwrap()
            .contains("ignature"),
        "{oo}"
    );
    // $signed-document goes through the same gate as every FHIR read.
    assert_eq!(s.get("Patient/x/$signed-document").await.status(), 401);
}
