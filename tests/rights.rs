//! Patients' rights and four-eyes amendments, through HTTP with real
//! tokens for each role: a patient edits only their demographics and
//! their own patient-reported data, asks for corrections of the rest, and
//! writes only their own Consents; a practitioner's change of a clinical
//! record waits for a second practitioner; a practitioner records a
//! Consent only with a Provenance naming them.

mod common;

use common::smart::{admin_token, app_token, cli, fhir, practitioner_user, public_client};
use common::TestServer;
use ehrx::policy::rights::{DEMOGRAPHIC, PATIENT_REPORTED, QUEUE};
use reqwest::Method;
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";

/// A server, two practitioners (A and B) who are the general
/// practitioners of patient P, another patient Q, and their tokens.
struct World {
    s: TestServer,
    admin: String,
    p: String,
    q: String,
    a: String,
    b: String,
    dr_a: String,
    dr_b: String,
    pat: String,
}

async fn create(s: &TestServer, token: &str, body: Value) -> Value {
    let rtype = body["resourceType"].as_str().unwrap().to_string();
    let (st, v) = fhir(s, token, Method::POST, &rtype, Some(&body)).await;
    assert_eq!(st, 201, "{v}");
    v
}

async fn user_token(s: &TestServer, username: &str, fhir_user: &str, scope: &str) -> String {
    let out = cli(
        s,
        &[
            "user",
            "add",
            "--username",
            username,
            "--password-stdin",
            "--fhir-user",
            fhir_user,
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    assert_eq!(out["fhirUser"], fhir_user);
    let client = public_client(s, &format!("openid fhirUser {scope}"));
    let t = app_token(
        s,
        &client,
        &format!("openid fhirUser {scope}"),
        Some((username, PASSWORD)),
        &[],
    )
    .await;
    t["access_token"].as_str().unwrap().to_string()
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(adjust: impl FnOnce(&mut ehrx::config::Config)) -> World {
    let s = TestServer::start_authorized(adjust).await;
    let admin = admin_token(&s).await;
    let a = create(
        &s,
        &admin,
        json!({"resourceType": "Practitioner", "name": [{"family": "A"}]}),
    )
    .await;
    let b = create(
        &s,
        &admin,
        json!({"resourceType": "Practitioner", "name": [{"family": "B"}]}),
    )
    .await;
    let a = a["id"].as_str().unwrap().to_string();
    let b = b["id"].as_str().unwrap().to_string();
    let gps = json!([{"reference": format!("Practitioner/{a}")}, {"reference": format!("Practitioner/{b}")}]);
    let p = create(
        &s,
        &admin,
        json!({"resourceType": "Patient", "name": [{"family": "P"}], "birthDate": "1970-01-01",
            "active": true, "generalPractitioner": gps}),
    )
    .await;
    let q = create(
        &s,
        &admin,
        json!({"resourceType": "Patient", "name": [{"family": "Q"}], "generalPractitioner": gps}),
    )
    .await;
    let p = p["id"].as_str().unwrap().to_string();
    let q = q["id"].as_str().unwrap().to_string();
    practitioner_user(&s, "dr.a", &a);
    practitioner_user(&s, "dr.b", &b);
    let dr_a = practitioner_login(&s, "dr.a").await;
    let dr_b = practitioner_login(&s, "dr.b").await;
    let pat = user_token(
        &s,
        "p@example.org",
        &format!("Patient/{p}"),
        "patient/*.cruds",
    )
    .await;
    World {
        s,
        admin,
        p,
        q,
        a,
        b,
        dr_a,
        dr_b,
        pat,
    }
}

async fn practitioner_login(s: &TestServer, username: &str) -> String {
    practitioner_login_with(s, username, "user/*.cruds").await
}

async fn practitioner_login_with(s: &TestServer, username: &str, scope: &str) -> String {
    let scope = format!("openid fhirUser {scope}");
    let client = public_client(s, &scope);
    let t = app_token(s, &client, &scope, Some((username, PASSWORD)), &[]).await;
    t["access_token"].as_str().unwrap().to_string()
}

impl World {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        fhir(&self.s, token, method, path, body).await
    }

    async fn read(&self, path: &str) -> Value {
        let (st, v) = self.call(&self.admin, Method::GET, path, None).await;
        assert_eq!(st, 200, "{path}: {v}");
        v
    }

    /// An Observation of P recorded by practitioner A.
    async fn clinicians_observation(&self) -> Value {
        create(
            &self.s,
            &self.dr_a,
            json!({"resourceType": "Observation", "status": "final",
                "code": {"text": "body weight"},
                "subject": {"reference": format!("Patient/{}", self.p)},
                "valueQuantity": {"value": 70, "unit": "kg"}}),
        )
        .await
    }

    /// A proposes a new value for `obs`: the Task.
    async fn propose(&self, obs: &Value, value: i64) -> Value {
        let mut changed = obs.clone();
        changed["valueQuantity"]["value"] = json!(value);
        let path = format!("Observation/{}", obs["id"].as_str().unwrap());
        let (st, task) = self
            .call(&self.dr_a, Method::PUT, &path, Some(&changed))
            .await;
        assert_eq!(st, 202, "{task}");
        task
    }
}

fn id(v: &Value) -> &str {
    v["id"].as_str().unwrap()
}

fn version(v: &Value) -> &str {
    v["meta"]["versionId"].as_str().unwrap()
}

fn issue_expression(outcome: &Value) -> &str {
    outcome["issue"][0]["expression"][0].as_str().unwrap_or("")
}

/// A valid value of each demographic element of Patient.
fn demographic_value(element: &str) -> Value {
    match element {
        "name" => json!([{"family": "Renamed", "given": ["Pat"]}]),
        "telecom" => json!([{"system": "phone", "value": "+41 00 000 00 00"}]),
        "address" => json!([{"line": ["1 Main Street"], "city": "Bern"}]),
        "contact" => json!([{"name": {"family": "Next-of-kin"}}]),
        "communication" => json!([{"language": {"text": "French"}}]),
        "maritalStatus" => json!({"text": "married"}),
        "photo" => json!([{"contentType": "image/png", "data": "iVBORw0KGgo="}]),
        "gender" => json!("female"),
        other => panic!("no sample value for demographic element {other}"),
    }
}

#[tokio::test]
async fn each_demographic_element_is_the_patients_to_change() {
    let w = world().await;
    let path = format!("Patient/{}", w.p);
    for element in DEMOGRAPHIC {
        let mut mine = w.read(&path).await;
        let value = demographic_value(element);
        mine[*element] = value.clone();
        let (st, v) = w.call(&w.pat, Method::PUT, &path, Some(&mine)).await;
        assert_eq!(st, 200, "{element}: {v}");
        assert_eq!(w.read(&path).await[*element], value, "{element}");
    }
}

#[tokio::test]
async fn each_other_element_of_their_patient_is_refused_by_name() {
    let w = world().await;
    let path = format!("Patient/{}", w.p);
    let others = [
        ("birthDate", json!("1980-02-02")),
        ("active", json!(false)),
        ("identifier", json!([{"system": "urn:x", "value": "1"}])),
        (
            "generalPractitioner",
            json!([{"reference": format!("Practitioner/{}", w.a)}]),
        ),
        ("managingOrganization", json!({"display": "Elsewhere"})),
        ("deceasedBoolean", json!(true)),
        ("multipleBirthBoolean", json!(false)),
        (
            "extension",
            json!([{"url": "urn:x:ext", "valueString": "x"}]),
        ),
        (
            "link",
            json!([{"other": {"reference": format!("Patient/{}", w.q)}, "type": "seealso"}]),
        ),
    ];
    for (element, value) in others {
        assert!(!DEMOGRAPHIC.contains(&element));
        let before = w.read(&path).await;
        let mut mine = before.clone();
        mine[element] = value;
        let (st, outcome) = w.call(&w.pat, Method::PUT, &path, Some(&mine)).await;
        assert_eq!(st, 403, "{element}: {outcome}");
        assert_eq!(
            issue_expression(&outcome),
            format!("Patient.{element}"),
            "{outcome}"
        );
        assert!(outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains(element));
        assert_eq!(version(&w.read(&path).await), version(&before), "{element}");
    }
}

#[tokio::test]
async fn a_patient_cannot_change_or_delete_a_clinicians_observation() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let path = format!("Observation/{}", id(&obs));
    let mut changed = obs.clone();
    changed["valueQuantity"]["value"] = json!(60);
    let (st, outcome) = w.call(&w.pat, Method::PUT, &path, Some(&changed)).await;
    assert_eq!(st, 403, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("$correction-request"));
    let (st, outcome) = w.call(&w.pat, Method::DELETE, &path, None).await;
    assert_eq!(st, 403, "{outcome}");
    let now = w.read(&path).await;
    assert_eq!(version(&now), "1");
    assert_eq!(now["valueQuantity"]["value"], json!(70));
}

#[tokio::test]
async fn a_patients_own_observation_is_tagged_has_their_provenance_and_stays_theirs_to_edit() {
    let w = world().await;
    let mut obs = create(
        &w.s,
        &w.pat,
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "mood"},
            "subject": {"reference": format!("Patient/{}", w.p)}, "valueString": "good"}),
    )
    .await;
    let tags = obs["meta"]["tag"].as_array().unwrap();
    assert!(tags
        .iter()
        .any(|t| t["system"] == PATIENT_REPORTED.0 && t["code"] == PATIENT_REPORTED.1));
    let (st, provs) = w
        .call(
            &w.pat,
            Method::GET,
            &format!("Provenance?target=Observation/{}", id(&obs)),
            None,
        )
        .await;
    assert_eq!(st, 200, "{provs}");
    assert_eq!(provs["total"], 1, "{provs}");
    let prov = &provs["entry"][0]["resource"];
    assert_eq!(
        prov["agent"][0]["who"]["reference"],
        format!("Patient/{}", w.p)
    );
    assert_eq!(prov["agent"][0]["type"]["coding"][0]["code"], "author");
    // The patient edits and deletes their own data.
    obs["valueString"] = json!("better");
    let path = format!("Observation/{}", id(&obs));
    let (st, v) = w.call(&w.pat, Method::PUT, &path, Some(&obs)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(version(&v), "2");
    let (st, _) = w.call(&w.pat, Method::DELETE, &path, None).await;
    assert_eq!(st, 204);
}

