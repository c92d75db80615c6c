//! Hostile input: what a caller sends can neither crash, stall nor fool the
//! server. Each test sends one class of input, asserts the 4xx
//! OperationOutcome, and that the server still answers afterwards. They
//! run with authorization on (a real token), on SQLite, and on PostgreSQL
//! when `EHRX_TEST_DATABASE_URL` is set.

mod common;

use common::TestServer;
use serde_json::{json, Value};

/// The response is `status` with an OperationOutcome whose text mentions
/// `says`; then the server still answers a plain read.
async fn refused(s: &TestServer, r: reqwest::Response, status: u16, says: &str) -> Value {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    let oo: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
    assert!(
        text.to_lowercase().contains(&says.to_lowercase()),
        "expected '{says}' in {oo}"
    );
    still_answers(s).await;
    oo
}

async fn still_answers(s: &TestServer) {
    let r = s.get("metadata").await;
    assert_eq!(r.status(), 200, "the server no longer answers");
}

async fn post_xml(s: &TestServer, path: &str, body: String) -> reqwest::Response {
    s.client
        .post(s.url(path))
        .header("Content-Type", "application/fhir+xml")
        .header("Accept", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn patch_json(s: &TestServer, path: &str, ops: Vec<Value>) -> reqwest::Response {
    s.client
        .patch(s.url(path))
        .header("Content-Type", "application/json-patch+json")
        .body(Value::Array(ops).to_string())
        .send()
        .await
        .unwrap()
}

async fn count(s: &TestServer, query: &str) -> u64 {
    let b: Value = s
        .get(&format!("{query}&_total=accurate"))
        .await
        .json()
        .await
        .unwrap();
    b["total"].as_u64().unwrap()
}

#[tokio::test]
async fn xml_nested_thousands_deep_is_refused_before_parsing() {
    let s = TestServer::start().await;
    let depth = 3000;
    let mut xml =
        String::from(r#"<Patient xmlns="http://hl7.org/fhir"><extension url="http://x">"#);
    for _ in 0..depth {
        xml.push_str(r#"<extension url="http://x">"#);
    }
    for _ in 0..depth {
        xml.push_str("</extension>");
    }
    xml.push_str("</extension></Patient>");
    let r = post_xml(&s, "Patient", xml).await;
    refused(&s, r, 400, "deeper than").await;
    assert_eq!(count(&s, "Patient?_count=1").await, 0);
}

#[tokio::test]
async fn a_narrative_nested_deeper_than_the_cap_is_refused_in_json_and_xml() {
    let s = TestServer::start().await;
    let depth = 5000;
    let div = format!(
        r#"<div xmlns="http://www.w3.org/1999/xhtml">{}x{}</div>"#,
        "<div>".repeat(depth),
        "</div>".repeat(depth)
    );
    let body = json!({"resourceType": "Patient", "text": {"status": "generated", "div": div}});
    let r = s.post_json("Patient", &body).await;
    refused(&s, r, 400, "nests deeper").await;
    let xml = format!(
        r#"<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/>{div}</text></Patient>"#
    );
    let r = post_xml(&s, "Patient", xml).await;
    refused(&s, r, 400, "deeper than").await;
    assert_eq!(count(&s, "Patient?_count=1").await, 0);
}

#[tokio::test]
async fn a_stored_narrative_within_the_cap_reads_back_as_xml() {
    let s = TestServer::start().await;
    let depth = 100;
    let div = format!(
        r#"<div xmlns="http://www.w3.org/1999/xhtml">{}x{}</div>"#,
        "<div>".repeat(depth),
        "</div>".repeat(depth)
    );
    let body = json!({"resourceType": "Patient", "text": {"status": "generated", "div": div}});
    let created = s.create(&body).await;
    let id = created["id"].as_str().unwrap();
    let r = s.get(&format!("Patient/{id}?_format=xml")).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<div><div>"));
}

#[tokio::test]
async fn a_json_patch_that_doubles_the_resource_is_refused_and_changes_nothing() {
    let s = TestServer::start().await;
    let created = s
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Patchy", "given": ["A"]}]}))
        .await;
    let id = created["id"].as_str().unwrap();
    // A 2 KB document: forty copies of the name list into itself would
    // make 2^40 names.
    let ops: Vec<Value> = (0..40)
        .map(|_| json!({"op": "copy", "from": "/name", "path": "/name/-"}))
        .collect();
    let r = patch_json(&s, &format!("Patient/{id}"), ops).await;
    refused(&s, r, 400, "would exceed").await;
    let now: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(now["meta"]["versionId"], "1");
}

#[tokio::test]
async fn a_json_patch_with_too_many_operations_is_refused() {
    let s = TestServer::start().await;
    let created = s
        .create(&json!({"resourceType": "Patient", "active": true}))
        .await;
    let id = created["id"].as_str().unwrap();
    let ops: Vec<Value> = (0..5000)
        .map(|_| json!({"op": "test", "path": "/active", "value": true}))
        .collect();
    let r = patch_json(&s, &format!("Patient/{id}"), ops).await;
    refused(&s, r, 400, "operations").await;
}

#[tokio::test]
async fn a_multibyte_character_where_a_prefix_is_expected_is_a_plain_error() {
    let s = TestServer::start().await;
    for q in [
        "Patient?birthdate=%E2%82%AC1",
        "Observation?value-quantity=%E2%82%AC5",
        "Observation?date=%E2%82%AC",
        "RiskAssessment?probability=%E2%82%AC%E2%82%AC",
        "Patient?birthdate=2%E2%82%AC",
    ] {
        let r = s.get(q).await;
        refused(&s, r, 400, "").await;
    }
}

#[tokio::test]
async fn an_over_long_search_value_is_refused() {
    let s = TestServer::start().await;
    let long = "a".repeat(60_000);
    for q in [
        format!("Patient?name:contains={long}"),
        format!("Condition?code:text={long}"),
        format!("Patient?family={long}"),
    ] {
        let r = s.get(&q).await;
        refused(&s, r, 400, "bytes long").await;
    }
}

#[tokio::test]
async fn too_many_or_values_or_repeats_are_refused() {
    let s = TestServer::start().await;
    let ors: Vec<String> = (0..1000).map(|i| (i % 10).to_string()).collect();
    let r = s.get(&format!("Patient?family={}", ors.join(","))).await;
    refused(&s, r, 400, "comma-separated values").await;
    let repeats: Vec<String> = (0..1000).map(|i| format!("family=n{i}")).collect();
    let r = s.get(&format!("Patient?{}", repeats.join("&"))).await;
    refused(&s, r, 400, "repeated more than").await;
    let repeats: Vec<String> = (0..300).map(|i| format!("name:contains=n{i}")).collect();
    let r = s.get(&format!("Patient?{}", repeats.join("&"))).await;
    refused(&s, r, 400, "repeated more than").await;
    let many: Vec<String> = (0..100)
        .map(|i| format!("_include=Patient:link&family{i}=x"))
        .collect();
    let r = s.get(&format!("Patient?{}", many.join("&"))).await;
    assert!(r.status().is_client_error());
    still_answers(&s).await;
}

#[tokio::test]
async fn a_nul_or_control_character_in_a_search_value_is_refused() {
    let s = TestServer::start().await;
    for q in [
        "Patient?family=a%00b",
        "Patient?name:exact=%01",
        "Observation?code=x%00|y",
    ] {
        let r = s.get(q).await;
        refused(&s, r, 400, "control character").await;
    }
}

#[tokio::test]
async fn strings_too_long_for_an_index_row_are_stored_and_found_by_prefix() {
    let s = TestServer::start().await;
    let family = format!("Long{}", "ß".repeat(6000)); // 12 KB, multi-byte
    let created = s
        .create(&json!({"resourceType": "Patient", "name": [{"family": family}]}))
        .await;
    let id = created["id"].as_str().unwrap();
    let b: Value = s
        .get("Patient?family=long&_sort=family")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"][0]["resource"]["id"], id, "{b}");
    // Cut on a character boundary: the index holds the first 1,024 bytes.
    let other = format!("Long{}", "ß".repeat(10));
    let exact = format!("Patient?family:exact={}", urlencode(&other));
    let b: Value = s
        .get(&format!("{exact}&_total=accurate"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 0, "{b}");
    let r: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(
        r["name"][0]["family"].as_str().map(str::len),
        Some(family.len())
    );
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn a_header_of_a_megabyte_gets_431_with_an_operation_outcome() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(s.url("metadata"))
        .header("X-Padding", "p".repeat(1024 * 1024))
        .send()
        .await
        .unwrap();
    refused(&s, r, 431, "exceed").await;
}

#[tokio::test]
async fn a_transaction_reference_to_a_urn_no_entry_carries_is_refused() {
    let s = TestServer::start().await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "resource": {"resourceType": "Patient", "name": [{"family": "Dangling"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:33333333-3333-4333-8333-333333333333"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = s.post_json("", &bundle).await;
    let oo = refused(&s, r, 400, "names no entry").await;
    assert_eq!(
        oo["issue"][0]["expression"][0]
            .as_str()
            .map(|e| e.starts_with("Bundle.entry[1]")),
        Some(true),
        "{oo}"
    );
    assert_eq!(
        count(&s, "Patient?family=Dangling").await,
        0,
        "nothing was written"
    );
}

#[tokio::test]
async fn a_transaction_reference_to_a_missing_resource_is_refused() {
    let s = TestServer::start().await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/does-not-exist"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = s.post_json("", &bundle).await;
    refused(&s, r, 400, "resolves neither").await;
    // To an existing one it is fine.
    let p = s.create(&json!({"resourceType": "Patient"})).await;
    let mut ok = bundle.clone();
    ok["entry"][0]["resource"]["subject"]["reference"] =
        json!(format!("Patient/{}", p["id"].as_str().unwrap()));
    let r = s.post_json("", &ok).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_transaction_repeating_a_full_url_is_refused() {
    let s = TestServer::start().await;
    let entry = json!({"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "resource": {"resourceType": "Patient", "name": [{"family": "Twice"}]},
         "request": {"method": "POST", "url": "Patient"}});
    let bundle =
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry.clone(), entry]});
    let r = s.post_json("", &bundle).await;
    refused(&s, r, 400, "more than one entry").await;
    assert_eq!(count(&s, "Patient?family=Twice").await, 0);
}

#[tokio::test]
async fn a_bundle_over_the_entry_cap_is_refused() {
    let s = TestServer::start_authorized(|c| c.limits.bundle_entries = 5).await;
    let entries: Vec<Value> = (0..6)
        .map(|_| {
            json!({"resource": {"resourceType": "Patient", "name": [{"family": "Capped"}]},
                        "request": {"method": "POST", "url": "Patient"}})
        })
        .collect();
    let r = s
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "batch", "entry": entries}),
        )
        .await;
    refused(&s, r, 400, "at most 5").await;
    assert_eq!(count(&s, "Patient?family=Capped").await, 0);
}

#[tokio::test]
async fn included_resources_over_the_cap_are_refused() {
    let s = TestServer::start_authorized(|c| c.limits.included_resources = 3).await;
    let p = s
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Many"}]}))
        .await;
    let pid = p["id"].as_str().unwrap();
    for i in 0..5 {
        s.create(&json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("o{i}")},
                          "subject": {"reference": format!("Patient/{pid}")}}))
            .await;
    }
    let r = s
        .get("Patient?family=Many&_revinclude=Observation:subject")
        .await;
    refused(&s, r, 400, "more than 3 resources").await;
    let r = s
        .get("Patient?family=Many&_revinclude=Observation:subject&_count=1")
        .await;
    assert_eq!(
        r.status(),
        400,
        "five observations of one patient still exceed 3"
    );
    let s2 = TestServer::start_authorized(|c| c.limits.included_resources = 5).await;
    let p = s2
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Many"}]}))
        .await;
    let pid = p["id"].as_str().unwrap();
    for i in 0..5 {
        s2.create(&json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("o{i}")},
                           "subject": {"reference": format!("Patient/{pid}")}}))
            .await;
    }
    let b: Value = s2
        .get("Patient?family=Many&_revinclude=Observation:subject")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().map(Vec::len), Some(6), "{b}");
}

#[tokio::test]
async fn sign_in_attempts_are_throttled_per_account() {
    let s = TestServer::start().await;
    let attempt = |user: &'static str| {
        let (c, url) = (reqwest::Client::new(), s.url("auth/login"));
        async move {
            c.post(url)
                .form(&[("username", user), ("password", "wrong guess")])
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..10 {
        assert_eq!(attempt("victim").await.status(), 401);
    }
    let r = attempt("victim").await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Too many sign-in attempts"));
    assert_eq!(
        attempt("someone-else").await.status(),
        401,
        "other accounts are not slowed"
    );
}

#[tokio::test]
async fn token_requests_are_throttled_per_client() {
    let s = TestServer::start_authorized(|c| c.token_requests_per_minute = 3).await;
    let ask = |client: &'static str| {
        let (c, url) = (reqwest::Client::new(), s.url("auth/token"));
        async move {
            c.post(url)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", "guess"),
                    ("client_id", client),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_ne!(ask("guesser").await.status(), 429);
    }
    let r = ask("guesser").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "temporarily_unavailable");
    assert_ne!(ask("another").await.status(), 429);
}
