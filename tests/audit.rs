//! The audit log (issue 15), through real HTTP against the real server with
//! real tokens: BALP-shaped AuditEvents for FHIR interactions, SMART events
//! and exchanged documents (refusals included); AuditEvent search and
//! `$access-log` for auditors and patients; fail-closed answers when the log
//! cannot be written; `ehrx audit verify` naming the first tampered entry;
//! proofs and checkpoint signatures checked by independent Python code.

mod common;

use std::process::Stdio;

use base64::Engine as _;
use common::smart::*;
use common::TestServer;
use ehrx::audit::packed;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Connection;

const PW: &str = "correct horse battery";

struct World {
    admin: String,
    /// The admin token's client.
    admin_client: String,
}

/// The practitioners of these tests: the general practitioners of both
/// patients, so that the circle of trust lets them in.
const GENERAL_PRACTITIONERS: [&str; 9] = [
    "prac1",
    "prac2",
    "prac3",
    "prac4",
    "prac5",
    "prac6",
    "prac7",
    "prac8",
    "emergency",
];

/// Two patients (pa, pb) with an Observation each (oa, ob), same code.
async fn world(s: &TestServer) -> World {
    let admin = s.token.clone().unwrap();
    for (p, family) in [("pa", "Alpha"), ("pb", "Beta")] {
        let (st, b) = fhir(
            s,
            &admin,
            reqwest::Method::PUT,
            &format!("Patient/{p}"),
            Some(
                &json!({"resourceType": "Patient", "id": p, "name": [{"family": family}],
                "generalPractitioner": GENERAL_PRACTITIONERS
                    .iter()
                    .map(|g| json!({"reference": format!("Practitioner/{g}")}))
                    .collect::<Vec<_>>()}),
            ),
        )
        .await;
        assert!(st == 200 || st == 201, "{b}");
    }
    for (o, p) in [("oa", "pa"), ("ob", "pb")] {
        let (st, b) = fhir(
            s,
            &admin,
            reqwest::Method::PUT,
            &format!("Observation/{o}"),
            Some(
                &json!({"resourceType": "Observation", "id": o, "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/{p}")}}),
            ),
        )
        .await;
        assert!(st == 200 || st == 201, "{b}");
    }
    let admin_client = claims_of(&admin)["client_id"].as_str().unwrap().to_string();
    World {
        admin,
        admin_client,
    }
}

/// A practitioner's token (`user/*.rs`, fhirUser Practitioner/{id}).
async fn practitioner(s: &TestServer, id: &str) -> String {
    let user = format!("dr.{id}");
    practitioner_user(s, &user, id);
    let scope = "openid fhirUser user/*.rs";
    let client = public_client(s, scope);
    app_token(s, &client, scope, Some((&user, PW)), &[]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A patient's own token (fhirUser Patient/{id}, `patient/*.rs`).
async fn patient(s: &TestServer, id: &str) -> String {
    let user = format!("patient.{id}");
    cli(
        s,
        &[
            "user",
            "add",
            "--username",
            &user,
            "--password-stdin",
            "--fhir-user",
            &format!("Patient/{id}"),
        ],
        Some(&format!("{PW}\n")),
    );
    let scope = "launch/patient openid fhirUser patient/*.rs";
    let client = public_client(s, scope);
    let t = app_token(s, &client, scope, Some((&user, PW)), &[]).await;
    assert_eq!(t["patient"], id);
    t["access_token"].as_str().unwrap().to_string()
}

/// The AuditEvents a search returns.
async fn audit(s: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let (st, b) = get(s, token, &format!("AuditEvent?{query}&_count=1000")).await;
    assert_eq!(st, 200, "{b}");
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

fn agent<'a>(e: &'a Value, code: &str) -> &'a Value {
    e["agent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["type"]["coding"][0]["code"] == code)
        .unwrap_or(&Value::Null)
}

fn entity<'a>(e: &'a Value, role: &str) -> &'a Value {
    e["entity"]
        .as_array()
        .map(|a| a.iter().find(|x| x["role"]["code"] == role))
        .and_then(|x| x)
        .unwrap_or(&Value::Null)
}

fn patient_of(e: &Value) -> Option<&str> {
    entity(e, "1")["what"]["reference"].as_str()
}

/// The elements every BALP profile requires: type, subtype, action,
/// recorded, outcome; the client (Source Role ID, with its address) and
/// server (Destination Role ID) agents, one requestor; the source observer.
fn assert_balp(e: &Value) {
    for k in ["type", "subtype", "action", "recorded", "outcome", "source"] {
        assert!(!e[k].is_null(), "{k} missing: {e}");
    }
    assert_eq!(agent(e, "110153")["network"]["address"], "127.0.0.1", "{e}");
    assert!(!agent(e, "110152").is_null(), "{e}");
    let requestors = e["agent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["requestor"] == true)
        .count();
    assert_eq!(requestors, 1, "{e}");
    assert!(!e["source"]["observer"].is_null());
}

fn profile(e: &Value) -> &str {
    e["meta"]["profile"][0]
        .as_str()
        .unwrap_or("")
        .rsplit('.')
        .next()
        .unwrap()
}

#[tokio::test]
async fn a_practitioners_read_is_a_balp_patient_read() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let dr = practitioner(&s, "prac1").await;
    assert_eq!(get(&s, &dr, "Observation/oa").await.0, 200);
    let found = audit(&s, &w.admin, "agent=Practitioner/prac1&subtype=read").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let e = &found[0];
    assert_balp(e);
    assert_eq!(profile(e), "PatientRead");
    assert_eq!(e["action"], "R");
    assert_eq!(e["outcome"], "0");
    assert_eq!(agent(e, "IRCP")["who"]["reference"], "Practitioner/prac1");
    assert_eq!(agent(e, "IRCP")["requestor"], true);
    assert_eq!(patient_of(e), Some("Patient/pa"));
    assert_eq!(entity(e, "4")["what"]["reference"], "Observation/oa");
}

/// A final Observation of `patient` (an id), with a text code only.
fn observation_of(patient: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}})
}

#[tokio::test]
async fn creates_updates_and_deletes_are_recorded_with_their_patient() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let obs = observation_of("pa");
    let (st, made) = fhir(
        &s,
        &w.admin,
        reqwest::Method::POST,
        "Observation",
        Some(&obs),
    )
    .await;
    assert_eq!(st, 201);
    let id = made["id"].as_str().unwrap();
    let mut changed = made.clone();
    changed["status"] = json!("amended");
    let path = format!("Observation/{id}");
    assert_eq!(
        fhir(&s, &w.admin, reqwest::Method::PUT, &path, Some(&changed))
            .await
            .0,
        200
    );
    assert!(
        fhir(&s, &w.admin, reqwest::Method::DELETE, &path, None)
            .await
            .0
            < 300
    );
    let found = audit(&s, &w.admin, &format!("entity={path}")).await;
    let mut seen: Vec<(String, String, String)> = found
        .iter()
        .map(|e| {
            assert_balp(e);
            assert_eq!(patient_of(e), Some("Patient/pa"), "{e}");
            assert_eq!(
                agent(e, "110153")["who"]["identifier"]["value"],
                w.admin_client.as_str()
            );
            (
                e["subtype"][0]["code"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                profile(e).to_string(),
            )
        })
        .collect();
    seen.sort();
    let expect = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        seen,
        vec![
            expect("create", "C", "PatientCreate"),
            expect("delete", "D", "PatientDelete"),
            expect("update", "U", "PatientUpdate"),
        ]
    );
}

#[tokio::test]
async fn a_search_touching_two_patients_is_one_patient_query_per_patient() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let dr = practitioner(&s, "prac2").await;
    let (st, b) = get(&s, &dr, "Observation?code=http://loinc.org|8867-4").await;
    assert_eq!(st, 200);
    assert_eq!(b["entry"].as_array().unwrap().len(), 2);
    let found = audit(&s, &w.admin, "agent=Practitioner/prac2&subtype=search-type").await;
    let mut patients: Vec<&str> = found.iter().filter_map(patient_of).collect();
    patients.sort();
    assert_eq!(patients, ["Patient/pa", "Patient/pb"]);
    for e in &found {
        assert_balp(e);
        assert_eq!(profile(e), "PatientQuery");
        assert_eq!(e["action"], "E");
        let q = entity(e, "24")["query"].as_str().unwrap();
        let q = base64::engine::general_purpose::STANDARD.decode(q).unwrap();
        assert_eq!(
            String::from_utf8(q).unwrap(),
            "/Observation?code=http://loinc.org|8867-4"
        );
    }
}

