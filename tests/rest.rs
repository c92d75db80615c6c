//! Every REST interaction of FHIR R4 http.html, and its error paths, over HTTP.

mod common;

use common::{first_issue, next_link, TestServer};
use serde_json::{json, Value};

fn patient(family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": family}],
        "name": [{"family": family, "given": ["Test"]}],
        "gender": "female",
        "birthDate": "1970-01-01"
    })
}

#[tokio::test]
async fn metadata_is_a_generated_capability_statement() {
    let s = TestServer::start().await;
    let r = s.get("metadata").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/fhir+json"));
    let cs: Value = r.json().await.unwrap();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    assert_eq!(resources.len(), 146, "every R4 resource type");
    let patient = resources.iter().find(|r| r["type"] == "Patient").unwrap();
    let codes: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    for c in [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ] {
        assert!(codes.contains(&c), "{c}");
    }
    let params: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(params.contains(&"identifier"));
    // XML too.
    let r = s.get("metadata?_format=xml").await;
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/fhir+xml"));
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("<CapabilityStatement xmlns=\"http://hl7.org/fhir\">"));
    s.stop().await;
}

#[tokio::test]
async fn create_read_vread_update_delete() {
    let s = TestServer::start().await;
    let r = s.post_json("Patient", &patient("Alpha")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(location, s.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(created["meta"]["versionId"], "1");

    // read
    let r = s.get(&format!("Patient/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    let read: Value = r.json().await.unwrap();
    assert_eq!(read, created);

    // update with a new name → version 2
    let mut changed = read.clone();
    changed["name"][0]["family"] = json!("Beta");
    let r = s.put_json(&format!("Patient/{id}"), &changed).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["meta"]["versionId"], "2");

    // vread both versions
    let v1: Value = s
        .get(&format!("Patient/{id}/_history/1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v1["name"][0]["family"], "Alpha");
    let v2: Value = s
        .get(&format!("Patient/{id}/_history/2"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v2["name"][0]["family"], "Beta");
    assert_eq!(
        s.get(&format!("Patient/{id}/_history/9")).await.status(),
        404
    );

    // delete → 204, then read → 410, vread of the tombstone → 410, old version still readable
    let r = s
        .client
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s.get(&format!("Patient/{id}")).await;
    assert_eq!(r.status(), 410);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["code"], "deleted");
    assert_eq!(
        s.get(&format!("Patient/{id}/_history/3")).await.status(),
        410
    );
    assert_eq!(
        s.get(&format!("Patient/{id}/_history/2")).await.status(),
        200
    );
    // deleting again changes nothing and succeeds
    let r = s
        .client
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // update after delete re-creates (201) as version 4
    let r = s.put_json(&format!("Patient/{id}"), &changed).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"4\"");
    s.stop().await;
}

#[tokio::test]
async fn read_unknown_is_404_with_outcome() {
    let s = TestServer::start().await;
    let r = s.get("Patient/does-not-exist").await;
    assert_eq!(r.status(), 404);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["code"], "not-found");
    s.stop().await;
}

#[tokio::test]
async fn unknown_resource_type_is_404() {
    let s = TestServer::start().await;
    for path in ["Patientt/1", "Unicorn", "Unicorn/1/_history"] {
        let r = s.get(path).await;
        assert_eq!(r.status(), 404, "{path}");
        let oo: Value = r.json().await.unwrap();
        assert!(
            first_issue(&oo)["diagnostics"]
                .as_str()
                .unwrap()
                .contains("Unicorn")
                || path.starts_with("Patientt")
        );
    }
    let r = s
        .post_json("Unicorn", &json!({"resourceType": "Unicorn"}))
        .await;
    assert_eq!(r.status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn update_as_create_and_id_mismatch() {
    let s = TestServer::start().await;
    let mut p = patient("Gamma");
    p["id"] = json!("gamma-1");
    let r = s.put_json("Patient/gamma-1", &p).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["location"],
        s.url("Patient/gamma-1/_history/1").as_str()
    );
    // Same content again: no new version.
    let r = s.put_json("Patient/gamma-1", &p).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    // id in body differs from URL
    let r = s.put_json("Patient/other", &p).await;
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["expression"][0], "Patient.id");
    // no id in body
    let r = s.put_json("Patient/gamma-1", &patient("Gamma")).await;
    assert_eq!(r.status(), 400);
    // wrong type in body
    let mut obs = json!({"resourceType": "Observation", "id": "gamma-1", "status": "final", "code": {"text": "x"}});
    let r = s.put_json("Patient/gamma-1", &obs).await;
    assert_eq!(r.status(), 400);
    obs["id"] = json!("bad id!");
    let r = s.put_json("Observation/bad%20id!", &obs).await;
    assert_eq!(r.status(), 400);
    assert_eq!(s.count("Observation").await, 0);
    s.stop().await;
}

#[tokio::test]
async fn if_match_optimistic_locking() {
    let s = TestServer::start().await;
    let created = s.create(&patient("Delta")).await;
    let id = created["id"].as_str().unwrap();
    let mut p = created.clone();
    p["gender"] = json!("male");
    // stale version → 412
    let r = s
        .client
        .put(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/fhir+json")
        .header("If-Match", "W/\"7\"")
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["severity"], "error");
    // current version → 200
    let r = s
        .client
        .put(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/fhir+json")
        .header("If-Match", "W/\"1\"")
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // stale If-Match on delete and patch → 412, nothing changes
    let r = s
        .client
        .delete(s.url(&format!("Patient/{id}")))
        .header("If-Match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let r = s
        .client
        .patch(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/json-patch+json")
        .header("If-Match", "W/\"1\"")
        .body(r#"[{"op":"replace","path":"/gender","value":"other"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let now: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(now["meta"]["versionId"], "2");
    assert_eq!(now["gender"], "male");
    s.stop().await;
}

#[tokio::test]
async fn prefer_return() {
    let s = TestServer::start().await;
    let r = s
        .client
        .post(s.url("Patient"))
        .header("Content-Type", "application/fhir+json")
        .header("Prefer", "return=minimal")
        .body(patient("Eps").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("location"));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = s
        .client
        .post(s.url("Patient"))
        .header("Content-Type", "application/fhir+json")
        .header("Prefer", "return=OperationOutcome")
        .body(patient("Eps").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["severity"], "information");
    let r = s
        .client
        .post(s.url("Patient"))
        .header("Content-Type", "application/fhir+json")
        .header("Prefer", "return=representation")
        .body(patient("Eps").to_string())
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "Patient");
    s.stop().await;
}

#[tokio::test]
async fn conditional_create() {
    let s = TestServer::start().await;
    let post = |q: &'static str| {
        s.client
            .post(s.url("Patient"))
            .header("Content-Type", "application/fhir+json")
            .header("If-None-Exist", q)
            .body(patient("Zeta").to_string())
            .send()
    };
    let r = post("identifier=urn:test:mrn|Zeta").await.unwrap();
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    let r = post("identifier=urn:test:mrn|Zeta").await.unwrap();
    assert_eq!(r.status(), 200, "existing match returned");
    let second: Value = r.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(s.count("Patient").await, 1);
    // Two matches → 412
    s.create(&patient("Zeta")).await;
    let r = post("identifier=urn:test:mrn|Zeta").await.unwrap();
    assert_eq!(r.status(), 412);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["code"], "multiple-matches");
    // Unknown criteria are refused, never ignored.
    let r = post("nonsense=1").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.count("Patient").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn conditional_update_and_delete() {
    let s = TestServer::start().await;
    // No match → create
    let r = s
        .put_json("Patient?identifier=urn:test:mrn|Eta", &patient("Eta"))
        .await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    // One match → update
    let mut p = patient("Eta");
    p["gender"] = json!("male");
    let r = s.put_json("Patient?identifier=urn:test:mrn|Eta", &p).await;
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["id"], created["id"]);
    assert_eq!(updated["meta"]["versionId"], "2");
    // Several matches → 412
    s.create(&patient("Eta")).await;
    let r = s.put_json("Patient?identifier=urn:test:mrn|Eta", &p).await;
    assert_eq!(r.status(), 412);
    let r = s
        .client
        .delete(s.url("Patient?identifier=urn:test:mrn|Eta"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(s.count("Patient").await, 2);
    // One match → deleted
    s.create(&patient("Theta")).await;
    let r = s
        .client
        .delete(s.url("Patient?identifier=urn:test:mrn|Theta"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.count("Patient").await, 2);
    // No match → nothing to do
    let r = s
        .client
        .delete(s.url("Patient?identifier=urn:test:mrn|Nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // No criteria at all → refused
    let r = s.client.delete(s.url("Patient")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    s.stop().await;
}

#[tokio::test]
async fn json_patch() {
    let s = TestServer::start().await;
    let created = s.create(&patient("Iota")).await;
    let id = created["id"].as_str().unwrap();
    let send = |body: &'static str, ct: &'static str| {
        s.client
            .patch(s.url(&format!("Patient/{id}")))
            .header("Content-Type", ct)
            .body(body)
            .send()
    };
    let r = send(
        r#"[{"op":"replace","path":"/name/0/family","value":"Kappa"},{"op":"add","path":"/active","value":true}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["name"][0]["family"], "Kappa");
    assert_eq!(p["active"], true);
    assert_eq!(p["meta"]["versionId"], "2");
    // A patch that makes the resource invalid → 422, nothing stored
    let r = send(
        r#"[{"op":"add","path":"/colour","value":"red"}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    // A failing test op → 422
    let r = send(
        r#"[{"op":"test","path":"/gender","value":"male"}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    // Wrong media type → 415
    let r = send(r#"[]"#, "application/fhir+json").await.unwrap();
    assert_eq!(r.status(), 415);
    // Malformed patch → 400
    let r = send(r#"[{"op":"#, "application/json-patch+json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let now: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(now["meta"]["versionId"], "2");
    // Conditional patch
    let r = s
        .client
        .patch(s.url("Patient?identifier=urn:test:mrn|Iota"))
        .header("Content-Type", "application/json-patch+json")
        .body(r#"[{"op":"replace","path":"/gender","value":"other"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Patching what does not exist → 404
    let r = s
        .client
        .patch(s.url("Patient/nope"))
        .header("Content-Type", "application/json-patch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn history_at_every_level_with_paging() {
    let s = TestServer::start().await;
    let a = s.create(&patient("Lambda")).await;
    let id = a["id"].as_str().unwrap();
    for g in ["male", "other", "unknown"] {
        let mut p = a.clone();
        p["gender"] = json!(g);
        assert_eq!(s.put_json(&format!("Patient/{id}"), &p).await.status(), 200);
    }
    s.client
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await
        .unwrap();
    s.create(&json!({"resourceType": "Organization", "name": "Org"}))
        .await;

    // instance history: 5 versions, newest first, tombstone first
    let h: Value = s
        .get(&format!("Patient/{id}/_history"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["type"], "history");
    let entries = h["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert!(entries[0].get("resource").is_none());
    assert_eq!(entries[1]["resource"]["meta"]["versionId"], "4");
    assert_eq!(entries[4]["request"]["method"], "POST");

    // paging with _count=2 walks all 5 without duplicates
    let mut url = s.url(&format!("Patient/{id}/_history?_count=2"));
    let mut seen = Vec::new();
    loop {
        let page = s.get_json(&url).await;
        for e in page["entry"].as_array().unwrap() {
            seen.push(e["response"]["etag"].as_str().unwrap().to_string());
        }
        match next_link(&page) {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec!["W/\"5\"", "W/\"4\"", "W/\"3\"", "W/\"2\"", "W/\"1\""]
    );

    // type and system history
    let h: Value = s.get("Patient/_history").await.json().await.unwrap();
    assert_eq!(h["entry"].as_array().unwrap().len(), 5);
    let h: Value = s.get("_history").await.json().await.unwrap();
    assert_eq!(h["entry"].as_array().unwrap().len(), 6);

    // _since in the future → nothing; in the past → everything
    let h: Value = s
        .get("_history?_since=2999-01-01T00:00:00Z")
        .await
        .json()
        .await
        .unwrap();
    assert!(h.get("entry").is_none());
    let h: Value = s
        .get("_history?_since=2000-01-01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["entry"].as_array().unwrap().len(), 6);
    // bad parameters
    assert_eq!(s.get("_history?_since=yesterday").await.status(), 400);
    assert_eq!(s.get("_history?_count=-1").await.status(), 400);
    assert_eq!(s.get("Patient/nobody/_history").await.status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn history_paging_is_stable_while_others_write() {
    let s = TestServer::start().await;
    for i in 0..6 {
        s.create(&patient(&format!("P{i}"))).await;
    }
    let page1: Value = s.get("_history?_count=3").await.json().await.unwrap();
    // Writes between pages must not shift or duplicate what the next page shows.
    for i in 0..4 {
        s.create(&patient(&format!("Q{i}"))).await;
    }
    let page2: Value = s
        .client
        .get(next_link(&page1).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["resource"]["name"][0]["family"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(ids(&page1), vec!["P5", "P4", "P3"]);
    assert_eq!(ids(&page2), vec!["P2", "P1", "P0"]);
    assert!(next_link(&page2).is_none());
    s.stop().await;
}

#[tokio::test]
async fn xml_in_and_out() {
    let s = TestServer::start().await;
    let xml = r#"<Patient xmlns="http://hl7.org/fhir"><name><family value="Xml"/></name><birthDate value="1980-05"/></Patient>"#;
    let r = s
        .client
        .post(s.url("Patient"))
        .header("Content-Type", "application/fhir+xml")
        .header("Accept", "application/fhir+xml")
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/fhir+xml"));
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body = r.text().await.unwrap();
    assert!(body.contains(r#"<family value="Xml"/>"#), "{body}");
    let id = location.split('/').nth_back(2).unwrap();
    let json: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(json["birthDate"], "1980-05");
    // _format variants
    for f in ["xml", "application/xml", "application/fhir+xml", "text/xml"] {
        let r = s
            .client
            .get(s.url(&format!("Patient/{id}")))
            .query(&[("_format", f)])
            .send()
            .await
            .unwrap();
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/fhir+xml"),
            "{f}"
        );
    }
    for f in ["json", "application/json", "application/fhir+json"] {
        let r = s
            .client
            .get(s.url(&format!("Patient/{id}")))
            .query(&[("_format", f)])
            .send()
            .await
            .unwrap();
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/fhir+json"),
            "{f}"
        );
    }
    // _pretty
    let pretty = s
        .get(&format!("Patient/{id}?_pretty=true"))
        .await
        .text()
        .await
        .unwrap();
    assert!(pretty.contains("\n  \"resourceType\""));
    // Unsupported _format / Accept → 406 with an OperationOutcome
    let r = s.get(&format!("Patient/{id}?_format=turtle")).await;
    assert_eq!(r.status(), 406);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let r = s
        .client
        .get(s.url(&format!("Patient/{id}")))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 406);
    s.stop().await;
}

#[tokio::test]
async fn malformed_and_invalid_bodies_say_where() {
    let s = TestServer::start().await;
    let send = |body: &'static str, ct: &'static str| {
        s.client
            .post(s.url("Patient"))
            .header("Content-Type", ct)
            .body(body)
            .send()
    };
    // Malformed JSON: line and column
    let r = send(
        "{\n  \"resourceType\": \"Patient\",\n  \"name\": [",
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert!(
        first_issue(&oo)["diagnostics"]
            .as_str()
            .unwrap()
            .contains("line 3"),
        "{oo}"
    );
    // Unknown element
    let r = send(
        r#"{"resourceType":"Patient","name":[{"famly":"X"}]}"#,
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["expression"][0], "Patient.name[0].famly");
    // Wrong type
    let r = send(
        r#"{"resourceType":"Patient","active":"yes"}"#,
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["expression"][0], "Patient.active");
    // Invalid primitive
    let r = send(
        r#"{"resourceType":"Patient","birthDate":"01/02/1990"}"#,
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    // Malformed XML
    let r = send(
        "<Patient xmlns=\"http://hl7.org/fhir\">\n<name>",
        "application/fhir+xml",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert!(
        first_issue(&oo)["diagnostics"]
            .as_str()
            .unwrap()
            .contains("line 2"),
        "{oo}"
    );
    // A DTD (the door to external entities) is refused
    let r = send(
        "<?xml version=\"1.0\"?><!DOCTYPE Patient [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><Patient xmlns=\"http://hl7.org/fhir\"><name><family value=\"&x;\"/></name></Patient>",
        "application/fhir+xml",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert!(
        first_issue(&oo)["diagnostics"]
            .as_str()
            .unwrap()
            .contains("DTD"),
        "{oo}"
    );
    // Unknown XML element
    let r = send(
        r#"<Patient xmlns="http://hl7.org/fhir"><colour value="red"/></Patient>"#,
        "application/fhir+xml",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["expression"][0], "Patient.colour");
    // Not JSON at all, no body, wrong media type
    assert_eq!(
        send("[1,2]", "application/fhir+json")
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        send("", "application/fhir+json").await.unwrap().status(),
        400
    );
    let r = send("name=x", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["code"], "not-supported");
    assert_eq!(s.count("Patient").await, 0);
    s.stop().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let s = TestServer::start_with(|c| {
        c.max_body_bytes = 1024;
        c.auth_disabled = true;
    })
    .await;
    let mut p = patient("Big");
    p["name"][0]["text"] = json!("x".repeat(2048));
    let r = s.post_json("Patient", &p).await;
    assert_eq!(r.status(), 413);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(first_issue(&oo)["code"], "too-costly");
    // Chunked (no Content-Length) too
    let body =
        reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            p.to_string(),
        )]));
    let r = s
        .client
        .post(s.url("Patient"))
        .header("Content-Type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(s.count("Patient").await, 0);
    s.stop().await;
}

#[tokio::test]
async fn unknown_urls_and_methods_get_outcomes() {
    let s = TestServer::start().await;
    let r = s.get("Patient/1/2/3/4/5").await;
    assert_eq!(r.status(), 404);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let r = s.client.delete(s.url("metadata")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    s.stop().await;
}

#[tokio::test]
async fn search_by_identifier_and_id_with_paging() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.create(&patient(&format!("S{i}"))).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let b: Value = s
        .get("Patient?identifier=urn:test:mrn|S3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["search"]["mode"], "match");
    let b: Value = s
        .get(&format!("Patient?_id={},{}", ids[0], ids[1]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 2);
    // paging
    let mut url = s.url("Patient?_count=2");
    let mut seen = Vec::new();
    loop {
        let page = s.get_json(&url).await;
        assert_eq!(page["total"], 5);
        for e in page["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        match next_link(&page) {
            Some(n) => url = n,
            None => break,
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    // unknown parameter: strict by default, ignored with handling=lenient
    let r = s.get("Patient?colour=red").await;
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert!(first_issue(&oo)["diagnostics"]
        .as_str()
        .unwrap()
        .contains("colour"));
    let r = s
        .client
        .get(s.url("Patient?colour=red"))
        .header("Prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert!(!b["link"][0]["url"].as_str().unwrap().contains("colour"));
    // POST _search
    let r = s
        .client
        .post(s.url("Patient/_search"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("identifier=urn%3Atest%3Amrn%7CS1")
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 1);
    // _lastUpdated
    let b: Value = s
        .get("Patient?_lastUpdated=gt2000-01-01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 5);
    let b: Value = s
        .get("Patient?_lastUpdated=lt2000-01-01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 0);
    s.stop().await;
}

#[tokio::test]
async fn concurrent_updates_keep_every_version() {
    let s = TestServer::start().await;
    let created = s.create(&patient("Conc")).await;
    let id = created["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = s.client.clone();
        let url = s.url(&format!("Patient/{id}"));
        let mut p = created.clone();
        p["name"][0]["given"] = json!([format!("G{i}")]);
        tasks.push(tokio::spawn(async move {
            client
                .put(url)
                .header("Content-Type", "application/fhir+json")
                .body(p.to_string())
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let st = t.await.unwrap();
        assert!(st == 200 || st == 409, "{st}");
        if st == 200 {
            ok += 1;
        }
    }
    let now: Value = s.get(&format!("Patient/{id}")).await.json().await.unwrap();
    assert_eq!(now["meta"]["versionId"], json!((ok + 1).to_string()));
    s.stop().await;
}

/// Conditional creates racing on the same criteria, as plain creates with
/// `If-None-Exist` and as transactions, create one resource between them.
#[tokio::test]
async fn concurrent_conditional_creates_make_one_resource() {
    let s = TestServer::start().await;
    let patient = json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:race", "value": "1"}],
        "name": [{"family": "Race"}]
    });
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = s.client.clone();
        let base = s.url("");
        let patient = patient.clone();
        tasks.push(tokio::spawn(async move {
            let request = if i % 2 == 0 {
                client
                    .post(format!("{base}Patient"))
                    .header("If-None-Exist", "identifier=urn:race|1")
                    .body(patient.to_string())
            } else {
                let bundle = json!({
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {"fullUrl": "urn:uuid:6f1c7a52-0000-4000-8000-000000000001",
                         "resource": patient,
                         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:race|1"}},
                        {"resource": {"resourceType": "Observation", "status": "final",
                                      "code": {"text": format!("race {i}")},
                                      "subject": {"reference": "urn:uuid:6f1c7a52-0000-4000-8000-000000000001"}},
                         "request": {"method": "POST", "url": "Observation"}}
                    ]
                });
                client.post(base).body(bundle.to_string())
            };
            let r = request
                .header("Content-Type", "application/fhir+json")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 200 || status == 201, "{status}: {body}");
    }
    let found = s.get_json("Patient?identifier=urn:race|1").await;
    assert_eq!(found["total"], 1, "{found}");
    let id = found["entry"][0]["resource"]["id"].as_str().unwrap();
    let obs = s
        .get_json(&format!("Observation?subject=Patient/{id}"))
        .await;
    assert_eq!(obs["total"], 6, "{obs}");
    s.stop().await;
}

/// SQLite: committed writes reach the database file through checkpoints that
/// run beside the writers, without waiting for the write-ahead log to fill
/// up (and without a writer paying for them while it holds the write lock).
#[tokio::test]
async fn sqlite_writes_are_checkpointed_into_the_database_file_in_the_background() {
    let server = TestServer::start().await;
    let Some(path) = server.database_url.strip_prefix("sqlite:") else {
        eprintln!("PostgreSQL: no write-ahead log of ehrx's to checkpoint");
        server.stop().await;
        return;
    };
    let size = || std::fs::metadata(path).unwrap().len();
    let before = size();
    let mut ids = Vec::new();
    for i in 0..30 {
        let patient =
            json!({"resourceType": "Patient", "name": [{"family": format!("Checkpoint{i}")}]});
        let created = server.create(&patient).await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    // Far fewer pages than SQLite's own automatic checkpoint waits for.
    let wal = std::fs::metadata(format!("{path}-wal")).unwrap().len();
    assert!(wal < 1000 * 4096, "{wal} bytes of log");
    let mut waited = 0;
    while size() <= before && waited < 50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    assert!(
        size() > before,
        "the database file is still {before} bytes after 5 s"
    );
    for id in &ids {
        assert_eq!(server.get(&format!("Patient/{id}")).await.status(), 200);
    }
    server.stop().await;
}

/// Each version's body is stored once (the current one in `resource`, older
/// ones in `resource_history`), and every version still reads back whole
/// through vread and history, also after a deletion.
#[tokio::test]
async fn every_version_reads_back_and_each_body_is_stored_once() {
    use sqlx::{Connection, Row};
    let s = TestServer::start().await;
    let mut p = json!({"resourceType": "Patient", "name": [{"family": "Once"}]});
    let created = s.create(&p).await;
    let id = created["id"].as_str().unwrap().to_string();
    let mut written = vec![created];
    for family in ["Twice", "Thrice"] {
        p["id"] = json!(id);
        p["name"][0]["family"] = json!(family);
        let r = s.put_json(&format!("Patient/{id}"), &p).await;
        assert_eq!(r.status(), 200);
        written.push(r.json().await.unwrap());
    }
    let r = s
        .client
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for (n, w) in written.iter().enumerate() {
        let v = s
            .get_json(&format!("Patient/{id}/_history/{}", n + 1))
            .await;
        assert_eq!(&v, w, "version {}", n + 1);
    }
    let h = s.get_json(&format!("Patient/{id}/_history")).await;
    let families: Vec<&str> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["name"][0]["family"].as_str())
        .collect();
    assert_eq!(families, ["Thrice", "Twice", "Once"]);
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&s.database_url).await.unwrap();
    let bodies: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM resource_history WHERE rtype = 'Patient' AND id = $1 AND body IS NOT NULL",
    )
    .bind(&id)
    .fetch_one(&mut db)
    .await
    .unwrap()
    .try_get("n")
    .unwrap();
    assert_eq!(
        bodies, 3,
        "three live versions, each body once, in history after the deletion"
    );
    // A live resource's current body is in `resource` only.
    let other = s
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Live"}]}))
        .await;
    let n: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM resource_history WHERE rtype = 'Patient' AND id = $1 AND body IS NOT NULL",
    )
    .bind(other["id"].as_str().unwrap())
    .fetch_one(&mut db)
    .await
    .unwrap()
    .try_get("n")
    .unwrap();
    assert_eq!(n, 0);
}
