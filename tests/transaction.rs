//! batch and transaction Bundles.

mod common;

use common::{first_issue, TestServer};
use serde_json::{json, Value};

async fn post_bundle(s: &TestServer, b: &Value) -> (u16, Value) {
    let r = s.post_json("", b).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn transaction_rewrites_references_and_reports_each_entry() {
    let s = TestServer::start().await;
    s.create(&json!({"resourceType": "Organization", "identifier": [{"system": "urn:org", "value": "acme"}], "name": "Acme"})).await;
    let existing = s.create(&json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "old"}]})).await;
    let old_id = existing["id"].as_str().unwrap();
    let b = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/fixed-id"}},
            {"fullUrl": "urn:uuid:8a2c2f2e-0000-4000-8000-000000000002",
             "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "bp"},
                          "subject": {"reference": "urn:uuid:8a2c2f2e-0000-4000-8000-000000000001"},
                          "performer": [{"reference": "Organization?identifier=urn:org|acme"}],
                          "extension": [{"url": "http://example.org/x", "valueReference": {"reference": "urn:uuid:8a2c2f2e-0000-4000-8000-000000000001"}}]},
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "urn:uuid:8a2c2f2e-0000-4000-8000-000000000001",
             "resource": {"resourceType": "Patient", "name": [{"family": "New"}],
                          "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">see <a href=\"urn:uuid:8a2c2f2e-0000-4000-8000-000000000002\">obs</a></div>"}},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": "fixed-id", "name": [{"family": "Put"}]},
             "request": {"method": "PUT", "url": "Patient/fixed-id"}},
            {"request": {"method": "DELETE", "url": format!("Patient/{old_id}")}}
        ]
    });
    let (status, resp) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(e.len(), 5);
    // Reads run last (DELETE, POST, PUT/PATCH, GET), so the GET sees the PUT of entry 3.
    assert_eq!(e[0]["response"]["status"], "200 OK");
    assert_eq!(e[0]["resource"]["name"][0]["family"], "Put");
    assert_eq!(e[1]["response"]["status"], "201 Created");
    assert_eq!(e[2]["response"]["status"], "201 Created");
    assert_eq!(e[3]["response"]["status"], "201 Created");
    assert_eq!(e[4]["response"]["status"], "204 No Content");
    for written in &e[1..=3] {
        assert!(written["response"]["location"]
            .as_str()
            .unwrap()
            .contains("/_history/1"));
        assert_eq!(written["response"]["etag"], "W/\"1\"");
        assert!(written["response"]["lastModified"].is_string());
    }
    let obs_loc = e[1]["response"]["location"].as_str().unwrap();
    let pat_loc = e[2]["response"]["location"].as_str().unwrap();
    let pat_ref = pat_loc.split("/_history").next().unwrap();
    let obs_ref = obs_loc.split("/_history").next().unwrap();
    let obs: Value = s.get(obs_ref).await.json().await.unwrap();
    assert_eq!(obs["subject"]["reference"], pat_ref);
    assert_eq!(obs["extension"][0]["valueReference"]["reference"], pat_ref);
    assert!(obs["performer"][0]["reference"]
        .as_str()
        .unwrap()
        .starts_with("Organization/"));
    let pat: Value = s.get(pat_ref).await.json().await.unwrap();
    assert!(pat["text"]["div"]
        .as_str()
        .unwrap()
        .contains(&format!("href=\"{obs_ref}\"")));
    assert_eq!(s.get("Patient/fixed-id").await.status(), 200);
    assert_eq!(s.get(&format!("Patient/{old_id}")).await.status(), 410);
    s.stop().await;
}

#[tokio::test]
async fn reads_in_a_transaction_see_its_writes() {
    let s = TestServer::start().await;
    let b = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/r1"}},
            {"resource": {"resourceType": "Patient", "id": "r1", "gender": "male"}, "request": {"method": "PUT", "url": "Patient/r1"}},
            {"request": {"method": "GET", "url": "Patient?_id=r1"}},
            {"request": {"method": "GET", "url": "Patient?gender=male"}}
        ]
    });
    let (status, resp) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(resp["entry"][0]["resource"]["gender"], "male");
    assert_eq!(resp["entry"][2]["resource"]["total"], 1);
    // Found through the search index the transaction wrote.
    assert_eq!(resp["entry"][3]["resource"]["total"], 1);
    s.stop().await;
}

#[tokio::test]
async fn one_bad_entry_leaves_the_database_exactly_as_it_was() {
    let s = TestServer::start().await;
    let keep = s
        .create(&json!({"resourceType": "Patient", "id": "x", "gender": "female"}))
        .await;
    let keep_id = keep["id"].as_str().unwrap();
    let other = s
        .create(&json!({"resourceType": "Patient", "gender": "other"}))
        .await;
    let other_id = other["id"].as_str().unwrap();
    let history_before = s.history_len().await;
    let cases = vec![
        // structurally invalid resource in entry 2
        (
            json!({"resourceType": "Patient", "birthDate": "not-a-date"}),
            400,
            "Bundle.entry[2].resource.birthDate",
        ),
        // update with a stale If-Match in entry 2
        (
            json!({"resourceType": "Patient", "id": other_id, "gender": "male"}),
            412,
            "Bundle.entry[2]",
        ),
    ];
    for (i, (bad, want_status, want_expr)) in cases.into_iter().enumerate() {
        let mut bad_entry =
            json!({"resource": bad, "request": {"method": "POST", "url": "Patient"}});
        if i == 1 {
            bad_entry["request"] = json!({"method": "PUT", "url": format!("Patient/{other_id}"), "ifMatch": "W/\"9\""});
        }
        let b = json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}},
                {"request": {"method": "DELETE", "url": format!("Patient/{keep_id}")}},
                bad_entry,
                {"resource": {"resourceType": "Organization", "id": "o1", "name": "O"}, "request": {"method": "PUT", "url": "Organization/o1"}}
            ]
        });
        let (status, oo) = post_bundle(&s, &b).await;
        assert_eq!(status, want_status, "{oo}");
        let issue = first_issue(&oo);
        assert_eq!(issue["expression"][0].as_str().unwrap(), want_expr, "{oo}");
        // Nothing changed: same history length, the deleted patient still there, nothing created.
        assert_eq!(s.history_len().await, history_before);
        assert_eq!(s.get(&format!("Patient/{keep_id}")).await.status(), 200);
        assert_eq!(s.count("Patient").await, 2);
        assert_eq!(s.get("Organization/o1").await.status(), 404);
    }
    s.stop().await;
}