#[tokio::test]
async fn refused_requests_are_recorded_with_their_outcome() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    // No token: 401.
    let r = reqwest::get(s.url("Patient/pa")).await.unwrap();
    assert_eq!(r.status(), 401);
    // A patient's token writing: 403.
    let p = patient(&s, "pb").await;
    let obs = observation_of("pb");
    let (st, _) = fhir(&s, &p, reqwest::Method::POST, "Observation", Some(&obs)).await;
    assert_eq!(st, 403);
    let refused = audit(&s, &w.admin, "outcome=4").await;
    let unauthenticated = refused
        .iter()
        .find(|e| e["outcomeDesc"] == "HTTP 401")
        .expect("the 401 is recorded");
    assert_balp(unauthenticated);
    assert_eq!(patient_of(unauthenticated), Some("Patient/pa"));
    assert_eq!(
        entity(unauthenticated, "4")["what"]["reference"],
        "Patient/pa"
    );
    let forbidden = refused
        .iter()
        .find(|e| e["outcomeDesc"] == "HTTP 403")
        .expect("the 403 is recorded");
    assert_balp(forbidden);
    assert_eq!(forbidden["action"], "C");
    assert_eq!(agent(forbidden, "IRCP")["who"]["reference"], "Patient/pb");
    // A refusal conforms to no "successful" BALP profile.
    assert!(forbidden["meta"].is_null());
}

#[tokio::test]
async fn sign_in_and_every_token_event_are_recorded_without_the_token() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    practitioner_user(&s, "dr.smart", "prac3");
    // A wrong password.
    let scope = "openid fhirUser offline_access user/*.rs";
    let client = public_client(&s, scope);
    let (_, challenge) = pkce();
    let params = authorize_params(&s, &client, scope, &challenge, &[]);
    let mut f = params.clone();
    f.push(("username".into(), "dr.smart".into()));
    f.push(("password".into(), "wrong".into()));
    let r = browser()
        .post(s.url("auth/login"))
        .form(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Signed in, a token issued and refreshed.
    let t = app_token(&s, &client, scope, Some(("dr.smart", PW)), &[]).await;
    let access = t["access_token"].as_str().unwrap().to_string();
    let refresh = t["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    let (st, t2) = form(
        &s,
        "auth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &client),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t2}");
    // Introspected by the administrator, revoked by a backend client.
    let r = s
        .client
        .post(s.url("auth/introspect"))
        .bearer_auth(&w.admin)
        .form(&[("token", access.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let k = client_key(Algorithm::RS384);
    let backend = backend_client(&s, &k, "system/Patient.rs");
    let (_, bt) = backend_token(&s, &backend, &k, "system/Patient.rs").await;
    let btoken = bt["access_token"].as_str().unwrap().to_string();
    let a = assertion(&s, &backend, &k, 200, None);
    let (st, _) = form(
        &s,
        "auth/revoke",
        &[
            ("token", &btoken),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(st, 200);

    let all = audit(&s, &w.admin, "").await;
    let text = serde_json::to_string(&all).unwrap();
    for secret in [&access, &refresh, &btoken] {
        assert!(!text.contains(secret.as_str()), "a token is in the log");
    }
    let find = |sub: &str, outcome: &str| {
        all.iter()
            .find(|e| e["subtype"][0]["code"] == sub && e["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {sub} event with outcome {outcome}"))
    };
    let failed = find("110122", "4");
    assert_eq!(
        agent(failed, "IRCP")["who"]["identifier"]["value"],
        "dr.smart"
    );
    assert_eq!(find("110122", "0")["type"]["code"], "110114");
    let issued = all
        .iter()
        .find(|e| {
            e["subtype"][0]["code"] == "token-issued"
                && agent(e, "IRCP")["who"]["reference"] == "Practitioner/prac3"
        })
        .expect("the user's token issued");
    assert_balp(issued);
    assert_eq!(
        agent(issued, "110153")["who"]["identifier"]["value"],
        client.as_str()
    );
    let tail = issued["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|x| {
            x["what"]["identifier"]["value"]
                .as_str()
                .filter(|v| v.starts_with('…'))
        })
        .unwrap();
    assert!(access.ends_with(tail.trim_start_matches('…')));
    assert_eq!(find("token-refreshed", "0")["action"], "C");
    let introspected = find("token-introspected", "0");
    assert_eq!(
        agent(introspected, "110153")["who"]["identifier"]["value"],
        w.admin_client.as_str()
    );
    let revoked = find("token-revoked", "0");
    assert_eq!(
        agent(revoked, "110153")["who"]["identifier"]["value"],
        backend.as_str()
    );
}

#[tokio::test]
async fn a_document_sent_out_is_recorded_as_an_export_for_its_patient() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let r = s
        .client
        .get(s.url("Patient/pa/$signed-document"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let found = audit(&s, &w.admin, "subtype=exchange-document-out").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["type"]["code"], "110106");
    assert_eq!(patient_of(&found[0]), Some("Patient/pa"));
}

#[tokio::test]
async fn audit_events_cannot_be_written_through_the_api() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let e = json!({"resourceType": "AuditEvent", "type": {"code": "rest"},
        "recorded": "2026-01-01T00:00:00Z", "agent": [], "source": {"observer": {}}});
    for (m, path) in [
        (reqwest::Method::POST, "AuditEvent"),
        (reqwest::Method::PUT, "AuditEvent/0"),
        (reqwest::Method::DELETE, "AuditEvent/0"),
    ] {
        let (st, b) = fhir(&s, &w.admin, m.clone(), path, Some(&e)).await;
        assert_eq!(st, 405, "{m} {path}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": e, "request": {"method": "POST", "url": "AuditEvent"}}]});
    let (st, b) = fhir(&s, &w.admin, reqwest::Method::POST, "", Some(&bundle)).await;
    assert!(st >= 400, "{b}");
    let stored = audit(&s, &w.admin, "").await;
    assert!(stored
        .iter()
        .all(|e| e["recorded"] != "2026-01-01T00:00:00Z"));
}

#[tokio::test]
async fn a_patient_sees_who_read_their_record_and_nothing_about_others() {
    let s = TestServer::start().await;
    let _w = world(&s).await;
    let dr = practitioner(&s, "prac4").await;
    assert_eq!(get(&s, &dr, "Observation/oa").await.0, 200);
    assert_eq!(get(&s, &dr, "Observation/ob").await.0, 200);
    let me = patient(&s, "pa").await;
    let mine = audit(&s, &me, "patient=pa").await;
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|e| patient_of(e) == Some("Patient/pa")));
    assert!(mine.iter().any(|e| {
        agent(e, "IRCP")["who"]["reference"] == "Practitioner/prac4"
            && entity(e, "4")["what"]["reference"] == "Observation/oa"
    }));
    // Without a patient parameter: still only their own.
    let all = audit(&s, &me, "").await;
    assert!(all.iter().all(|e| patient_of(e) == Some("Patient/pa")));
    // Another patient's events are absent.
    assert!(audit(&s, &me, "patient=pb").await.is_empty());
    let (st, _) = get(&s, &me, "Patient/pb/$access-log").await;
    assert_eq!(st, 404);
    // The summary: per accessor and day.
    let (st, log) = get(&s, &me, "Patient/pa/$access-log").await;
    assert_eq!(st, 200, "{log}");
    let text = log.to_string();
    assert!(!text.contains("Observation/ob") && !text.contains("Patient/pb"));
    let access = log["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "access")
        .find(|p| p["part"][1]["valueString"] == "Practitioner/prac4")
        .expect("the practitioner's access is listed");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(access["part"][0]["valueDate"], today.as_str());
    assert!(access["part"][3]["valueString"]
        .as_str()
        .unwrap()
        .contains("read"));
    assert_eq!(access["part"][6]["valueBoolean"], false);
    // A token without access to the audit log is refused.
    let k = client_key(Algorithm::RS384);
    let c = backend_client(&s, &k, "system/Patient.rs");
    let (_, t) = backend_token(&s, &c, &k, "system/Patient.rs").await;
    let (st, _) = get(&s, t["access_token"].as_str().unwrap(), "AuditEvent").await;
    assert_eq!(st, 403);
}