#[tokio::test]
async fn a_practitioners_update_is_a_pending_amendment_and_the_record_is_unchanged() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let mut changed = obs.clone();
    changed["valueQuantity"]["value"] = json!(72);
    let path = format!("Observation/{}", id(&obs));
    let r =
        w.s.client
            .put(w.s.url(&path))
            .bearer_auth(&w.dr_a)
            .header("Content-Type", "application/fhir+json")
            .body(changed.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let task: Value = r.json().await.unwrap();
    assert!(
        location.contains(&format!("/Task/{}/_history/1", id(&task))),
        "{location}"
    );
    assert_eq!(task["status"], "requested");
    assert_eq!(task["focus"]["reference"], format!("{path}/_history/1"));
    assert_eq!(
        task["requester"]["reference"],
        format!("Practitioner/{}", w.a)
    );
    assert_eq!(task["for"]["reference"], format!("Patient/{}", w.p));
    assert_eq!(task["contained"][0]["valueQuantity"]["value"], json!(72));
    let now = w.read(&path).await;
    assert_eq!(version(&now), "1");
    assert_eq!(now["valueQuantity"]["value"], json!(70));
    // The other practitioner finds it in the queue.
    let (st, queue) = w
        .call(
            &w.dr_b,
            Method::GET,
            &format!("Task?_tag={}|{}&status=requested", QUEUE.0, QUEUE.1),
            None,
        )
        .await;
    assert_eq!(st, 200, "{queue}");
    assert_eq!(queue["total"], 1, "{queue}");
}

