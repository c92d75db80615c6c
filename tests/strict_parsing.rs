//! Strict parsing: resources of the wrong JSON shape, with repeated keys,
//! codes outside required value sets, oversized strings or forbidden control
//! characters are refused with an OperationOutcome naming the element —
//! in JSON and XML bodies, inside transactions and as the result of a patch —
//! and nothing is stored.

mod common;

use common::{first_issue, TestServer};
use serde_json::{json, Value};

/// Sends `body` as is (not re-serialised: repeated keys survive).
async fn post_raw(
    s: &TestServer,
    path: &str,
    content_type: &str,
    body: String,
) -> reqwest::Response {
    s.client
        .post(s.url(path))
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Checks a refusal: its status, the element its OperationOutcome names, and
/// that the server still answers.
async fn refused(s: &TestServer, r: reqwest::Response, status: u16, expression: &str) -> Value {
    assert_eq!(r.status(), status, "{:?}", r.text().await);
    let outcome: Value = r.json().await.unwrap();
    let issue = first_issue(&outcome);
    assert_eq!(issue["severity"], "error", "{outcome}");
    assert_eq!(issue["expression"][0], expression, "{outcome}");
    assert_eq!(
        s.get("metadata").await.status(),
        200,
        "the server still answers"
    );
    outcome
}

async fn nothing_stored(s: &TestServer, rtype: &str) {
    assert_eq!(s.count(rtype).await, 0, "no {rtype} was stored");
}

#[tokio::test]
async fn a_list_where_one_value_belongs_is_refused() {
    let s = TestServer::start().await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "gender": ["male"]}),
        )
        .await;
    refused(&s, r, 400, "Patient.gender").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn one_value_where_a_list_belongs_is_refused() {
    let s = TestServer::start().await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "name": {"family": "x"}}),
        )
        .await;
    refused(&s, r, 400, "Patient.name").await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "name": [{"given": "Ann"}]}),
        )
        .await;
    refused(&s, r, 400, "Patient.name[0].given").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn null_is_refused_but_extension_alignment_is_kept() {
    let s = TestServer::start().await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "name": [null]}),
        )
        .await;
    refused(&s, r, 400, "Patient.name[0]").await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "active": null}),
        )
        .await;
    refused(&s, r, 400, "Patient.active").await;
    nothing_stored(&s, "Patient").await;
    // A null in a primitive array is a placeholder when `_given` has the
    // extensions at that index (and the other way round).
    let ext = json!({"extension": [{"url": "http://example.org/x", "valueString": "y"}]});
    let created = s
        .create(&json!({"resourceType": "Patient", "name": [{
            "given": ["Ann", null],
            "_given": [null, ext]
        }]}))
        .await;
    assert_eq!(created["name"][0]["given"][0], "Ann");
    assert_eq!(created["name"][0]["_given"][1], ext);
    // Both null at one index is not a value.
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "name": [{"given": ["Ann", null], "_given": [null, null]}]}),
        )
        .await;
    refused(&s, r, 400, "Patient.name[0].given[1]").await;
    assert_eq!(s.count("Patient").await, 1);
    s.stop().await;
}

#[tokio::test]
async fn an_empty_array_is_refused_and_the_server_keeps_answering() {
    let s = TestServer::start().await;
    let r = s
        .post_json("Patient", &json!({"resourceType": "Patient", "name": []}))
        .await;
    refused(&s, r, 400, "Patient.name").await;
    let r = s
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": []}),
        )
        .await;
    refused(&s, r, 400, "Bundle.entry").await;
    let r = s
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "batch", "entry": []}),
        )
        .await;
    refused(&s, r, 400, "Bundle.entry").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn a_transaction_without_entries_answers_with_an_empty_response() {
    let s = TestServer::start().await;
    let r = s
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "transaction-response");
    assert!(b.get("entry").is_none(), "{b}");
    s.stop().await;
}

#[tokio::test]
async fn a_repeated_key_is_refused() {
    let s = TestServer::start().await;
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+json",
        r#"{"resourceType":"Patient","gender":"male","gender":"female"}"#.into(),
    )
    .await;
    let outcome = refused(&s, r, 400, "Patient.gender").await;
    let text = first_issue(&outcome)["diagnostics"].as_str().unwrap();
    assert!(text.contains("duplicate key"), "{text}");
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+json",
        r#"{"resourceType":"Patient","name":[{"family":"a"},{"family":"b","family":"c"}]}"#.into(),
    )
    .await;
    refused(&s, r, 400, "Patient.name[1].family").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn a_code_outside_a_required_value_set_is_refused() {
    let s = TestServer::start().await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "gender": "banana"}),
        )
        .await;
    refused(&s, r, 400, "Patient.gender").await;
    let r = s
        .post_json(
            "Observation",
            &json!({"resourceType": "Observation", "status": "not-a-status", "code": {"text": "x"}}),
        )
        .await;
    refused(&s, r, 400, "Observation.status").await;
    let r = s
        .post_json("", &json!({"resourceType": "Bundle", "type": "evil"}))
        .await;
    refused(&s, r, 400, "Bundle.type").await;
    // In a datatype and in a contained resource.
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "telecom": [{"system": "pigeon", "value": "x"}]}),
        )
        .await;
    refused(&s, r, 400, "Patient.telecom[0].system").await;
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient",
                    "contained": [{"resourceType": "Practitioner", "id": "p", "gender": "banana"}],
                    "generalPractitioner": [{"reference": "#p"}]}),
        )
        .await;
    refused(&s, r, 400, "Patient.contained[0].gender").await;
    nothing_stored(&s, "Patient").await;
    nothing_stored(&s, "Observation").await;
    s.stop().await;
}