/// Stores an Organization and `prac`'s PractitionerRole `role` at it.
async fn works_at(s: &TestServer, admin: &str, prac: &str, role: &str, org: &str) {
    for r in [
        json!({"resourceType": "Organization", "id": org, "name": org}),
        json!({"resourceType": "PractitionerRole", "id": role, "active": true,
            "practitioner": {"reference": format!("Practitioner/{prac}")},
            "organization": {"reference": format!("Organization/{org}")}}),
    ] {
        let path = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        let (st, b) = fhir(s, admin, reqwest::Method::PUT, &path, Some(&r)).await;
        assert!(st == 200 || st == 201, "{b}");
    }
}

/// The `access` parameters of the `$access-log` of patient `patient_id`,
/// read with the patient's own token `me`.
async fn access_log(s: &TestServer, me: &str, patient_id: &str) -> Vec<Value> {
    let (st, log) = get(s, me, &format!("Patient/{patient_id}/$access-log")).await;
    assert_eq!(st, 200, "{log}");
    log["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "access")
        .cloned()
        .collect()
}

/// The part `name` of an `access` parameter.
fn part<'a>(access: &'a Value, name: &str) -> Option<&'a Value> {
    access["part"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
}

/// [`access_log`]'s entries of the accessor `who`.
async fn accesses_by(s: &TestServer, me: &str, patient_id: &str, who: &str) -> Vec<Value> {
    access_log(s, me, patient_id)
        .await
        .into_iter()
        .filter(|a| part(a, "who").is_some_and(|p| p["valueString"] == who))
        .collect()
}

/// The references of an `access` parameter's `organization` parts.
fn organization_parts(access: &Value) -> Vec<&str> {
    access["part"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "organization")
        .filter_map(|p| p["valueReference"]["reference"].as_str())
        .collect()
}

/// The read among `found`.
fn the_read(found: &[Value]) -> &Value {
    found
        .iter()
        .find(|e| e["subtype"][0]["code"] == "read")
        .unwrap_or_else(|| panic!("a read is recorded: {found:?}"))
}

/// `e` names `org` as the organisation its caller acts for.
fn assert_acts_for(e: &Value, org: &str) {
    assert_eq!(agent(e, "RESP")["who"]["reference"], org, "{e}");
    assert_eq!(agent(e, "RESP")["requestor"], false, "{e}");
}

#[tokio::test]
async fn an_insurers_access_names_its_organisation_in_the_access_log() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    for r in [
        json!({"resourceType": "Organization", "id": "insurer", "name": "Insurer"}),
        json!({"resourceType": "Coverage", "id": "cov-pa", "status": "active",
            "beneficiary": {"reference": "Patient/pa"},
            "payor": [{"reference": "Organization/insurer"}]}),
    ] {
        let path = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        let (st, b) = fhir(&s, &w.admin, reqwest::Method::PUT, &path, Some(&r)).await;
        assert!(st == 200 || st == 201, "{b}");
    }
    // A backend client bound to the insurer, and a practitioner bound to
    // no organisation.
    let k = client_key(Algorithm::RS384);
    let insurer = backend_client_with(
        &s,
        &k,
        "system/*.rs",
        &["--organization", "Organization/insurer"],
    );
    let (st, t) = backend_token(&s, &insurer, &k, "system/*.rs").await;
    assert_eq!(st, 200, "{t}");
    let (st, b) = get(&s, t["access_token"].as_str().unwrap(), "Coverage/cov-pa").await;
    assert_eq!(st, 200, "{b}");
    let dr = practitioner(&s, "prac6").await;
    assert_eq!(get(&s, &dr, "Observation/oa").await.0, 200);
    // The insurer's event names the organisation as a third agent.
    let found = audit(&s, &w.admin, "entity=Coverage/cov-pa").await;
    let read = the_read(&found);
    assert_acts_for(read, "Organization/insurer");
    assert_eq!(
        agent(read, "110153")["who"]["identifier"]["value"],
        insurer.as_str()
    );
    // The patient's summary shows it beside the client; the practitioner's
    // access names none.
    let me = patient(&s, "pa").await;
    let accesses = access_log(&s, &me, "pa").await;
    let by_insurer = accesses
        .iter()
        .find(|a| part(a, "client").unwrap()["valueString"] == insurer.as_str())
        .expect("the insurer's access is listed");
    assert_eq!(organization_parts(by_insurer), ["Organization/insurer"]);
    assert!(part(by_insurer, "summary").unwrap()["valueString"]
        .as_str()
        .unwrap()
        .contains("for Organization/insurer"));
    let by_dr = accesses
        .iter()
        .find(|a| part(a, "who").unwrap()["valueString"] == "Practitioner/prac6")
        .expect("the practitioner's access is listed");
    assert!(part(by_dr, "organization").is_none(), "{by_dr}");
}

#[tokio::test]
async fn a_practitioners_access_names_the_organisation_of_their_role() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    works_at(&s, &w.admin, "prac7", "prac7-at-a", "hospital-a").await;
    let dr = practitioner(&s, "prac7").await;
    assert_eq!(get(&s, &dr, "Observation/oa").await.0, 200);
    let found = audit(&s, &w.admin, "agent=Practitioner/prac7").await;
    let read = the_read(&found);
    assert_acts_for(read, "Organization/hospital-a");
    assert_eq!(
        agent(read, "IRCP")["who"]["reference"],
        "Practitioner/prac7"
    );
    let me = patient(&s, "pa").await;
    let listed = accesses_by(&s, &me, "pa", "Practitioner/prac7").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(organization_parts(&listed[0]), ["Organization/hospital-a"]);
    let summary = part(&listed[0], "summary").unwrap()["valueString"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        summary.contains("Practitioner/prac7") && summary.contains("for Organization/hospital-a"),
        "{summary}"
    );
}

#[tokio::test]
async fn an_auditor_finds_accesses_by_the_organisation_acted_for() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    works_at(&s, &w.admin, "prac8", "prac8-at-a", "hospital-a").await;
    works_at(&s, &w.admin, "prac8", "prac8-at-b", "hospital-b").await;
    works_at(&s, &w.admin, "prac7", "prac7-at-a2", "hospital-a2").await;
    let dr8 = practitioner(&s, "prac8").await;
    let dr7 = practitioner(&s, "prac7").await;
    assert_eq!(get(&s, &dr8, "Observation/ob").await.0, 200);
    assert_eq!(get(&s, &dr7, "Observation/oa").await.0, 200);
    // Either of prac8's organisations finds prac8's read, and only it.
    for org in ["Organization/hospital-a", "Organization/hospital-b"] {
        let found = audit(&s, &w.admin, &format!("agent={org}")).await;
        let read = the_read(&found);
        assert_eq!(
            agent(read, "IRCP")["who"]["reference"],
            "Practitioner/prac8"
        );
        let resp: Vec<&Value> = read["agent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["type"]["coding"][0]["code"] == "RESP")
            .map(|a| &a["who"]["reference"])
            .collect();
        assert!(resp.contains(&&json!(org)), "{read}");
        assert!(
            found
                .iter()
                .all(|e| agent(e, "IRCP")["who"]["reference"] != "Practitioner/prac7"),
            "{org}"
        );
    }
    let a2 = audit(&s, &w.admin, "agent=Organization/hospital-a2").await;
    assert_eq!(
        agent(the_read(&a2), "IRCP")["who"]["reference"],
        "Practitioner/prac7"
    );
    // A part of a reference, or a pattern, matches nothing.
    for q in [
        "Organization/hospital",
        "Organization/hospital-%",
        "Organization/hospital-_",
    ] {
        assert!(
            audit(&s, &w.admin, &format!("agent={q}")).await.is_empty(),
            "{q}"
        );
    }
    // A patient's own search by organisation stays within their record.
    let me = patient(&s, "pa").await;
    let mine = audit(&s, &me, "agent=Organization/hospital-a").await;
    assert!(
        mine.iter().all(|e| patient_of(e) == Some("Patient/pa")),
        "{mine:?}"
    );
    assert!(!mine
        .iter()
        .any(|e| entity(e, "4")["what"]["reference"] == "Observation/ob"));
}

#[tokio::test]
async fn a_practitioner_with_roles_at_two_organisations_is_shown_with_both() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    works_at(&s, &w.admin, "prac8", "prac8-at-a", "hospital-a").await;
    works_at(&s, &w.admin, "prac8", "prac8-at-b", "hospital-b").await;
    let dr = practitioner(&s, "prac8").await;
    assert_eq!(get(&s, &dr, "Observation/ob").await.0, 200);
    let found = audit(&s, &w.admin, "agent=Practitioner/prac8").await;
    let read = the_read(&found);
    let named: Vec<&Value> = read["agent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"]["coding"][0]["code"] == "RESP")
        .map(|a| &a["who"]["reference"])
        .collect();
    assert_eq!(
        named,
        ["Organization/hospital-a", "Organization/hospital-b"]
    );
    let me = patient(&s, "pb").await;
    let listed = accesses_by(&s, &me, "pb", "Practitioner/prac8").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        organization_parts(&listed[0]),
        ["Organization/hospital-a", "Organization/hospital-b"]
    );
    // Nothing of it reaches the other patient's log.
    let other = patient(&s, "pa").await;
    assert!(accesses_by(&s, &other, "pa", "Practitioner/prac8")
        .await
        .is_empty());
}