#[tokio::test]
async fn a_second_practitioner_approves_and_the_record_changes_with_an_amend_provenance() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let task = w.propose(&obs, 73).await;
    let (st, done) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&task)),
            None,
        )
        .await;
    assert_eq!(st, 200, "{done}");
    assert_eq!(done["status"], "completed");
    let path = format!("Observation/{}", id(&obs));
    let now = w.read(&path).await;
    assert_eq!(version(&now), "2");
    assert_eq!(now["valueQuantity"]["value"], json!(73));
    assert_eq!(
        done["output"][0]["valueReference"]["reference"],
        format!("{path}/_history/2")
    );
    let (_, provs) = w
        .call(
            &w.dr_b,
            Method::GET,
            &format!("Provenance?target={path}"),
            None,
        )
        .await;
    assert_eq!(provs["total"], 1, "{provs}");
    let prov = &provs["entry"][0]["resource"];
    let activity: Vec<&str> = prov["activity"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["code"].as_str())
        .collect();
    assert!(activity.contains(&"amend"), "{prov}");
    let agents: Vec<(String, String)> = prov["agent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["type"]["coding"][0]["code"].as_str().unwrap().to_string(),
                a["who"]["reference"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        agents.contains(&("author".into(), format!("Practitioner/{}", w.a))),
        "{agents:?}"
    );
    assert!(
        agents.contains(&("verifier".into(), format!("Practitioner/{}", w.b))),
        "{agents:?}"
    );
    assert_eq!(prov["signature"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn self_approval_is_refused() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let task = w.propose(&obs, 74).await;
    let task_path = format!("Task/{}", id(&task));
    let (st, outcome) = w
        .call(
            &w.dr_a,
            Method::POST,
            &format!("{task_path}/$approve"),
            None,
        )
        .await;
    assert_eq!(st, 403, "{outcome}");
    assert_eq!(w.read(&task_path).await["status"], "requested");
    assert_eq!(
        version(&w.read(&format!("Observation/{}", id(&obs))).await),
        "1"
    );
}

#[tokio::test]
async fn concurrent_approvals_give_exactly_one_new_version() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let task = w.propose(&obs, 75).await;
    let path = format!("Task/{}/$approve", id(&task));
    let calls = (0..10).map(|_| w.call(&w.dr_b, Method::POST, &path, None));
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|(st, _)| st)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    let history = w.read(&format!("Observation/{}/_history", id(&obs))).await;
    assert_eq!(history["entry"].as_array().unwrap().len(), 2, "{history}");
}