#[tokio::test]
async fn a_string_over_one_megabyte_is_refused() {
    let s = TestServer::start().await;
    let long = "a".repeat(1024 * 1024 + 1);
    let r = s
        .post_json(
            "Patient",
            &json!({"resourceType": "Patient", "name": [{"family": long}]}),
        )
        .await;
    refused(&s, r, 400, "Patient.name[0].family").await;
    nothing_stored(&s, "Patient").await;
    // At the limit exactly, it is a string like any other (in an element no
    // search parameter indexes: PostgreSQL's B-tree indexes take at most
    // about 2.7 kB per entry).
    let at_limit = "a".repeat(1024 * 1024);
    s.create(&json!({"resourceType": "Patient", "extension": [
        {"url": "http://example.org/note", "valueString": at_limit}
    ]}))
    .await;
    s.stop().await;
}

#[tokio::test]
async fn control_characters_are_refused() {
    let s = TestServer::start().await;
    for c in ['\u{0}', '\u{8}', '\u{b}', '\u{c}', '\u{1f}'] {
        let r = s
            .post_json(
                "Patient",
                &json!({"resourceType": "Patient", "name": [{"family": format!("a{c}b")}]}),
            )
            .await;
        refused(&s, r, 400, "Patient.name[0].family").await;
    }
    nothing_stored(&s, "Patient").await;
    // Tab, line feed and carriage return are text.
    s.create(&json!({"resourceType": "Patient", "name": [{"text": "a\tb\r\nc"}]}))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn xml_bodies_are_checked_alike() {
    let s = TestServer::start().await;
    let xml = |inner: &str| format!(r#"<Patient xmlns="http://hl7.org/fhir">{inner}</Patient>"#);
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+xml",
        xml(r#"<gender value="banana"/>"#),
    )
    .await;
    refused(&s, r, 400, "Patient.gender").await;
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+xml",
        xml(r#"<gender value="male"/><gender value="female"/>"#),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+xml",
        xml(r#"<name><family value="a&#x1;b"/></name>"#),
    )
    .await;
    assert_eq!(r.status(), 400);
    let long = "a".repeat(1024 * 1024 + 1);
    let r = post_raw(
        &s,
        "Patient",
        "application/fhir+xml",
        xml(&format!(r#"<name><family value="{long}"/></name>"#)),
    )
    .await;
    refused(&s, r, 400, "Patient.name[0].family").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn an_invalid_resource_inside_a_transaction_is_refused() {
    let s = TestServer::start().await;
    let bundle = |bad: Value| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
             "resource": {"resourceType": "Patient", "gender": "female"},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": bad, "request": {"method": "POST", "url": "Patient"}}
        ]})
    };
    let r = s
        .post_json(
            "",
            &bundle(json!({"resourceType": "Patient", "gender": "banana"})),
        )
        .await;
    refused(&s, r, 400, "Bundle.entry[1].resource.gender").await;
    let r = s
        .post_json("", &bundle(json!({"resourceType": "Patient", "name": []})))
        .await;
    refused(&s, r, 400, "Bundle.entry[1].resource.name").await;
    let r = s
        .post_json(
            "",
            &bundle(json!({"resourceType": "Patient", "name": [{"family": "a\u{0}b"}]})),
        )
        .await;
    refused(&s, r, 400, "Bundle.entry[1].resource.name[0].family").await;
    let r = post_raw(
        &s,
        "",
        "application/fhir+json",
        r#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"resource":{"resourceType":"Patient","gender":"male","gender":"female"},
             "request":{"method":"POST","url":"Patient"}}]}"#
            .into(),
    )
    .await;
    refused(&s, r, 400, "Bundle.entry[0].resource.gender").await;
    nothing_stored(&s, "Patient").await;
    s.stop().await;
}

#[tokio::test]
async fn a_patch_whose_result_would_be_invalid_is_refused() {
    let s = TestServer::start().await;
    let created = s
        .create(
            &json!({"resourceType": "Patient", "gender": "female", "name": [{"family": "Doe"}]}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let patch = |body: &'static str| {
        s.client
            .patch(s.url(&format!("Patient/{id}")))
            .header("Content-Type", "application/json-patch+json")
            .body(body)
            .send()
    };
    let cases = [
        (
            r#"[{"op":"replace","path":"/gender","value":"banana"}]"#,
            "Patient.gender",
        ),
        (
            r#"[{"op":"replace","path":"/gender","value":["male"]}]"#,
            "Patient.gender",
        ),
        (
            r#"[{"op":"replace","path":"/name","value":[]}]"#,
            "Patient.name",
        ),
        (
            r#"[{"op":"add","path":"/name/-","value":null}]"#,
            "Patient.name[1]",
        ),
        (
            r#"[{"op":"replace","path":"/name/0/family","value":"a\u0000b"}]"#,
            "Patient.name[0].family",
        ),
    ];
    for (body, expression) in cases {
        let r = patch(body).await.unwrap();
        refused(&s, r, 422, expression).await;
    }
    // A repeated key in the patch document itself is malformed.
    let r = patch(r#"[{"op":"replace","op":"add","path":"/active","value":true}]"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let now = s.get_json(&format!("Patient/{id}")).await;
    assert_eq!(now["meta"]["versionId"], "1", "nothing was stored");
    assert_eq!(now["gender"], "female");
    s.stop().await;
}