#[tokio::test]
async fn an_ehr_launch_for_a_patient_is_recorded_granted_or_refused() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let launch = |token: String| {
        let s = &s;
        async move {
            s.client
                .post(s.url("auth/launch"))
                .bearer_auth(token)
                .json(&json!({"patient": "pa"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // pa's general practitioner may; a practitioner outside pa's circle
    // may not.
    assert_eq!(launch(practitioner(&s, "prac3").await).await, 201);
    assert_eq!(launch(practitioner(&s, "stranger").await).await, 403);
    let found = audit(&s, &w.admin, "subtype=launch-context").await;
    assert_eq!(found.len(), 2, "{found:?}");
    for e in &found {
        assert_balp(e);
        assert_eq!(e["action"], "C");
        assert_eq!(patient_of(e), Some("Patient/pa"), "{e}");
    }
    let by = |who: &str| {
        found
            .iter()
            .find(|e| agent(e, "IRCP")["who"]["reference"] == who)
            .unwrap_or_else(|| panic!("{who}'s launch is recorded: {found:?}"))
    };
    assert_eq!(by("Practitioner/prac3")["outcome"], "0");
    assert_ne!(by("Practitioner/stranger")["outcome"], "0");
    // pa sees both in their own log, the refused one as refused.
    let me = patient(&s, "pa").await;
    let granted = accesses_by(&s, &me, "pa", "Practitioner/prac3").await;
    assert_eq!(granted.len(), 1, "{granted:?}");
    let refused = accesses_by(&s, &me, "pa", "Practitioner/stranger").await;
    assert_eq!(part(&refused[0], "refused").unwrap()["valueInteger"], 1);
    assert!(part(&refused[0], "what").unwrap()["valueString"]
        .as_str()
        .unwrap()
        .contains("launch-context"));
}

#[tokio::test]
async fn break_the_glass_is_marked_in_the_access_log() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let dr = practitioner(&s, "prac5").await;
    let r = s
        .client
        .get(s.url("Observation/oa"))
        .bearer_auth(&dr)
        .header("X-Purpose-Of-Use", "BTG")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let found = audit(&s, &w.admin, "purpose=BTG").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["purposeOfUse"][0]["coding"][0]["code"], "BTG");
    let me = patient(&s, "pa").await;
    let (_, log) = get(&s, &me, "Patient/pa/$access-log").await;
    let marked = log["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["part"][1]["valueString"] == "Practitioner/prac5")
        .unwrap();
    assert_eq!(marked["part"][6]["valueBoolean"], true);
    assert!(marked["part"][7]["valueString"]
        .as_str()
        .unwrap()
        .contains("BREAK-THE-GLASS"));
}

/// A connection to the server's database; on SQLite with the audit log's
/// own file attached as `audit`, so the log's tables are reached by name.
async fn db(s: &TestServer) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&s.database_url).await.unwrap();
    if let Some(path) = ehrx::store::sqlite_audit_path(&s.database_url) {
        sqlx::query("ATTACH DATABASE $1 AS audit")
            .bind(path)
            .execute(&mut c)
            .await
            .unwrap();
    }
    c
}

/// The JSON of entry `seq`, from its stored (packed) body.
async fn stored_body(c: &mut sqlx::AnyConnection, seq: i64) -> String {
    let stored: String = sqlx::query_scalar("SELECT body FROM audit_entry WHERE seq = $1")
        .bind(seq)
        .fetch_one(&mut *c)
        .await
        .unwrap();
    packed::unpack(&stored).unwrap().into_owned()
}

async fn exec(s: &TestServer, sql: &str) {
    let mut c = db(s).await;
    sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_nothing_is_answered() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let postgres = s.database_url.starts_with("postgres");
    let (break_it, mend_it) = if postgres {
        (
            "CREATE FUNCTION audit_down() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit down'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit_down BEFORE INSERT ON audit_entry FOR EACH STATEMENT EXECUTE FUNCTION audit_down();",
            "DROP TRIGGER audit_down ON audit_entry; DROP FUNCTION audit_down();",
        )
    } else {
        (
            // The log's own file, and the outbox a write's entries go
            // through in the main file.
            "CREATE TRIGGER audit.audit_down BEFORE INSERT ON audit_entry BEGIN SELECT RAISE(ABORT, 'audit down'); END; \
             CREATE TRIGGER outbox_down BEFORE INSERT ON audit_outbox BEGIN SELECT RAISE(ABORT, 'audit down'); END;",
            "DROP TRIGGER audit.audit_down; DROP TRIGGER outbox_down;",
        )
    };
    exec(&s, break_it).await;
    // A read: 503, an OperationOutcome, nothing of the patient.
    let r = s.client.get(s.url("Patient/pa")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert!(!body.contains("Alpha"), "{body}");
    // A write: 503, and nothing stored.
    let obs = json!({"resourceType": "Observation", "id": "lost", "status": "final",
        "code": {"text": "never stored"}, "subject": {"reference": "Patient/pa"}});
    let (st, b) = fhir(
        &s,
        &w.admin,
        reqwest::Method::PUT,
        "Observation/lost",
        Some(&obs),
    )
    .await;
    assert_eq!(st, 503, "{b}");
    assert_eq!(b["resourceType"], "OperationOutcome");
    exec(&s, mend_it).await;
    assert_eq!(get(&s, &w.admin, "Observation/lost").await.0, 404);
    assert_eq!(get(&s, &w.admin, "Patient/pa").await.0, 200);
}

/// Runs `ehrx audit verify` (with extra arguments); its report.
fn verify(s: &TestServer, args: &[&str]) -> Value {
    let out = s
        .ehrx()
        .args(["audit", "verify"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "verify printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.success(), report["verified"] == true, "{report}");
    report
}

/// A server whose log holds some entries, the last ones covered by a signed
/// checkpoint.
async fn logged() -> (TestServer, World) {
    let s = TestServer::start().await;
    let w = world(&s).await;
    for p in [
        "Patient/pa",
        "Patient/pb",
        "Observation/oa",
        "Observation/ob",
    ] {
        assert_eq!(get(&s, &w.admin, p).await.0, 200);
    }
    let c = cli(&s, &["audit", "checkpoint"], None);
    assert!(c["size"].as_u64().unwrap() >= 8, "{c}");
    (s, w)
}

#[tokio::test]
async fn entries_are_stored_packed_and_served_as_the_json_their_digest_is_of() {
    let (s, w) = logged().await;
    let mut c = db(&s).await;
    let (stored, digest): (String, String) =
        sqlx::query_as("SELECT body, digest FROM audit_entry WHERE seq = 3")
            .fetch_one(&mut c)
            .await
            .unwrap();
    let (status, served) = get(&s, &w.admin, "AuditEvent/3").await;
    assert_eq!(status, 200, "{served}");
    assert_eq!(served["id"], "3");
    let json = packed::unpack(&stored).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), served);
    assert_eq!(hex::encode(Sha256::digest(json.as_bytes())), digest);
    assert!(
        stored.starts_with("~1") && stored.len() * 4 < json.len(),
        "{} bytes stored for {} of JSON",
        stored.len(),
        json.len()
    );
}

#[tokio::test]
async fn verify_names_an_entry_whose_stored_body_cannot_be_unpacked() {
    let (s, _w) = logged().await;
    let mut c = db(&s).await;
    let stored: String = sqlx::query_scalar("SELECT body FROM audit_entry WHERE seq = 2")
        .fetch_one(&mut c)
        .await
        .unwrap();
    // Cut short, as a damaged page or a careless edit would leave it.
    sqlx::query("UPDATE audit_entry SET body = $1 WHERE seq = 2")
        .bind(&stored[..stored.len() / 2])
        .execute(&mut c)
        .await
        .unwrap();
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], false, "{r}");
    assert_eq!(r["first_bad"], 2, "{r}");
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let (s, _w) = logged().await;
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["checkpoints_checked"], 1);
}