#[tokio::test]
async fn an_amendment_proposed_on_a_version_since_replaced_fails_with_409() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let first = w.propose(&obs, 76).await;
    let stale = w.propose(&obs, 77).await;
    let (st, _) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&first)),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, outcome) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&stale)),
            None,
        )
        .await;
    assert_eq!(st, 409, "{outcome}");
    let now = w.read(&format!("Observation/{}", id(&obs))).await;
    assert_eq!(version(&now), "2");
    assert_eq!(now["valueQuantity"]["value"], json!(76));
    assert_eq!(
        w.read(&format!("Task/{}", id(&stale))).await["status"],
        "requested"
    );
}

#[tokio::test]
async fn a_rejection_leaves_the_record_unchanged_with_the_reason() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let task = w.propose(&obs, 78).await;
    let reason = json!({"resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "the scale was not calibrated"}]});
    let (st, done) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$reject", id(&task)),
            Some(&reason),
        )
        .await;
    assert_eq!(st, 200, "{done}");
    assert_eq!(done["status"], "rejected");
    assert_eq!(done["statusReason"]["text"], "the scale was not calibrated");
    let now = w.read(&format!("Observation/{}", id(&obs))).await;
    assert_eq!(version(&now), "1");
    assert_eq!(now["valueQuantity"]["value"], json!(70));
    // A decided Task is decided once.
    let (st, _) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&task)),
            None,
        )
        .await;
    assert_eq!(st, 409);
}

#[tokio::test]
async fn a_practitioners_delete_waits_for_approval_too() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let path = format!("Observation/{}", id(&obs));
    let (st, task) = w.call(&w.dr_a, Method::DELETE, &path, None).await;
    assert_eq!(st, 202, "{task}");
    assert_eq!(version(&w.read(&path).await), "1");
    let (st, _) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&task)),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = w.call(&w.admin, Method::GET, &path, None).await;
    assert_eq!(st, 410);
}

#[tokio::test]
async fn a_practitioners_update_in_a_transaction_answers_with_its_task() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let mut changed = obs.clone();
    changed["valueQuantity"]["value"] = json!(79);
    let path = format!("Observation/{}", id(&obs));
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": changed, "request": {"method": "PUT", "url": path}}
    ]});
    let (st, out) = w.call(&w.dr_a, Method::POST, "", Some(&bundle)).await;
    assert_eq!(st, 200, "{out}");
    let response = &out["entry"][0]["response"];
    assert!(
        response["status"].as_str().unwrap().starts_with("202"),
        "{out}"
    );
    assert!(
        response["location"].as_str().unwrap().starts_with("Task/"),
        "{out}"
    );
    assert_eq!(out["entry"][0]["resource"]["status"], "requested");
    assert_eq!(version(&w.read(&path).await), "1");
}