#[tokio::test]
async fn failing_conditional_reference_names_the_entry() {
    let s = TestServer::start().await;
    let b = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "Patient?identifier=urn:none|nobody"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let (status, oo) = post_bundle(&s, &b).await;
    assert_eq!(status, 412);
    let issue = first_issue(&oo);
    assert_eq!(issue["expression"][0], "Bundle.entry[1]");
    assert!(issue["diagnostics"]
        .as_str()
        .unwrap()
        .contains("Patient?identifier=urn:none|nobody"));
    assert_eq!(s.count("Patient").await, 0);
    s.stop().await;
}

#[tokio::test]
async fn transaction_conditional_create_and_update() {
    let s = TestServer::start().await;
    let b = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
             "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "c1"}]},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|c1"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "urn:uuid:22222222-2222-4222-8222-222222222222"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Organization", "identifier": [{"system": "urn:org", "value": "u1"}], "name": "U"},
             "request": {"method": "PUT", "url": "Organization?identifier=urn:org|u1"}}
        ]
    });
    let (status, first) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(first["entry"][2]["response"]["status"], "201 Created");
    // Again: the conditional create matches, the conditional update updates (unchanged).
    let (status, second) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(
        second["entry"][0]["response"]["location"],
        first["entry"][0]["response"]["location"]
    );
    assert_eq!(second["entry"][2]["response"]["status"], "200 OK");
    assert_eq!(s.count("Patient").await, 1);
    assert_eq!(s.count("Organization").await, 1);
    assert_eq!(s.count("Observation").await, 2);
    let obs: Value = s.get("Observation?_count=10").await.json().await.unwrap();
    let pat = first["entry"][0]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    for e in obs["entry"].as_array().unwrap() {
        assert_eq!(e["resource"]["subject"]["reference"], pat.as_str());
    }
    s.stop().await;
}

#[tokio::test]
async fn transaction_patch_entry() {
    let s = TestServer::start().await;
    s.put_json(
        "Patient/p1",
        &json!({"resourceType": "Patient", "id": "p1", "gender": "male"}),
    )
    .await;
    let patch = base64_encode(br#"[{"op":"replace","path":"/gender","value":"female"}]"#);
    let b = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch},
                   "request": {"method": "PATCH", "url": "Patient/p1"}}]
    });
    let (status, resp) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["entry"][0]["response"]["status"], "200 OK");
    let p: Value = s.get("Patient/p1").await.json().await.unwrap();
    assert_eq!(p["gender"], "female");
    s.stop().await;
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn batch_entries_succeed_or_fail_alone() {
    let s = TestServer::start().await;
    let b = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"resource": {"resourceType": "Patient", "id": "b2"}, "request": {"method": "PUT", "url": "Patient/other"}},
            {"request": {"method": "GET", "url": "Unicorn/1"}},
            {"resource": {"resourceType": "Patient", "id": "b3"}, "request": {"method": "PUT", "url": "Patient/b3"}}
        ]
    });
    let (status, resp) = post_bundle(&s, &b).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["type"], "batch-response");
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(e[1]["response"]["status"], "404 Not Found");
    assert_eq!(
        e[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(e[2]["response"]["status"], "400 Bad Request");
    assert_eq!(e[3]["response"]["status"], "404 Not Found");
    assert_eq!(e[4]["response"]["status"], "201 Created");
    assert_eq!(s.count("Patient").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn bundle_errors() {
    let s = TestServer::start().await;
    // Not a Bundle
    let (status, oo) = post_bundle(&s, &json!({"resourceType": "Patient"})).await;
    assert_eq!(status, 400);
    first_issue(&oo);
    // A Bundle type that is not processable
    let (status, oo) =
        post_bundle(&s, &json!({"resourceType": "Bundle", "type": "collection"})).await;
    assert_eq!(status, 400);
    assert_eq!(first_issue(&oo)["expression"][0], "Bundle.type");
    // The same resource twice
    let (status, oo) = post_bundle(&s, &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "d"}, "request": {"method": "PUT", "url": "Patient/d"}},
        {"request": {"method": "DELETE", "url": "Patient/d"}}
    ]})).await;
    assert_eq!(status, 400);
    assert_eq!(first_issue(&oo)["expression"][0], "Bundle.entry[1]");
    // Missing request
    let (status, oo) = post_bundle(
        &s,
        &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient"}}
        ]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(first_issue(&oo)["expression"][0]
        .as_str()
        .unwrap()
        .starts_with("Bundle.entry[0]"));
    // XML transaction works too
    let xml = r#"<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/><entry><resource><Patient><gender value="other"/></Patient></resource><request><method value="POST"/><url value="Patient"/></request></entry></Bundle>"#;
    let r = s
        .client
        .post(s.url(""))
        .header("Content-Type", "application/fhir+xml")
        .header("Accept", "application/fhir+xml")
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("<status value=\"201 Created\"/>"));
    s.stop().await;
}