#[tokio::test]
async fn concurrent_reads_and_writes_leave_a_gap_free_log_that_verifies() {
    // Reads are appended by the group-committing writer, writes in their own
    // transactions: both take positions from the same log, in any order.
    let s = TestServer::start().await;
    let w = world(&s).await;
    let before = cli(&s, &["audit", "checkpoint"], None)["size"]
        .as_u64()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (url, token, client) = (s.url(""), w.admin.clone(), s.client.clone());
        tasks.push(tokio::spawn(async move {
            let r = if i % 3 == 0 {
                client
                    .put(format!("{url}Observation/c{i}"))
                    .bearer_auth(&token)
                    .header("content-type", "application/fhir+json")
                    .body(
                        json!({"resourceType": "Observation", "id": format!("c{i}"),
                            "status": "final", "code": {"text": "x"},
                            "subject": {"reference": "Patient/pa"}})
                        .to_string(),
                    )
                    .send()
                    .await
            } else {
                client
                    .get(format!("{url}Observation/oa"))
                    .bearer_auth(&token)
                    .send()
                    .await
            };
            r.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert!([200, 201].contains(&t.await.unwrap()));
    }
    let after = cli(&s, &["audit", "checkpoint"], None)["size"]
        .as_u64()
        .unwrap();
    // One entry per request (each touches one patient), none lost, none doubled.
    assert_eq!(after - before, 24);
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], true, "{r}");
}

#[tokio::test]
async fn verify_names_an_entry_whose_column_was_changed() {
    let (s, _w) = logged().await;
    exec(&s, "UPDATE audit_entry SET outcome = '4' WHERE seq = 5").await;
    let r = verify(&s, &[]);
    assert_eq!(r["first_bad"], 5, "{r}");
}

#[tokio::test]
async fn verify_names_an_entry_whose_body_was_changed() {
    let (s, _w) = logged().await;
    let mut c = db(&s).await;
    let changed = stored_body(&mut c, 3)
        .await
        .replace("\"outcome\":\"0\"", "\"outcome\":\"4\"");
    sqlx::query("UPDATE audit_entry SET body = $1 WHERE seq = 3")
        .bind(packed::pack(&changed))
        .execute(&mut c)
        .await
        .unwrap();
    let r = verify(&s, &[]);
    assert_eq!(r["first_bad"], 3, "{r}");
}

/// A log with a practitioner's read naming the organisation of their role;
/// the read's position.
async fn logged_with_an_organisation() -> (TestServer, i64) {
    let (s, w) = logged().await;
    works_at(&s, &w.admin, "prac7", "prac7-at-a", "hospital-a").await;
    let dr = practitioner(&s, "prac7").await;
    assert_eq!(get(&s, &dr, "Observation/oa").await.0, 200);
    let found = audit(&s, &w.admin, "agent=Organization/hospital-a").await;
    let seq = the_read(&found)["id"].as_str().unwrap().parse().unwrap();
    (s, seq)
}

#[tokio::test]
async fn verify_names_an_entry_whose_organisations_were_changed() {
    let (s, seq) = logged_with_an_organisation().await;
    exec(
        &s,
        &format!("UPDATE audit_entry SET organizations = 'Organization/other' WHERE seq = {seq}"),
    )
    .await;
    let r = verify(&s, &[]);
    assert_eq!(r["first_bad"], seq, "{r}");
}

/// Entry `seq` as an upgrade leaves one an earlier release appended: no
/// `organizations`, and `organizations_from` after it.
async fn appended_before_the_column(s: &TestServer, seq: i64) {
    exec(
        s,
        &format!(
            "UPDATE audit_entry SET organizations = NULL WHERE seq = {seq}; \
             UPDATE audit_head SET organizations_from = {}",
            seq + 1
        ),
    )
    .await;
}

#[tokio::test]
async fn entries_from_before_the_organisations_column_are_checked_to_have_none() {
    let (s, seq) = logged_with_an_organisation().await;
    appended_before_the_column(&s, seq).await;
    assert_eq!(verify(&s, &[])["verified"], true);
    // Moving the boundary back over it, or giving it a value, is named.
    exec(&s, "UPDATE audit_head SET organizations_from = 0").await;
    assert_eq!(verify(&s, &[])["first_bad"], seq);
    exec(
        &s,
        &format!(
            "UPDATE audit_entry SET organizations = 'Organization/hospital-a' WHERE seq = {seq}; \
             UPDATE audit_head SET organizations_from = {}",
            seq + 1
        ),
    )
    .await;
    assert_eq!(verify(&s, &[])["first_bad"], seq);
}

/// Waits until a server has filled in the organisations of the entries
/// from before the column (`organizations_from` down to 0).
async fn organisations_filled_in(c: &mut sqlx::AnyConnection) {
    for _ in 0..200 {
        if number(c, "SELECT organizations_from FROM audit_head WHERE id = 1").await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the organisations of older entries were not filled in");
}

#[tokio::test]
async fn entries_from_before_the_organisations_column_are_filled_in_when_a_server_starts() {
    let (s, seq) = logged_with_an_organisation().await;
    appended_before_the_column(&s, seq).await;
    // One older entry pruned: no body, no columns.
    exec(
        &s,
        "UPDATE audit_entry SET body = NULL, recorded = NULL, type = NULL, subtype = NULL, \
         action = NULL, outcome = NULL, patient = NULL, agent = NULL, client = NULL, \
         entity = NULL, purpose = NULL, organizations = NULL WHERE seq = 0",
    )
    .await;
    assert_eq!(verify(&s, &[])["verified"], true);
    let before = audit(&s, &admin_token(&s).await, "agent=Organization/hospital-a").await;
    assert!(
        before.iter().all(|e| e["id"] != seq.to_string().as_str()),
        "{before:?}"
    );

    // A server started on the database fills it in from the entry's body.
    let url = s.database_url.clone();
    let s2 = TestServer::start_authorized(move |c| c.database_url = url).await;
    let mut c = db(&s2).await;
    organisations_filled_in(&mut c).await;
    let found = audit(
        &s2,
        s2.token.as_deref().unwrap(),
        "agent=Organization/hospital-a",
    )
    .await;
    assert!(
        found.iter().any(|e| e["id"] == seq.to_string().as_str()),
        "{found:?}"
    );
    let column: Option<String> =
        sqlx::query_scalar("SELECT organizations FROM audit_entry WHERE seq = $1")
            .bind(seq)
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(column.as_deref(), Some("Organization/hospital-a"));
    let pruned: Option<String> =
        sqlx::query_scalar("SELECT organizations FROM audit_entry WHERE seq = 0")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(pruned, None);
    // From here on every entry's column is checked against its body.
    let r = verify(&s2, &[]);
    assert_eq!(r["verified"], true, "{r}");
    exec(
        &s2,
        &format!("UPDATE audit_entry SET organizations = NULL WHERE seq = {seq}"),
    )
    .await;
    assert_eq!(verify(&s2, &[])["first_bad"], seq);
}

#[tokio::test]
async fn verify_names_a_deleted_entry() {
    let (s, _w) = logged().await;
    exec(&s, "DELETE FROM audit_entry WHERE seq = 4").await;
    assert_eq!(verify(&s, &[])["first_bad"], 4);
}

#[tokio::test]
async fn verify_names_entries_cut_from_the_end() {
    let (s, _w) = logged().await;
    // The log's own size is rewritten too: the signed checkpoint still
    // tells.
    exec(
        &s,
        "DELETE FROM audit_entry WHERE seq >= 6; UPDATE audit_head SET size = 6",
    )
    .await;
    assert_eq!(verify(&s, &[])["first_bad"], 6);
}

#[tokio::test]
async fn verify_names_two_reordered_entries() {
    let (s, _w) = logged().await;
    exec(
        &s,
        "UPDATE audit_entry SET seq = -1 WHERE seq = 2; \
         UPDATE audit_entry SET seq = 2 WHERE seq = 6; \
         UPDATE audit_entry SET seq = 6 WHERE seq = -1;",
    )
    .await;
    assert_eq!(verify(&s, &[])["first_bad"], 2);
}

#[tokio::test]
async fn verify_names_an_inserted_entry() {
    let (s, _w) = logged().await;
    // A forged entry, consistent in itself (body, digest, columns), slid in
    // at position 3; the entries after it are renumbered and the size
    // raised to match.
    let mut c = db(&s).await;
    let body = stored_body(&mut c, 0).await;
    let mut forged: Value = serde_json::from_str(&body).unwrap();
    forged["id"] = json!("3");
    let forged_body = forged.to_string();
    let cols = ehrx::audit::event::Columns::of(&forged);
    sqlx::raw_sql(
        "UPDATE audit_entry SET seq = -(seq + 1) WHERE seq >= 3; \
         UPDATE audit_entry SET seq = -seq WHERE seq < 0; \
         UPDATE audit_head SET size = size + 1;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let mut q = sqlx::query(
        "INSERT INTO audit_entry (seq, recorded, type, subtype, action, outcome, patient, agent, \
         client, entity, purpose, body, digest) VALUES (3, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    );
    for (_, v) in cols.named() {
        q = q.bind(v.map(str::to_string));
    }
    q.bind(&forged_body)
        .bind(hex::encode(Sha256::digest(forged_body.as_bytes())))
        .execute(&mut c)
        .await
        .unwrap();
    assert_eq!(verify(&s, &[])["first_bad"], 3);
}

#[tokio::test]
async fn a_consistent_rewrite_is_caught_by_the_checkpoint() {
    let (s, _w) = logged().await;
    // Body, digest and columns rewritten together: only the signed
    // checkpoint can tell.
    let mut c = db(&s).await;
    let body = stored_body(&mut c, 4).await;
    let mut v: Value = serde_json::from_str(&body).unwrap();
    v["recorded"] = json!("2000-01-01T00:00:00.000Z");
    let forged = v.to_string();
    sqlx::query("UPDATE audit_entry SET body = $1, digest = $2, recorded = $3 WHERE seq = 4")
        .bind(&forged)
        .bind(hex::encode(Sha256::digest(forged.as_bytes())))
        .bind("2000-01-01T00:00:00.000Z")
        .execute(&mut c)
        .await
        .unwrap();
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], false, "{r}");
    assert!(r["first_bad"].as_u64().unwrap() <= 4, "{r}");
}