#[tokio::test]
async fn queue_tasks_change_only_through_approve_and_reject() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let mut task = w.propose(&obs, 80).await;
    task["status"] = json!("completed");
    let (st, outcome) = w
        .call(
            &w.dr_b,
            Method::PUT,
            &format!("Task/{}", id(&task)),
            Some(&task),
        )
        .await;
    assert_eq!(st, 403, "{outcome}");
    // Nor can one be made up by a client.
    let mut forged = task.clone();
    forged.as_object_mut().unwrap().remove("id");
    let (st, _) = w.call(&w.dr_b, Method::POST, "Task", Some(&forged)).await;
    assert_eq!(st, 403);
}

#[tokio::test]
async fn a_correction_request_reaches_the_queue_and_the_patient_follows_it() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let request = json!({"resourceType": "Communication", "status": "completed",
        "about": [{"reference": format!("Observation/{}", id(&obs))}],
        "payload": [{"contentString": "I weighed 60 kg, not 70."}]});
    let (st, task) = w
        .call(
            &w.pat,
            Method::POST,
            &format!("Patient/{}/$correction-request", w.p),
            Some(&request),
        )
        .await;
    assert_eq!(st, 201, "{task}");
    let task_path = format!("Task/{}", id(&task));
    // The patient follows the Task with their own token.
    let (st, mine) = w.call(&w.pat, Method::GET, &task_path, None).await;
    assert_eq!(st, 200, "{mine}");
    assert_eq!(mine["status"], "requested");
    assert_eq!(mine["businessStatus"]["coding"][0]["code"], "queued");
    // It sits in the practitioners' queue.
    let (_, queue) = w
        .call(
            &w.dr_b,
            Method::GET,
            &format!("Task?_tag={}|{}", QUEUE.0, QUEUE.1),
            None,
        )
        .await;
    assert!(
        queue["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["resource"]["id"] == task["id"]),
        "{queue}"
    );
    // A practitioner rejects it; the patient sees the decision.
    let reason = json!({"resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "measured twice that day"}]});
    let (st, _) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("{task_path}/$reject"),
            Some(&reason),
        )
        .await;
    assert_eq!(st, 200);
    let (_, mine) = w.call(&w.pat, Method::GET, &task_path, None).await;
    assert_eq!(mine["status"], "rejected");
    assert_eq!(mine["businessStatus"]["coding"][0]["code"], "denied");
    assert_eq!(mine["statusReason"]["text"], "measured twice that day");
    // A second request is accepted.
    let (_, again) = w
        .call(
            &w.pat,
            Method::POST,
            &format!("Patient/{}/$correction-request", w.p),
            Some(&request),
        )
        .await;
    let again_path = format!("Task/{}", id(&again));
    let (st, _) = w
        .call(
            &w.dr_a,
            Method::POST,
            &format!("{again_path}/$approve"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (_, mine) = w.call(&w.pat, Method::GET, &again_path, None).await;
    assert_eq!(mine["status"], "completed");
    assert_eq!(mine["businessStatus"]["coding"][0]["code"], "accepted");
    // Nobody else asks in the patient's name.
    let (st, _) = w
        .call(
            &w.dr_a,
            Method::POST,
            &format!("Patient/{}/$correction-request", w.p),
            Some(&request),
        )
        .await;
    assert_eq!(st, 403);
}

fn consent(patient: &str, actor: &str) -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit", "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
            "reference": {"reference": actor}}]}})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[tokio::test]
async fn a_practitioners_consent_without_a_provenance_naming_them_is_refused() {
    let w = world().await;
    let c = consent(&w.p, &format!("Practitioner/{}", w.b));
    let (st, outcome) = w.call(&w.dr_a, Method::POST, "Consent", Some(&c)).await;
    assert_eq!(st, 422, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("Provenance"));
    // A Provenance naming someone else does not do either.
    let bundle = transaction(vec![
        json!({"fullUrl": "urn:uuid:4f7d1c3e-0000-4000-8000-000000000001", "resource": c,
            "request": {"method": "POST", "url": "Consent"}}),
        json!({"resource": {"resourceType": "Provenance", "recorded": "2026-01-01T00:00:00Z",
            "target": [{"reference": "urn:uuid:4f7d1c3e-0000-4000-8000-000000000001"},
                       {"reference": format!("Patient/{}", w.p)}],
            "agent": [{"who": {"reference": format!("Practitioner/{}", w.b)}}]},
            "request": {"method": "POST", "url": "Provenance"}}),
    ]);
    let (st, outcome) = w.call(&w.dr_a, Method::POST, "", Some(&bundle)).await;
    assert_eq!(st, 422, "{outcome}");
    let (_, all) = w.call(&w.admin, Method::GET, "Consent", None).await;
    assert_eq!(all["total"], 0, "{all}");
}

#[tokio::test]
async fn a_practitioners_consent_with_a_provenance_naming_them_is_recorded() {
    let w = world().await;
    let c = consent(&w.p, &format!("Practitioner/{}", w.b));
    let bundle = transaction(vec![
        json!({"fullUrl": "urn:uuid:4f7d1c3e-0000-4000-8000-000000000002", "resource": c,
            "request": {"method": "POST", "url": "Consent"}}),
        json!({"resource": {"resourceType": "Provenance", "recorded": "2026-01-01T00:00:00Z",
            "target": [{"reference": "urn:uuid:4f7d1c3e-0000-4000-8000-000000000002"},
                       {"reference": format!("Patient/{}", w.p)}],
            "agent": [{"who": {"reference": format!("Practitioner/{}", w.a)},
                       "onBehalfOf": {"reference": format!("Patient/{}", w.p)}}]},
            "request": {"method": "POST", "url": "Provenance"}}),
    ]);
    let (st, out) = w.call(&w.dr_a, Method::POST, "", Some(&bundle)).await;
    assert_eq!(st, 200, "{out}");
    assert!(out["entry"][0]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("201"));
    let (_, all) = w.call(&w.admin, Method::GET, "Consent", None).await;
    assert_eq!(all["total"], 1, "{all}");
}