#[tokio::test]
async fn a_witness_checkpoint_kept_elsewhere_catches_a_truncated_log() {
    let (s, w) = logged().await;
    // A witness (a client with a token) keeps the checkpoint; it is
    // recorded as having fetched it.
    let r = s
        .client
        .get(s.url("audit/checkpoint"))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let kept: Value = r.json().await.unwrap();
    let size = kept["size"].as_i64().unwrap();
    let mut c = db(&s).await;
    assert_eq!(
        number(&mut c, "SELECT MAX(size) FROM audit_witness").await,
        size
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), kept.to_string()).unwrap();
    let path = file.path().to_str().unwrap();
    assert_eq!(verify(&s, &["--from-checkpoint", path])["verified"], true);
    // Everything from entry 2 removed, with the stored checkpoints and the
    // recorded size: the kept checkpoint still tells.
    exec(
        &s,
        "DELETE FROM audit_entry WHERE seq >= 2; DELETE FROM audit_checkpoint; \
         UPDATE audit_head SET size = 2",
    )
    .await;
    assert_eq!(verify(&s, &[])["verified"], true);
    assert_eq!(verify(&s, &["--from-checkpoint", path])["first_bad"], 2);
}

/// Runs `ehrx audit prune` for everything recorded so far; returns how
/// many entries it cleared.
fn prune_everything(s: &TestServer) -> u64 {
    let out = cli(s, &["audit", "prune", "--before", "2999-01-01"], None);
    out["cleared"].as_u64().unwrap_or_else(|| panic!("{out}"))
}

/// A number one query of `sql` reads (`COUNT`, `MAX`, `MIN`).
async fn number(c: &mut sqlx::AnyConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&mut *c).await.unwrap()
}

/// Whether the tests run on PostgreSQL (whose log is in its database, not a
/// file of its own).
fn on_postgres() -> bool {
    std::env::var("EHRX_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres"))
}

#[tokio::test]
async fn retention_keeps_everything_from_the_witnessed_checkpoint_on() {
    let (s, w) = logged().await;
    let r = s
        .client
        .get(s.url("audit/checkpoint"))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    let size = r.json::<Value>().await.unwrap()["size"].as_i64().unwrap();
    assert_eq!(get(&s, &w.admin, "Patient/pa").await.0, 200);
    assert_eq!(prune_everything(&s), size as u64);
    let mut c = db(&s).await;
    let cleared = number(
        &mut c,
        "SELECT COUNT(*) FROM audit_entry WHERE body IS NULL",
    )
    .await;
    let kept_from = number(
        &mut c,
        "SELECT MIN(seq) FROM audit_entry WHERE body IS NOT NULL",
    )
    .await;
    assert_eq!((cleared, kept_from), (size, size));
    // Cleared entries keep their digests: the log still verifies.
    assert_eq!(verify(&s, &[])["verified"], true);
}

#[tokio::test]
async fn a_patient_or_practitioner_reading_the_checkpoint_is_no_witness() {
    let (s, _w) = logged().await;
    // Anyone can sign up as a patient: their fetch must not let retention
    // clear what no real witness holds.
    let me = patient(&s, "pa").await;
    let dr = practitioner(&s, "prac1").await;
    for token in [&me, &dr] {
        let r = s
            .client
            .get(s.url("audit/checkpoint"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cp: Value = r.json().await.unwrap();
        assert!(cp["size"].as_u64().unwrap() >= 8, "{cp}");
    }
    let mut c = db(&s).await;
    assert_eq!(
        number(&mut c, "SELECT COUNT(*) FROM audit_witness").await,
        0
    );
    assert_eq!(prune_everything(&s), 0);
    let cleared = number(
        &mut c,
        "SELECT COUNT(*) FROM audit_entry WHERE body IS NULL",
    )
    .await;
    assert_eq!(cleared, 0);
}

#[tokio::test]
async fn a_rotated_key_signs_the_next_checkpoints_and_the_old_key_stays_published() {
    let (s, w) = logged().await;
    let json_at = |path: &'static str| {
        let s = &s;
        async move {
            let r = s.client.get(s.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.json::<Value>().await.unwrap()
        }
    };
    let old = json_at("audit/key").await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = json_at("audit/checkpoint").await;
    assert_eq!(first["key_id"], old.as_str());
    let new = cli(&s, &["audit", "rotate-key"], None)["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    assert_eq!(json_at("audit/key").await["key_id"], new.as_str());
    let published: Vec<String> = json_at("audit/keys").await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(published, [old.clone(), new.clone()]);
    // The log grows; the next checkpoint is signed with the new key.
    assert_eq!(get(&s, &w.admin, "Patient/pa").await.0, 200);
    let next = cli(&s, &["audit", "checkpoint"], None);
    assert_eq!(next["key_id"], new.as_str(), "{next}");
    assert!(next["size"].as_u64() > first["size"].as_u64());
    // Both checkpoints verify, each against the key it names, and so does
    // the one kept from before the rotation.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), first.to_string()).unwrap();
    let r = verify(&s, &["--from-checkpoint", file.path().to_str().unwrap()]);
    assert_eq!(r["verified"], true, "{r}");
}

/// A hash served in base64.
fn hash_of(b64: &Value) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

/// The hashes of a served proof.
fn proof_of(proof: &Value) -> Vec<[u8; 32]> {
    proof.as_array().unwrap().iter().map(hash_of).collect()
}

#[tokio::test]
async fn export_writes_each_entry_with_an_inclusion_proof() {
    let (s, _w) = logged().await;
    let out = s
        .ehrx()
        .args(["audit", "export", "--since", "2000-01-01"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with('{'));
    let head: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let cp = &head["checkpoint"];
    let root = hash_of(&cp["root"]);
    let size = cp["size"].as_u64().unwrap();
    let mut n = 0;
    for l in lines {
        let e: Value = serde_json::from_str(l).unwrap();
        if e.get("index").is_none() {
            continue;
        }
        let body = e["body"].as_str().unwrap();
        let leaf: [u8; 32] = Sha256::digest(body.as_bytes()).into();
        assert!(ehrx::audit::tree::verify_inclusion(
            &root,
            size,
            &leaf,
            e["index"].as_u64().unwrap(),
            &proof_of(&e["inclusion"]["proof"])
        ));
        n += 1;
    }
    assert_eq!(n, size);
}

/// Every entry's inclusion proof as the server at `s` gives it, against the
/// checkpoint `ehrx audit checkpoint` signs from the database alone.
async fn proofs_match_the_database(s: &TestServer) {
    let cp = cli(s, &["audit", "checkpoint"], None);
    let size = cp["size"].as_u64().unwrap();
    let root = &cp["root"];
    let mut c = db(s).await;
    for index in 0..size {
        let digest: String = sqlx::query_scalar("SELECT digest FROM audit_entry WHERE seq = $1")
            .bind(index as i64)
            .fetch_one(&mut c)
            .await
            .unwrap();
        let r = s
            .get(&format!("audit/proof/inclusion?index={index}&size={size}"))
            .await;
        assert_eq!(r.status(), 200, "entry {index}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["leaf"], digest.as_str(), "entry {index} of {size}");
        assert_eq!(&p["root"], root, "entry {index} of {size}");
        assert!(ehrx::audit::tree::verify_inclusion(
            &hash_of(root),
            size,
            &hex::decode(&digest).unwrap().try_into().unwrap(),
            index,
            &proof_of(&p["proof"])
        ));
    }
}

#[tokio::test]
async fn two_servers_appending_in_turn_each_prove_the_log_the_database_holds() {
    let (s, w) = logged().await;
    // The first server's tree is built before the second appends.
    proofs_match_the_database(&s).await;
    let url = s.database_url.clone();
    let s2 = TestServer::start_authorized(move |c| c.database_url = url).await;
    let t2 = s2.token.clone().unwrap();
    for _ in 0..3 {
        for p in ["Patient/pa", "Observation/oa"] {
            assert_eq!(get(&s, &w.admin, p).await.0, 200);
        }
        // A write: on SQLite its entries reach the log through the outbox.
        let obs = observation_of("pa");
        let (st, b) = fhir(
            &s,
            &w.admin,
            reqwest::Method::POST,
            "Observation",
            Some(&obs),
        )
        .await;
        assert_eq!(st, 201, "{b}");
        for p in ["Patient/pb", "Observation/ob"] {
            assert_eq!(get(&s2, &t2, p).await.0, 200);
        }
    }
    proofs_match_the_database(&s).await;
    proofs_match_the_database(&s2).await;
}

#[tokio::test]
async fn python_checks_the_checkpoint_signature_and_the_proofs() {
    let (s, w) = logged().await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/audit_proof.py");
    for index in ["0", "5"] {
        // Run beside the server, which answers on this test's runtime.
        let (script, base, token) = (script.clone(), s.base.clone(), w.admin.clone());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(&script)
                .args([base.as_str(), token.as_str(), index])
                .output()
                .expect("python3")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
}

#[tokio::test]
async fn the_audit_can_be_switched_off() {
    let s = TestServer::start_authorized(|c| c.audit = false).await;
    let w = world(&s).await;
    assert_eq!(get(&s, &w.admin, "Patient/pa").await.0, 200);
    assert_eq!(s.get("audit/checkpoint").await.status(), 404);
    let mut c = db(&s).await;
    assert_eq!(number(&mut c, "SELECT COUNT(*) FROM audit_entry").await, 0);
}

#[tokio::test]
async fn a_backup_carries_the_log_and_its_newest_checkpoint() {
    let (s, _w) = logged().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.jsonl.gz");
    let written = cli(&s, &["backup", "--out", file.to_str().unwrap()], None);
    let cp = &written["written"]["manifest"]["audit_checkpoint"];
    assert!(cp["size"].as_u64().unwrap() >= 8, "{written}");
    assert!(
        written["written"]["manifest"]["tables"]["audit_entry"]
            .as_i64()
            .unwrap()
            >= 8
    );
    // Restored elsewhere, the log still verifies against its checkpoint.
    let target = common::fresh_database(&dir.path().join("t")).await;
    if let Some(path) = target.strip_prefix("sqlite:") {
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
    }
    let run = |args: &[&str]| {
        common::ehrx_bin()
            .args(args)
            .env("EHRX_DATABASE_URL", &target)
            .env("EHRX_LOG", "error")
            .output()
            .unwrap()
    };
    let out = run(&["restore", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["audit", "verify"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["checkpoints_checked"], 1);
}

#[tokio::test]
async fn an_event_recorded_through_the_audit_api_reaches_the_access_log() {
    use ehrx::audit::{Action, Event, EventType};
    let s = TestServer::start().await;
    let _w = world(&s).await;
    // What the consent and break-the-glass code does: build an event and
    // record it (committed when `record` returns).
    let store = ehrx::store::Store::open(&s.database_url, 2, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let log = ehrx::store::audit::AuditLog::start(
        store,
        s.base.clone(),
        Default::default(),
        0,
        Default::default(),
    );
    log.record(vec![Event::new(EventType::break_the_glass(), Action::Read)
        .user(Some("Practitioner/emergency".into()))
        .client(Some("ward-app".into()))
        .patient(Some("pa".into()))
        .data("Observation/oa")
        .purpose("BTG")])
        .await
        .unwrap();
    let me = patient(&s, "pa").await;
    let (_, log) = get(&s, &me, "Patient/pa/$access-log").await;
    let marked = log["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["part"][1]["valueString"] == "Practitioner/emergency")
        .expect("the recorded access is listed");
    assert_eq!(marked["part"][2]["valueString"], "ward-app");
    assert_eq!(marked["part"][6]["valueBoolean"], true);
    assert!(marked["part"][3]["valueString"]
        .as_str()
        .unwrap()
        .contains("break-the-glass"));
}

#[tokio::test]
async fn a_page_is_audited_for_the_patients_it_shows_only() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let dr = practitioner(&s, "prac6").await;
    // One of two matches shown (the other was only looked ahead at).
    let (st, b) = get(
        &s,
        &dr,
        "Observation?code=http://loinc.org|8867-4&_sort=_id&_count=1",
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(b["entry"][0]["resource"]["id"], "oa");
    let found = audit(&s, &w.admin, "agent=Practitioner/prac6&subtype=search-type").await;
    let patients: Vec<&str> = found.iter().filter_map(patient_of).collect();
    assert_eq!(patients, ["Patient/pa"]);
}

#[tokio::test]
async fn a_writes_entries_are_in_the_log_when_its_response_leaves() {
    let s = TestServer::start().await;
    let w = world(&s).await;
    let obs = json!({"resourceType": "Observation", "id": "fresh", "status": "final",
        "code": {"text": "written"}, "subject": {"reference": "Patient/pa"}});
    let (st, b) = fhir(
        &s,
        &w.admin,
        reqwest::Method::PUT,
        "Observation/fresh",
        Some(&obs),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    // Straight after the response, without waiting: the entry is a leaf of
    // the log, not only committed somewhere on its way there.
    let mut c = db(&s).await;
    let n = number(
        &mut c,
        "SELECT COUNT(*) FROM audit_entry WHERE entity = 'Observation/fresh' AND action = 'C'",
    )
    .await;
    assert_eq!(n, 1);
    if s.database_url.starts_with("sqlite") {
        // On SQLite the log is a file of its own; the database file keeps
        // only what writes have not yet seen appended.
        let in_main = number(
            &mut c,
            "SELECT COUNT(*) FROM main.sqlite_master WHERE name IN ('audit_entry', 'audit_head')",
        )
        .await;
        assert_eq!(in_main, 0);
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_outbox \
             WHERE id > (SELECT drained FROM audit.audit_head WHERE id = 1)",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(waiting, 0);
    }
    assert_eq!(verify(&s, &[])["verified"], true);
}

/// Puts an entry in `audit_outbox` as a write's transaction leaves it (an
/// event whose `id` is empty, with its columns), marked by its `recorded`
/// instant; with `id`, at that row.
async fn leave_in_outbox(c: &mut sqlx::AnyConnection, recorded: &str, id: Option<i64>) {
    let body = stored_body(c, 0).await;
    let mut e: Value = serde_json::from_str(&body).unwrap();
    e["id"] = json!("");
    e["recorded"] = json!(recorded);
    // The columns of entry 0, but the time it was recorded.
    let (id_column, id_value) = match id {
        Some(id) => (", id", format!(", {id}")),
        None => ("", String::new()),
    };
    sqlx::query(&format!(
        "INSERT INTO audit_outbox (recorded, type, subtype, action, outcome, patient, agent, \
         client, entity, purpose, organizations, body{id_column}) \
         SELECT $1, type, subtype, action, outcome, patient, agent, client, entity, purpose, \
         organizations, $2{id_value} FROM audit_entry WHERE seq = 0"
    ))
    .bind(recorded)
    .bind(e.to_string())
    .execute(&mut *c)
    .await
    .unwrap();
}

async fn entries_recorded_at(c: &mut sqlx::AnyConnection, recorded: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM audit_entry WHERE recorded = $1")
        .bind(recorded)
        .fetch_one(&mut *c)
        .await
        .unwrap()
}

#[tokio::test]
async fn entries_left_in_the_outbox_are_appended_once_and_those_already_appended_never_again() {
    // What a crash between the two commits leaves (SQLite: the database's
    // and the log's file), or another process's write: rows in the outbox
    // after the newest one appended, and perhaps rows up to it that were
    // appended but not yet cleared.
    let s = TestServer::start().await;
    let _w = world(&s).await;
    let mut c = db(&s).await;
    let drained: i64 = sqlx::query_scalar("SELECT drained FROM audit_head WHERE id = 1")
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_outbox WHERE id <= $1")
        .bind(drained)
        .execute(&mut c)
        .await
        .unwrap();
    let appended = "2001-01-01T00:00:00.000Z";
    let pending = "2001-01-02T00:00:00.000Z";
    leave_in_outbox(&mut c, appended, Some(drained)).await;
    leave_in_outbox(&mut c, pending, None).await;
    // The server's writer looks for such rows when nothing wakes it.
    let mut seen = 0;
    for _ in 0..100 {
        seen = entries_recorded_at(&mut c, pending).await;
        if seen > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 1);
    // Some more traffic, and more than one look later: still once.
    let _ = s.client.get(s.url("Patient/pa")).send().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(entries_recorded_at(&mut c, pending).await, 1);
    assert_eq!(entries_recorded_at(&mut c, appended).await, 0);
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], true, "{r}");
}

/// SQLite: a database in `dir` as a release left it whose last migration
/// came before `first_new` (the audit log's file attached as `audit` with
/// `attach`, as the store does from `0011` on); its URL and a connection.
async fn migrated_before(
    dir: &std::path::Path,
    first_new: &str,
    attach: bool,
) -> (String, sqlx::AnyConnection) {
    let old = dir.join("migrations");
    std::fs::create_dir(&old).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().into_string().unwrap();
        if name.as_str() < first_new {
            std::fs::copy(f.path(), old.join(&name)).unwrap();
        }
    }
    let url = format!("sqlite:{}?mode=rwc", dir.join("old.db").display());
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&url).await.unwrap();
    if attach {
        sqlx::query("ATTACH DATABASE $1 AS audit")
            .bind(ehrx::store::sqlite_audit_path(&url).unwrap())
            .execute(&mut c)
            .await
            .unwrap();
    }
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run_direct(&mut c)
        .await
        .unwrap();
    (url, c)
}

#[tokio::test]
async fn organisations_become_searchable_on_upgrade_for_older_entries_too() {
    if on_postgres() {
        return;
    }
    // A log as the release before the organisations column left it: one
    // entry naming an organisation, and a write's entry naming two still in
    // `audit_outbox`.
    let dir = tempfile::tempdir().unwrap();
    let (url, mut c) = migrated_before(dir.path(), "0012", true).await;
    let resp = |org: &str| {
        json!({"type": {"coding": [{"code": "RESP"}]}, "who": {"reference": org},
            "requestor": false})
    };
    let logged = json!({"resourceType": "AuditEvent", "id": "0",
        "recorded": "2001-01-01T00:00:00.000Z", "agent": [resp("Organization/h1")]})
    .to_string();
    sqlx::query(
        "INSERT INTO audit.audit_entry (seq, recorded, body, digest) VALUES (0, $1, $2, $3); \
         INSERT INTO audit.audit_head (id, size) VALUES (1, 1)",
    )
    .bind("2001-01-01T00:00:00.000Z")
    .bind(&logged)
    .bind(hex::encode(Sha256::digest(logged.as_bytes())))
    .execute(&mut c)
    .await
    .unwrap();
    let waiting = json!({"resourceType": "AuditEvent", "id": "",
        "recorded": "2001-01-01T00:00:01.000Z",
        "agent": [resp("Organization/h2"), {"who": {"reference": "Practitioner/p"}},
            resp("Organization/h3")]})
    .to_string();
    sqlx::query("INSERT INTO audit_outbox (recorded, body) VALUES ($1, $2)")
        .bind("2001-01-01T00:00:01.000Z")
        .bind(&waiting)
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();

    // This release serves it: its writer appends the outbox's entry.
    let url2 = url.clone();
    let s = TestServer::start_authorized(move |c| c.database_url = url2).await;
    let admin = s.token.clone().unwrap();
    for org in ["Organization/h2", "Organization/h3"] {
        let found = audit(&s, &admin, &format!("agent={org}")).await;
        assert_eq!(found.len(), 1, "{org}: {found:?}");
        assert_eq!(found[0]["id"], "1");
    }
    // The entry already in the log gets its organisation from its body.
    let mut l = db(&s).await;
    organisations_filled_in(&mut l).await;
    let found = audit(&s, &admin, "agent=Organization/h1").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["id"], "0");
    let r = verify(&s, &[]);
    assert_eq!(r["verified"], true, "{r}");
    assert!(r["size"].as_u64().unwrap() >= 2, "{r}");
}

/// How many times SQLite has started the write-ahead log `wal` afresh: the
/// checkpoint sequence number in its header (big-endian, at byte
/// 12; SQLite adds one at each restart).
fn wal_restarts(wal: &str) -> u32 {
    let header = std::fs::read(wal).unwrap_or_default();
    header
        .get(12..16)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

#[tokio::test]
async fn the_logs_write_ahead_log_starts_afresh_under_steady_load() {
    // SQLite only: the log's own file and its write-ahead log.
    if on_postgres() {
        return;
    }
    let s = TestServer::start().await;
    let w = world(&s).await;
    let wal = format!(
        "{}-wal",
        ehrx::store::sqlite_audit_path(&s.database_url).unwrap()
    );
    let before = wal_restarts(&wal);
    // Eight readers without a pause for two seconds: the writer is never
    // idle long enough for a checkpoint beside it to copy every frame.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let readers = (0..8).map(|_| async {
        let mut n = 0;
        while std::time::Instant::now() < until {
            assert_eq!(get(&s, &w.admin, "Patient/pa").await.0, 200);
            n += 1;
        }
        n
    });
    let reads: usize = futures_util::future::join_all(readers)
        .await
        .into_iter()
        .sum();
    let after = wal_restarts(&wal);
    // A checkpoint every 250 ms, each finished by the writer: the log
    // starts again from its first frame several times.
    assert!(
        after >= before + 3,
        "restarts {before} -> {after} over {reads} reads"
    );
}

#[tokio::test]
async fn a_log_kept_in_the_database_file_moves_to_its_own_file_on_upgrade() {
    // SQLite only: PostgreSQL keeps the log in its database.
    if on_postgres() {
        return;
    }
    // A database as the releases before the log's own file left it: the
    // migrations up to 0010, and entries in the database file.
    let dir = tempfile::tempdir().unwrap();
    let (url, mut c) = migrated_before(dir.path(), "0011", false).await;
    for seq in 0..3i64 {
        let body = format!(
            "{{\"resourceType\":\"AuditEvent\",\"id\":\"{seq}\",\"recorded\":\"2001-01-01T00:00:0{seq}.000Z\"}}"
        );
        let digest = hex::encode(Sha256::digest(body.as_bytes()));
        sqlx::query(
            "INSERT INTO audit_entry (seq, recorded, body, digest) VALUES ($1, $2, $3, $4)",
        )
        .bind(seq)
        .bind(format!("2001-01-01T00:00:0{seq}.000Z"))
        .bind(&body)
        .bind(&digest)
        .execute(&mut c)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO audit_head (id, size) VALUES (1, 3)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();

    // This release opens it.
    let store = ehrx::store::Store::open(&url, 2, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    store.close().await;
    let mut c = sqlx::AnyConnection::connect(&url).await.unwrap();
    let in_main = number(
        &mut c,
        "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('audit_entry', 'audit_head')",
    )
    .await;
    assert_eq!(in_main, 0);
    let log = format!("sqlite:{}", ehrx::store::sqlite_audit_path(&url).unwrap());
    let mut l = sqlx::AnyConnection::connect(&log).await.unwrap();
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT seq, digest FROM audit_entry ORDER BY seq")
            .fetch_all(&mut l)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3);
    let (size, drained): (i64, i64) =
        sqlx::query_as("SELECT size, drained FROM audit_head WHERE id = 1")
            .fetch_one(&mut l)
            .await
            .unwrap();
    assert_eq!((size, drained), (3, 0));
    // The moved log still verifies, entry by entry.
    let report = ehrx::store::audit::verify(
        &ehrx::store::Store::open(&url, 2, std::time::Duration::from_secs(30))
            .await
            .unwrap(),
        None,
    )
    .await
    .unwrap();
    let report = serde_json::to_value(&report).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["size"], 3, "{report}");
}