#[tokio::test]
async fn a_patient_writes_their_own_consents_and_nobody_elses() {
    let w = world().await;
    let mine = consent(&w.p, &format!("Practitioner/{}", w.b));
    let mut mine = create(&w.s, &w.pat, mine).await;
    // Changes and revokes it.
    mine["status"] = json!("inactive");
    let (st, v) = w
        .call(
            &w.pat,
            Method::PUT,
            &format!("Consent/{}", id(&mine)),
            Some(&mine),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Another patient's Consent is not theirs to write.
    let theirs = consent(&w.q, &format!("Practitioner/{}", w.b));
    let (st, outcome) = w.call(&w.pat, Method::POST, "Consent", Some(&theirs)).await;
    assert_eq!(st, 403, "{outcome}");
    let (_, all) = w
        .call(
            &w.admin,
            Method::GET,
            &format!("Consent?patient=Patient/{}", w.q),
            None,
        )
        .await;
    assert_eq!(all["total"], 0);
}

#[tokio::test]
async fn consent_provisions_nested_deeper_than_three_levels_are_refused() {
    let w = world().await;
    let mut c = consent(&w.p, &format!("Practitioner/{}", w.b));
    c["provision"]["provision"] = json!([{"type": "deny", "provision": [{"type": "permit", "provision": [{"type": "deny"}]}]}]);
    let (st, outcome) = w.call(&w.pat, Method::POST, "Consent", Some(&c)).await;
    assert_eq!(st, 422, "{outcome}");
    assert_eq!(
        issue_expression(&outcome),
        "Consent.provision.provision.provision.provision"
    );
    // Three levels are fine.
    c["provision"]["provision"][0]["provision"][0]
        .as_object_mut()
        .unwrap()
        .remove("provision");
    let (st, v) = w.call(&w.pat, Method::POST, "Consent", Some(&c)).await;
    assert_eq!(st, 201, "{v}");
}

#[tokio::test]
async fn a_practitioners_patch_is_a_pending_amendment_too() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let path = format!("Observation/{}", id(&obs));
    let patch = json!([{"op": "replace", "path": "/valueQuantity/value", "value": 81}]);
    let r =
        w.s.client
            .patch(w.s.url(&path))
            .bearer_auth(&w.dr_a)
            .header("Content-Type", "application/json-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 202);
    let task: Value = r.json().await.unwrap();
    assert_eq!(task["contained"][0]["valueQuantity"]["value"], json!(81));
    assert_eq!(version(&w.read(&path).await), "1");
}

#[tokio::test]
async fn a_practitioner_changes_demographics_directly_and_other_patient_elements_by_amendment() {
    let w = world().await;
    let path = format!("Patient/{}", w.p);
    let mut p = w.read(&path).await;
    p["telecom"] = json!([{"system": "email", "value": "p@example.org"}]);
    let (st, v) = w.call(&w.dr_a, Method::PUT, &path, Some(&p)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(version(&v), "2");
    let mut p = w.read(&path).await;
    p["birthDate"] = json!("1970-01-02");
    let (st, task) = w.call(&w.dr_a, Method::PUT, &path, Some(&p)).await;
    assert_eq!(st, 202, "{task}");
    assert_eq!(w.read(&path).await["birthDate"], "1970-01-01");
    let (st, _) = w
        .call(
            &w.dr_b,
            Method::POST,
            &format!("Task/{}/$approve", id(&task)),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(w.read(&path).await["birthDate"], "1970-01-02");
}

#[tokio::test]
async fn a_related_person_the_patient_trusts_still_cannot_write_their_consent() {
    let w = world().await;
    let rp = create(
        &w.s,
        &w.admin,
        json!({"resourceType": "RelatedPerson", "patient": {"reference": format!("Patient/{}", w.p)},
            "name": [{"family": "Carer"}]}),
    )
    .await;
    let rp_ref = format!("RelatedPerson/{}", id(&rp));
    // The patient lets the related person see and correct their record.
    create(&w.s, &w.pat, consent(&w.p, &rp_ref)).await;
    let carer = user_token(&w.s, "carer@example.org", &rp_ref, "user/*.cruds").await;
    let (st, me) = w
        .call(&carer, Method::GET, &format!("Patient/{}", w.p), None)
        .await;
    assert_eq!(st, 200, "the Consent lets the related person read: {me}");
    let (st, outcome) = w
        .call(
            &carer,
            Method::POST,
            "Consent",
            Some(&consent(&w.p, &rp_ref)),
        )
        .await;
    assert_eq!(st, 403, "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("may not write a patient's Consent"),
        "{outcome}"
    );
}

#[tokio::test]
async fn amendment_types_name_the_gated_types() {
    let w = world_with(|c| c.amendment_types = Some(vec!["Condition".into()])).await;
    let obs = w.clinicians_observation().await;
    let mut changed = obs.clone();
    changed["valueQuantity"]["value"] = json!(82);
    let path = format!("Observation/{}", id(&obs));
    let (st, v) = w.call(&w.dr_a, Method::PUT, &path, Some(&changed)).await;
    assert_eq!(st, 200, "Observation is not gated here: {v}");
    assert_eq!(version(&v), "2");
    let condition = create(
        &w.s,
        &w.dr_a,
        json!({"resourceType": "Condition", "code": {"text": "asthma"},
            "subject": {"reference": format!("Patient/{}", w.p)}}),
    )
    .await;
    let (st, _) = w
        .call(
            &w.dr_a,
            Method::DELETE,
            &format!("Condition/{}", id(&condition)),
            None,
        )
        .await;
    assert_eq!(st, 202);
}

#[tokio::test]
async fn an_amendment_needs_a_token_that_may_create_its_task() {
    let w = world().await;
    let obs = w.clinicians_observation().await;
    let narrow = practitioner_login_with(&w.s, "dr.a", "user/Observation.cruds").await;
    let mut changed = obs.clone();
    changed["valueQuantity"]["value"] = json!(83);
    let path = format!("Observation/{}", id(&obs));
    let (st, outcome) = w.call(&narrow, Method::PUT, &path, Some(&changed)).await;
    assert_eq!(st, 403, "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Task"),
        "{outcome}"
    );
    assert_eq!(version(&w.read(&path).await), "1");
}
