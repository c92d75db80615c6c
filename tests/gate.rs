//! No oracle: a `patient/*.cruds` token for patient A learns nothing about
//! patient B.
//!
//! Every check makes the same request twice as A: once naming B's real data
//! (B's resource, or criteria that match only B's data) and once naming
//! something that does not exist (a fresh id, or criteria that match
//! nothing). The two answers must be identical once each differing value
//! and its counterpart are replaced by one placeholder: the status, the
//! headers that describe the answer (`Content-Type`, `ETag`, `Location`,
//! `Content-Location`) and the body — OperationOutcome text, Bundle total
//! and entries included. Only what changes from one request to the next
//! whatever the data (a Bundle's own id, `lastUpdated`, `lastModified`, the
//! ids the server chooses for what the two requests create) is left out of
//! the comparison.
//! Afterwards B's data, read with an unrestricted token, is unchanged.
//!
//! The data: every R4 example, and for B one resource of every type that
//! can carry a reference to a patient (an R4 example of the type with all
//! its patient references pointing to B), with a few more of B's made to
//! be matched by the criteria below. A is `Patient/example` of the R4
//! examples, and reaches the server through an EHR launch.

mod common;

use std::collections::BTreeMap;

use common::smart::{admin_token, all_pages, fhir, get, load_r4_examples, patient_token};
use common::{first_difference, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// Patient A: the R4 examples' patient.
const A: &str = "example";
/// Identifier and code systems of the data made for these tests.
const MRN: &str = "urn:ehrx-test:mrn";
const OBS_ID: &str = "urn:ehrx-test:observation";
const CODES: &str = "urn:ehrx-test:code";

/// Types outside the Patient compartment that hold one patient's data.
const PATIENT_DATA_OUTSIDE_THE_COMPARTMENT: [&str; 4] =
    ["Device", "Task", "Contract", "GuidanceResponse"];

/// More types outside the Patient compartment that can carry a reference
/// to a patient.
const ALSO_REFERRING_TO_PATIENTS: [&str; 5] = [
    "Linkage",
    "VerificationResult",
    "MessageHeader",
    "Bundle",
    "Binary",
];

/// Shared reference data of the R4 examples, `(type, id)`.
const SHARED: [(&str, &str); 8] = [
    ("Organization", "1"),
    ("Practitioner", "example"),
    ("PractitionerRole", "example"),
    ("Location", "1"),
    ("Medication", "med0301"),
    ("Substance", "example"),
    ("ValueSet", "example-extensional"),
    ("CodeSystem", "example"),
];

/// Types a `patient/` token reaches through no interaction at all.
const UNREACHABLE: [&str; 3] = ["Bundle", "MessageHeader", "Binary"];

fn hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A new id or value for B's data.
fn b_value() -> String {
    format!("b{}", hex())
}

/// An id or value that names nothing (as long as a value of B's).
fn missing() -> String {
    format!("n{}", hex())
}

fn compartments() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/compartments.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The types of the Patient compartment, each with its parameters.
///
/// AuditEvent is left out: the server records AuditEvents itself (they
/// cannot be written through the API) and their reach is tested in
/// `tests/audit.rs`.
fn compartment_types() -> Vec<(String, Vec<String>)> {
    compartments()["Patient"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.as_str() != "AuditEvent")
        .map(|(t, ps)| {
            let ps = ps
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            (t.clone(), ps)
        })
        .collect()
}

/// Whether a reference string names a Patient (`Patient/x`, absolute or
/// versioned).
fn is_patient_reference(r: &str) -> bool {
    r.match_indices("Patient/")
        .any(|(i, _)| i == 0 || r.as_bytes()[i - 1] == b'/')
}

fn refers_to_a_patient(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, x)| {
            (k == "reference" && x.as_str().is_some_and(is_patient_reference))
                || refers_to_a_patient(x)
        }),
        Value::Array(a) => a.iter().any(refers_to_a_patient),
        _ => false,
    }
}

/// Points every patient reference in `v` to `Patient/{patient}`.
fn point_patients_to(v: &mut Value, patient: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match x {
                    Value::String(r) if k == "reference" && is_patient_reference(r) => {
                        *r = format!("Patient/{patient}")
                    }
                    _ => point_patients_to(x, patient),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| point_patients_to(x, patient)),
        _ => {}
    }
}

/// The R4 examples by type, each type's in file-name order.
fn examples_by_type() -> BTreeMap<String, Vec<Value>> {
    let dir = common::data_dir().join("fhir-examples/r4-json");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in files {
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let t = v["resourceType"].as_str().unwrap().to_string();
        out.entry(t).or_default().push(v);
    }
    out
}

/// An example of `rtype` made `patient`'s: the first example that refers
/// to a patient, all its patient references pointing to `patient`; for a
/// type whose examples refer to none, the reference goes where the type
/// names its patient.
fn record_of(examples: &BTreeMap<String, Vec<Value>>, rtype: &str, patient: &str) -> Value {
    let of_type = &examples[rtype];
    let mut r = of_type
        .iter()
        .find(|e| refers_to_a_patient(e))
        .unwrap_or(&of_type[0])
        .clone();
    point_patients_to(&mut r, patient);
    let reference = json!({"reference": format!("Patient/{patient}")});
    // The chosen example refers to its patient only where the compartment
    // does not look.
    if rtype == "Provenance" {
        r["target"].as_array_mut().unwrap().push(reference.clone());
    }
    if !refers_to_a_patient(&r) {
        match rtype {
            "Schedule" => r["actor"] = json!([reference]),
            "SupplyDelivery" => r["patient"] = reference,
            "SupplyRequest" => r["deliverTo"] = reference,
            "Device" => r["patient"] = reference,
            "Linkage" => r["item"]
                .as_array_mut()
                .unwrap()
                .push(json!({"type": "alternate", "resource": reference})),
            "VerificationResult" => r["target"] = json!([reference]),
            "Binary" => r["securityContext"] = reference,
            "MessageHeader" => r["focus"] = json!([reference]),
            other => panic!("no R4 example of {other} refers to a patient"),
        }
    }
    r
}

/// Test data and A's token.
struct World {
    s: TestServer,
    admin: String,
    /// A's access token: `patient/*.cruds` with A as the patient context.
    token: String,
    /// Patient B, with a family name and an identifier (`MRN`) of its own.
    b: String,
    b_family: String,
    b_mrn: String,
    /// One resource of B's of every type that can refer to a patient,
    /// `(type, id)`, Patient B included.
    b_records: Vec<(String, String)>,
    /// Each of those as stored.
    b_bodies: BTreeMap<String, Value>,
    /// A's own resources of the types outside the compartment.
    a_outside: Vec<(String, String)>,
    /// Two Observations of B's with the same code (`b_code`); the first has
    /// the identifier `b_obs_id` (`OBS_ID`), the second another one.
    obs_b: [String; 2],
    b_code: String,
    b_obs_id: String,
    /// B's Encounter with an Organization nothing else refers to.
    enc_b: String,
    org_b: String,
    /// B's Observation about A (`focus`), with a code nothing else has.
    b_focus_code: String,
    /// B's Observation in A's Encounter `enc_a[0]`, with a code nothing else
    /// has, and B's Provenance of it.
    b_enc_code: String,
    /// B's deleted Observation.
    deleted_b: String,
    /// Two of A's Encounters alike: B's data refers to the first only.
    enc_a: [String; 2],
    /// Two of A's Observations alike: the first refers to B, B's two
    /// Observations and B's Encounter; the second to `obs_a1_refs`, which
    /// do not exist, in the same places.
    obs_a: [String; 2],
    obs_a1_refs: [String; 4],
    /// A's Patient as stored.
    a_patient: Value,
    /// What an unrestricted reader sees of B's data after building.
    b_state: Value,
}

impl World {
    /// The id of B's record of `rtype`.
    fn b_records_id(&self, rtype: &str) -> &str {
        &self
            .b_records
            .iter()
            .find(|(t, _)| t == rtype)
            .expect("a record of the type")
            .1
    }

    /// Every path of B's data.
    fn b_paths(&self) -> Vec<String> {
        self.b_bodies.keys().cloned().collect()
    }

    /// The values `obs_a[0]` names, and their counterparts in `obs_a[1]`.
    fn obs_a_pairs(&self) -> (Vec<String>, Vec<String>) {
        let mut ones = vec![self.obs_a[0].clone()];
        ones.extend([
            self.b.clone(),
            self.obs_b[0].clone(),
            self.obs_b[1].clone(),
            self.enc_b.clone(),
        ]);
        let mut others = vec![self.obs_a[1].clone()];
        others.extend(self.obs_a1_refs.iter().cloned());
        (ones, others)
    }
}

async fn put(s: &TestServer, token: &str, resource: &Value) -> String {
    let path = format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let (st, r) = fhir(s, token, Method::PUT, &path, Some(resource)).await;
    assert!((200..300).contains(&st), "PUT {path}: {st} {r}");
    path
}

fn observation(patient: &str, code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": CODES, "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")}})
}

fn encounter(patient: &str) -> Value {
    json!({"resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{patient}")}})
}

/// Builds the data and A's token.
async fn world() -> World {
    let s = TestServer::start_secured().await;
    let admin = admin_token(&s).await;
    load_r4_examples(&s, &admin).await;
    let examples = examples_by_type();
    let mut b_bodies = BTreeMap::new();
    let mut store = |path: String, body: Value| {
        b_bodies.insert(path, body);
    };

    let (b, b_family, b_mrn) = (b_value(), b_value(), b_value());
    let patient_b = json!({"resourceType": "Patient", "id": b,
        "identifier": [{"system": MRN, "value": b_mrn}],
        "name": [{"family": b_family, "given": ["Bea"]}],
        "gender": "female", "birthDate": "1970-01-01"});
    store(put(&s, &admin, &patient_b).await, patient_b);
    let mut b_records = vec![("Patient".to_string(), b.clone())];
    let compartment = compartment_types();
    let types: Vec<String> = compartment
        .iter()
        .map(|(t, _)| t.clone())
        .filter(|t| t != "Patient")
        .chain(
            PATIENT_DATA_OUTSIDE_THE_COMPARTMENT
                .iter()
                .chain(&ALSO_REFERRING_TO_PATIENTS)
                .map(|t| t.to_string()),
        )
        .collect();
    for t in &types {
        let mut r = record_of(&examples, t, &b);
        let id = b_value();
        r["id"] = json!(id);
        store(put(&s, &admin, &r).await, r);
        b_records.push((t.clone(), id));
    }
    let mut a_outside = Vec::new();
    for t in PATIENT_DATA_OUTSIDE_THE_COMPARTMENT {
        let mut r = record_of(&examples, t, A);
        let id = format!("a{}", hex());
        r["id"] = json!(id);
        put(&s, &admin, &r).await;
        a_outside.push((t.to_string(), id));
    }

    // Data of B's for the criteria of the conditional interactions, chains,
    // `_has`, includes and reverse includes.
    let org_b = b_value();
    let org =
        json!({"resourceType": "Organization", "id": org_b, "name": format!("Clinic {org_b}")});
    store(put(&s, &admin, &org).await, org);
    let enc_b = b_value();
    let mut enc = encounter(&b);
    enc["id"] = json!(enc_b);
    enc["serviceProvider"] = json!({"reference": format!("Organization/{org_b}")});
    store(put(&s, &admin, &enc).await, enc);
    let (b_code, b_obs_id) = (b_value(), b_value());
    let obs_b = [b_value(), b_value()];
    for (i, id) in obs_b.iter().enumerate() {
        let mut o = observation(&b, &b_code);
        o["id"] = json!(id);
        let ident = if i == 0 { b_obs_id.clone() } else { b_value() };
        o["identifier"] = json!([{"system": OBS_ID, "value": ident}]);
        o["encounter"] = json!({"reference": format!("Encounter/{enc_b}")});
        store(put(&s, &admin, &o).await, o);
    }
    let b_focus_code = b_value();
    let mut o = observation(&b, &b_focus_code);
    o["id"] = json!(b_value());
    o["focus"] = json!([{"reference": format!("Patient/{A}")}]);
    store(put(&s, &admin, &o).await, o);
    let enc_a = [format!("a{}", hex()), format!("a{}", hex())];
    for id in &enc_a {
        let mut e = encounter(A);
        e["id"] = json!(id);
        put(&s, &admin, &e).await;
    }
    let b_enc_code = b_value();
    let on_enc_a = b_value();
    let obs_a = [format!("a{}", hex()), format!("a{}", hex())];
    let mut o = observation(&b, &b_enc_code);
    o["id"] = json!(on_enc_a);
    o["encounter"] = json!({"reference": format!("Encounter/{}", enc_a[0])});
    o["derivedFrom"] = json!([{"reference": format!("Observation/{}", obs_a[0])}]);
    store(put(&s, &admin, &o).await, o);
    let provenance = json!({"resourceType": "Provenance", "id": b_value(),
        "target": [{"reference": format!("Observation/{on_enc_a}")}, {"reference": format!("Patient/{b}")}],
        "recorded": "2024-01-02T03:04:05Z",
        "agent": [{"who": {"reference": "Practitioner/example"}}]});
    store(put(&s, &admin, &provenance).await, provenance);
    let deleted_b = b_value();
    let mut o = observation(&b, &b_value());
    o["id"] = json!(deleted_b);
    let path = put(&s, &admin, &o).await;
    let (st, _) = fhir(&s, &admin, Method::DELETE, &path, None).await;
    assert_eq!(st, 204);
    store(path, o);
    let obs_a1_refs = [missing(), missing(), missing(), missing()];
    for (id, refs) in obs_a.iter().zip([
        [b.clone(), obs_b[0].clone(), obs_b[1].clone(), enc_b.clone()],
        obs_a1_refs.clone(),
    ]) {
        let mut o = observation(A, "refers");
        o["id"] = json!(id);
        o["focus"] = json!([{"reference": format!("Patient/{}", refs[0])}]);
        o["derivedFrom"] = json!([{"reference": format!("Observation/{}", refs[1])}]);
        o["hasMember"] = json!([{"reference": format!("Observation/{}", refs[2])}]);
        o["encounter"] = json!({"reference": format!("Encounter/{}", refs[3])});
        put(&s, &admin, &o).await;
    }

    // B's records are B's: in B's compartment, or found by `patient`.
    let (st, found) = all_pages(&s, &admin, &format!("Patient/{b}/$everything?_count=1000")).await;
    assert_eq!(st, 200);
    let found: Vec<String> = found.into_iter().map(|(_, r)| r).collect();
    let mut not_b_s = Vec::new();
    for (t, id) in &b_records {
        if compartment.iter().any(|(c, _)| c == t) {
            if !found.contains(&format!("{t}/{id}")) {
                not_b_s.push(format!("{t}/{id}"));
            }
        } else if PATIENT_DATA_OUTSIDE_THE_COMPARTMENT.contains(&t.as_str()) {
            let (_, bundle) = get(&s, &admin, &format!("{t}?patient={b}")).await;
            if bundle["total"] != 1 {
                not_b_s.push(format!("{t}/{id}"));
            }
        }
    }
    assert!(not_b_s.is_empty(), "not found as B's: {not_b_s:?}");

    let token = patient_token(&s, A, "patient/*.cruds").await;
    let (_, a_patient) = get(&s, &admin, &format!("Patient/{A}")).await;
    let mut w = World {
        s,
        admin,
        token,
        b,
        b_family,
        b_mrn,
        b_records,
        b_bodies,
        a_outside,
        obs_b,
        b_code,
        b_obs_id,
        enc_b,
        org_b,
        b_focus_code,
        b_enc_code,
        deleted_b,
        enc_a,
        obs_a,
        obs_a1_refs,
        a_patient,
        b_state: Value::Null,
    };
    w.b_state = b_state(&w).await;
    w
}

/// B's data as an unrestricted reader sees it: every version of each of
/// B's resources, and what B's compartment holds.
async fn b_state(w: &World) -> Value {
    let mut out = serde_json::Map::new();
    for path in w.b_paths() {
        let (st, h) = get(&w.s, &w.admin, &format!("{path}/_history")).await;
        out.insert(path, json!({"status": st, "versions": h["entry"]}));
    }
    let (_, mut all) = all_pages(
        &w.s,
        &w.admin,
        &format!("Patient/{}/$everything?_count=1000", w.b),
    )
    .await;
    all.sort();
    out.insert("compartment".into(), json!(all));
    Value::Object(out)
}

async fn assert_b_unchanged(w: &World) {
    let now = b_state(w).await;
    assert!(
        now == w.b_state,
        "B's data changed: {}",
        clip(&first_difference(&w.b_state, &now, ""))
    );
}

/// One request.
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

impl Req {
    fn new(method: Method, path: impl Into<String>, body: Option<Value>) -> Req {
        Req {
            method,
            path: path.into(),
            body,
            headers: Vec::new(),
        }
    }

    fn get(path: impl Into<String>) -> Req {
        Req::new(Method::GET, path, None)
    }

    fn post(path: impl Into<String>, body: Value) -> Req {
        Req::new(Method::POST, path, Some(body))
    }

    fn put(path: impl Into<String>, body: Value) -> Req {
        Req::new(Method::PUT, path, Some(body))
    }

    fn patch(path: impl Into<String>) -> Req {
        Req::new(Method::PATCH, path, Some(language_patch()))
    }

    fn delete(path: impl Into<String>) -> Req {
        Req::new(Method::DELETE, path, None)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Req {
        self.headers.push((name, value.into()));
        self
    }

    fn label(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// A form body (for `POST Type/_search`).
    fn with_form(mut self, form: &str) -> Req {
        self.body = Some(Value::String(form.to_string()));
        self
    }
}

/// A JSON Patch any resource accepts.
fn language_patch() -> Value {
    json!([{"op": "add", "path": "/language", "value": "de"}])
}

/// An answer: status, the headers that describe it, the body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

const DESCRIBING_HEADERS: [&str; 4] = ["content-type", "etag", "location", "content-location"];

async fn send(s: &TestServer, token: &str, r: &Req) -> Reply {
    let mut rb = s
        .client
        .request(r.method.clone(), s.url(&r.path))
        .bearer_auth(token);
    match &r.body {
        // A raw body: its Content-Type is among the headers.
        Some(Value::String(raw)) => rb = rb.body(raw.clone()),
        Some(b) => {
            let ct = if r.method == Method::PATCH {
                "application/json-patch+json"
            } else {
                "application/fhir+json"
            };
            rb = rb.header("Content-Type", ct).body(b.to_string());
        }
        None => {}
    }
    for (k, v) in &r.headers {
        rb = rb.header(*k, v);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = DESCRIBING_HEADERS
        .iter()
        .filter_map(|h| {
            resp.headers()
                .get(*h)
                .map(|v| (h.to_string(), v.to_str().unwrap_or("").to_string()))
        })
        .collect();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// As A.
async fn as_a(w: &World, r: &Req) -> Reply {
    send(&w.s, &w.token, r).await
}

/// The ids of what an answer says was created.
fn created_ids(r: &Reply) -> Vec<String> {
    fn id_in(location: &str) -> Option<String> {
        let parts: Vec<&str> = location.split('/').collect();
        let h = parts.iter().position(|p| *p == "_history")?;
        (h >= 1).then(|| parts[h - 1].to_string())
    }
    let mut out = Vec::new();
    if r.status == 201 {
        out.extend(r.headers.get("location").and_then(|l| id_in(l)));
        out.extend(r.body["id"].as_str().map(str::to_string));
    }
    for e in r.body["entry"].as_array().into_iter().flatten() {
        if e["response"]["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("201"))
        {
            out.extend(e["response"]["location"].as_str().and_then(id_in));
        }
    }
    let mut seen = Vec::new();
    out.retain(|id| {
        let new = !seen.contains(id);
        seen.push(id.clone());
        new
    });
    out
}

/// Leaves out what differs between any two answers whatever the data.
fn strip_volatile(v: &mut Value, top: bool) {
    match v {
        Value::Object(m) => {
            if top && m.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                m.shift_remove("id");
            }
            if let Some(Value::Object(meta)) = m.get_mut("meta") {
                meta.shift_remove("lastUpdated");
            }
            m.shift_remove("lastModified");
            for (_, x) in m.iter_mut() {
                strip_volatile(x, false);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| strip_volatile(x, false)),
        _ => {}
    }
}

fn replace_all(v: &mut Value, subs: &[(String, String)]) {
    match v {
        Value::String(s) => {
            for (from, to) in subs {
                if s.contains(from.as_str()) {
                    *s = s.replace(from.as_str(), to);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_all(x, subs)),
        Value::Object(m) => m.values_mut().for_each(|x| replace_all(x, subs)),
        _ => {}
    }
}

/// Whether `s` starts with a UUID in its hyphenated form (the server's own
/// ids; the ids made here have no hyphens).
fn starts_with_uuid(s: &[u8]) -> bool {
    s.len() >= 36
        && s[..36].iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Names each UUID the server made up (an id it chose) by the order of
/// its first appearance, so two answers compare whatever ids were drawn.
fn rename_uuids(v: &mut Value, seen: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let bytes = s.as_bytes();
            let mut out = String::new();
            let mut i = 0;
            while i < bytes.len() {
                if starts_with_uuid(&bytes[i..]) {
                    let u = s[i..i + 36].to_string();
                    let n = seen.iter().position(|x| *x == u).unwrap_or_else(|| {
                        seen.push(u);
                        seen.len() - 1
                    });
                    out.push_str(&format!("«uuid {n}»"));
                    i += 36;
                } else {
                    let c = s[i..].chars().next().unwrap();
                    out.push(c);
                    i += c.len_utf8();
                }
            }
            *s = out;
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rename_uuids(x, seen)),
        Value::Object(m) => m.values_mut().for_each(|x| rename_uuids(x, seen)),
        _ => {}
    }
}

fn normalized(r: &Reply, subs: &[(String, String)]) -> Value {
    let mut body = r.body.clone();
    strip_volatile(&mut body, true);
    let mut v = json!({"status": r.status, "headers": r.headers, "body": body});
    replace_all(&mut v, subs);
    rename_uuids(&mut v, &mut Vec::new());
    v
}

fn clip(s: &str) -> String {
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Values to replace by placeholders: `(value, placeholder)`.
type Substitutions = Vec<(String, String)>;

/// Makes a Bundle entry naming one value (of B's, or of nothing).
type MakeEntry = Box<dyn Fn(&str) -> Value>;

/// `Ok` if `one` (an answer naming `ones`) and `other` (naming `others`)
/// are the same answer once each value and its counterpart are one
/// placeholder.
fn alike(
    what: &str,
    one: &Reply,
    ones: &[String],
    other: &Reply,
    others: &[String],
) -> Result<(), String> {
    assert_eq!(ones.len(), others.len());
    let mut subs: (Substitutions, Substitutions) = Default::default();
    for (i, (x, y)) in ones.iter().zip(others).enumerate() {
        subs.0.push((x.clone(), format!("«{i}»")));
        subs.1.push((y.clone(), format!("«{i}»")));
    }
    let (c1, c2) = (created_ids(one), created_ids(other));
    if c1.len() == c2.len() {
        for (i, (x, y)) in c1.iter().zip(&c2).enumerate() {
            if x != y && !ones.contains(x) && !others.contains(y) {
                subs.0.push((x.clone(), format!("«new {i}»")));
                subs.1.push((y.clone(), format!("«new {i}»")));
            }
        }
    }
    // Longer values first, should one contain another.
    subs.0
        .sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    subs.1
        .sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    let (a, b) = (normalized(one, &subs.0), normalized(other, &subs.1));
    if a == b {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} ≠ {}: {}",
            one.status,
            other.status,
            clip(&first_difference(&a, &b, ""))
        ))
    }
}

/// The same request twice: naming B's data (`ones`) and naming nothing
/// (`others`).
struct Case {
    one: Req,
    ones: Vec<String>,
    other: Req,
    others: Vec<String>,
}

/// A case made by `make` from one of B's values and a missing one.
fn twin(b_value: &str, make: impl Fn(&str) -> Req) -> Case {
    let m = missing();
    Case {
        one: make(b_value),
        ones: vec![b_value.to_string()],
        other: make(&m),
        others: vec![m],
    }
}

async fn differences(w: &World, cases: &[Case]) -> Vec<String> {
    let mut out = Vec::new();
    for c in cases {
        let one = as_a(w, &c.one).await;
        let other = as_a(w, &c.other).await;
        if let Err(e) = alike(&c.one.label(), &one, &c.ones, &other, &c.others) {
            out.push(e);
        }
    }
    out
}

/// Every case answers alike.
async fn assert_alike(w: &World, cases: &[Case]) {
    let diffs = differences(w, cases).await;
    assert!(
        diffs.is_empty(),
        "{} of {} answers tell B's data from nothing:\n{}",
        diffs.len(),
        cases.len(),
        diffs.join("\n")
    );
}

/// The cases are not vacuous: an unrestricted reader gets different
/// answers for B's data and for nothing.
async fn assert_admin_tells_apart(w: &World, cases: &[Case]) {
    for c in cases {
        let one = send(&w.s, &w.admin, &c.one).await;
        let other = send(&w.s, &w.admin, &c.other).await;
        assert!(
            alike(&c.one.label(), &one, &c.ones, &other, &c.others).is_err(),
            "{}: B's data is not there to be found ({})",
            c.one.label(),
            one.status
        );
    }
}

/// One case per record of B's: `make(type, id)`.
fn for_each_record(w: &World, make: impl Fn(&str, &str) -> Req) -> Vec<Case> {
    w.b_records
        .iter()
        .map(|(t, id)| twin(id, |id| make(t, id)))
        .collect()
}

/// The status A gets for `r`.
async fn status(w: &World, r: Req) -> u16 {
    as_a(w, &r).await.status
}

/// An Observation about A that A may write.
fn a_observation() -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "A's note"},
        "subject": {"reference": format!("Patient/{A}")}})
}

#[tokio::test]
async fn reading_another_patients_resource_answers_like_a_missing_one() {
    let w = world().await;
    assert_alike(
        &w,
        &for_each_record(&w, |t, id| Req::get(format!("{t}/{id}"))),
    )
    .await;
    let obs = format!("Observation/{}", w.obs_b[0]);
    assert_eq!(status(&w, Req::get(obs)).await, 404);
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn reading_a_version_of_another_patients_resource_answers_like_a_missing_one() {
    let w = world().await;
    assert_alike(
        &w,
        &for_each_record(&w, |t, id| Req::get(format!("{t}/{id}/_history/1"))),
    )
    .await;
    let obs = format!("Observation/{}/_history/1", w.obs_b[0]);
    assert_eq!(status(&w, Req::get(obs)).await, 404);
}

#[tokio::test]
async fn the_history_of_another_patients_resource_answers_like_a_missing_one() {
    let w = world().await;
    assert_alike(
        &w,
        &for_each_record(&w, |t, id| Req::get(format!("{t}/{id}/_history"))),
    )
    .await;
    let obs = format!("Observation/{}/_history", w.obs_b[0]);
    assert_eq!(status(&w, Req::get(obs)).await, 404);
}

#[tokio::test]
async fn a_deleted_resource_of_another_patient_answers_404_like_a_missing_one() {
    let w = world().await;
    let cases: Vec<Case> = [
        "Observation/{}",
        "Observation/{}/_history/1",
        "Observation/{}/_history/2",
        "Observation/{}/_history",
    ]
    .iter()
    .map(|p| twin(&w.deleted_b, |id| Req::get(p.replace("{}", id))))
    .collect();
    assert_alike(&w, &cases).await;
    let read = format!("Observation/{}", w.deleted_b);
    assert_eq!(status(&w, Req::get(read)).await, 404, "not 410");
}

#[tokio::test]
async fn patching_another_patients_resource_answers_like_a_missing_one() {
    let w = world().await;
    assert_alike(
        &w,
        &for_each_record(&w, |t, id| Req::patch(format!("{t}/{id}"))),
    )
    .await;
    let obs = format!("Observation/{}", w.obs_b[0]);
    assert_eq!(status(&w, Req::patch(obs)).await, 404);
    assert_b_unchanged(&w).await;
}

/// PUT of B's id with a body A may write (B's record made A's) answers
/// like PUT of an unknown id — and with a `patient/` token an update never
/// creates a resource with an id the client chose: both are 404.
#[tokio::test]
async fn updating_another_patients_resource_answers_like_updating_an_unknown_id() {
    let w = world().await;
    let body_for = |t: &str, id: &str| {
        let mut r = w.b_bodies[&format!("{t}/{}", w.b_records_id(t))].clone();
        point_patients_to(&mut r, A);
        if let Some(meta) = r.get_mut("meta").and_then(Value::as_object_mut) {
            meta.shift_remove("versionId");
            meta.shift_remove("lastUpdated");
        }
        r["id"] = json!(id);
        r
    };
    let cases = for_each_record(&w, |t, id| Req::put(format!("{t}/{id}"), body_for(t, id)));
    assert_alike(&w, &cases).await;
    let id = w.obs_b[0].clone();
    let mut body = a_observation();
    body["id"] = json!(id);
    assert_eq!(
        status(&w, Req::put(format!("Observation/{id}"), body.clone())).await,
        404
    );
    let m = missing();
    body["id"] = json!(m);
    assert_eq!(
        status(&w, Req::put(format!("Observation/{m}"), body)).await,
        404
    );
    // Nothing was created under the unknown ids.
    for c in &cases {
        let (st, _) = get(&w.s, &w.admin, &c.other.path).await;
        assert_eq!(st, 404, "{} created", c.other.path);
    }
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn deleting_another_patients_resource_answers_like_deleting_a_missing_one() {
    let w = world().await;
    assert_alike(
        &w,
        &for_each_record(&w, |t, id| Req::delete(format!("{t}/{id}"))),
    )
    .await;
    let with_outcome = twin(&w.obs_b[1], |id| {
        Req::delete(format!("Observation/{id}")).header("Prefer", "return=OperationOutcome")
    });
    assert_alike(&w, &[with_outcome]).await;
    let obs = format!("Observation/{}", w.obs_b[0]);
    assert_eq!(status(&w, Req::delete(obs)).await, 204);
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn searching_by_another_patients_ids_finds_nothing() {
    let w = world().await;
    let mut cases = for_each_record(&w, |t, id| Req::get(format!("{t}?_id={id}")));
    cases.push(twin(&w.obs_b[0], |id| {
        Req::new(Method::POST, "Observation/_search", None)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .with_form(&format!("_id={id}"))
    }));
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;
}

#[tokio::test]
async fn searching_by_a_reference_to_another_patient_finds_nothing() {
    let w = world().await;
    let mut cases = Vec::new();
    let mut by_param: Vec<(String, String)> = compartment_types()
        .into_iter()
        .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
        .collect();
    by_param.extend(
        PATIENT_DATA_OUTSIDE_THE_COMPARTMENT
            .iter()
            .map(|t| (t.to_string(), "patient".to_string())),
    );
    for (t, p) in by_param {
        cases.push(twin(&w.b, |id| Req::get(format!("{t}?{p}=Patient/{id}"))));
        cases.push(twin(&w.b, |id| Req::get(format!("{t}?{p}={id}"))));
    }
    cases.push(twin(&w.b, |id| {
        Req::get(format!("Observation?patient={id}"))
    }));
    cases.push(twin(&w.b, |id| {
        Req::get(format!("Observation?subject=Patient/{id}&_count=0"))
    }));
    cases.push(twin(&w.b, |id| {
        Req::get(format!("Observation?subject={id}&_summary=count"))
    }));
    assert_alike(&w, &cases).await;
}

#[tokio::test]
async fn a_compartment_search_of_another_patient_answers_like_one_of_a_missing_patient() {
    let w = world().await;
    let mut cases: Vec<Case> = compartment_types()
        .into_iter()
        .map(|(t, _)| twin(&w.b, |id| Req::get(format!("Patient/{id}/{t}"))))
        .collect();
    let code = format!("{CODES}|{}", w.b_code);
    cases.push(twin(&w.b, |id| {
        Req::get(format!("Patient/{id}/Observation?code={code}"))
    }));
    assert_alike(&w, &cases).await;
}

/// Chains apply A's limits inside: criteria on B's data select the same as
/// criteria on nothing, also where A's own Observation refers to B's data.
#[tokio::test]
async fn chained_searches_through_another_patients_data_find_nothing() {
    let w = world().await;
    let mrn = |v: &str| format!("{MRN}|{v}");
    let code = |v: &str| format!("{CODES}|{v}");
    let cases = vec![
        twin(&w.b_family, |f| {
            Req::get(format!("Observation?subject:Patient.family={f}"))
        }),
        twin(&w.b_family, |f| {
            Req::get(format!("Observation?patient.family={f}"))
        }),
        twin(&w.b_family, |f| {
            Req::get(format!("Encounter?subject:Patient.family={f}"))
        }),
        twin(&w.b_family, |f| {
            Req::get(format!("Observation?focus:Patient.family={f}"))
        }),
        twin(&w.b_mrn, |v| {
            Req::get(format!("Observation?focus:Patient.identifier={}", mrn(v)))
        }),
        twin(&w.b_code, |v| {
            Req::get(format!(
                "Observation?derived-from:Observation.code={}",
                code(v)
            ))
        }),
        twin(&w.b_code, |v| {
            Req::get(format!(
                "Observation?has-member:Observation.code={}",
                code(v)
            ))
        }),
        twin(&w.org_b, |o| {
            Req::get(format!(
                "Observation?encounter:Encounter.service-provider=Organization/{o}"
            ))
        }),
        twin(&w.b_family, |f| {
            Req::get(format!(
                "Observation?encounter:Encounter.subject:Patient.family={f}"
            ))
        }),
    ];
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;
}

/// `_has` applies A's limits inside: B's data that refers to A, or to
/// shared data, selects nothing.
#[tokio::test]
async fn reverse_chains_through_another_patients_data_find_nothing() {
    let w = world().await;
    let code = |v: &str| format!("{CODES}|{v}");
    let cases = vec![
        twin(&w.b_code, |v| {
            Req::get(format!("Patient?_has:Observation:patient:code={}", code(v)))
        }),
        twin(&w.b_focus_code, |v| {
            Req::get(format!("Patient?_has:Observation:focus:code={}", code(v)))
        }),
        twin(&w.b_enc_code, |v| {
            Req::get(format!(
                "Encounter?_has:Observation:encounter:code={}",
                code(v)
            ))
        }),
        twin(&w.b, |id| {
            Req::get(format!(
                "Organization?_has:Encounter:service-provider:patient={id}"
            ))
        }),
        twin(&w.b, |id| {
            Req::get(format!(
                "Organization?_has:Encounter:service-provider:patient=Patient/{id}"
            ))
        }),
        twin(&w.b_family, |f| {
            Req::get(format!(
                "Organization?_has:Encounter:service-provider:subject:Patient.family={f}"
            ))
        }),
    ];
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;
}

/// `_include` from A's Observation that refers to B, B's Observations and
/// B's Encounter answers like the same from A's Observation that refers to
/// nothing.
#[tokio::test]
async fn includes_never_reach_another_patients_data() {
    let w = world().await;
    let (ones, others) = w.obs_a_pairs();
    let pair = |query: &str| Case {
        one: Req::get(format!("Observation?_id={}&{query}", w.obs_a[0])),
        ones: ones.clone(),
        other: Req::get(format!("Observation?_id={}&{query}", w.obs_a[1])),
        others: others.clone(),
    };
    let mut cases = vec![
        pair("_include=*"),
        pair("_include=Observation:focus&_include=Observation:derived-from&_include=Observation:has-member&_include=Observation:encounter"),
        pair("_include=*&_include:iterate=*"),
        pair("_include=Observation:encounter&_include:iterate=Encounter:service-provider"),
    ];
    cases.push(twin(&w.obs_b[0], |id| {
        Req::get(format!("Observation?_id={id}&_include=*"))
    }));
    cases.push(twin(&w.b, |id| {
        Req::get(format!("Patient?_id={id}&_include=*"))
    }));
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;
}

/// `_revinclude` (plain and `:iterate`) onto A's data that B's data refers
/// to answers like onto A's data nothing refers to: A's Encounter that
/// B's Observation happened in, A's Observation that B's Observation is
/// derived from. And B's data written meanwhile that refers to A changes
/// nothing A sees.
#[tokio::test]
async fn reverse_includes_never_reach_another_patients_data() {
    let w = world().await;
    let encounters = |query: &str| Case {
        one: Req::get(format!("Encounter?_id={}&{query}", w.enc_a[0])),
        ones: vec![w.enc_a[0].clone()],
        other: Req::get(format!("Encounter?_id={}&{query}", w.enc_a[1])),
        others: vec![w.enc_a[1].clone()],
    };
    let (ones, others) = w.obs_a_pairs();
    let observations = |query: &str| Case {
        one: Req::get(format!("Observation?_id={}&{query}", w.obs_a[0])),
        ones: ones.clone(),
        other: Req::get(format!("Observation?_id={}&{query}", w.obs_a[1])),
        others: others.clone(),
    };
    let cases = vec![
        encounters("_revinclude=Observation:encounter"),
        encounters("_revinclude=Observation:*"),
        encounters("_revinclude=Observation:encounter&_revinclude:iterate=Provenance:target"),
        encounters("_revinclude=Observation:*&_revinclude:iterate=Provenance:*"),
        observations("_revinclude=*"),
        observations("_revinclude=*&_revinclude:iterate=Provenance:target"),
        observations("_revinclude=Observation:derived-from"),
        twin(&w.b, |id| {
            Req::get(format!("Patient?_id={id}&_revinclude=Observation:*"))
        }),
        twin(&w.obs_b[0], |id| {
            Req::get(format!(
                "Observation?_id={id}&_revinclude=*&_revinclude:iterate=Provenance:target"
            ))
        }),
    ];
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;

    // Before and after B gets an Observation about A.
    let mine = Req::get(format!(
        "Patient?_id={A}&_revinclude=Observation:*&_count=1000"
    ));
    let (before, admin_before) = (as_a(&w, &mine).await, send(&w.s, &w.admin, &mine).await);
    let mut o = observation(&w.b, &b_value());
    o["focus"] = json!([{"reference": format!("Patient/{A}")}]);
    let (st, _) = fhir(&w.s, &w.admin, Method::POST, "Observation", Some(&o)).await;
    assert_eq!(st, 201);
    let admin_after = send(&w.s, &w.admin, &mine).await;
    assert!(
        alike("", &admin_before, &[], &admin_after, &[]).is_err(),
        "an unrestricted reader finds B's new Observation"
    );
    let after = as_a(&w, &mine).await;
    alike(&mine.label(), &before, &[], &after, &[]).unwrap_or_else(|e| panic!("{e}"));
}

/// `If-None-Exist` counts only what A may see: criteria matching only B's
/// data create a new resource, as criteria matching nothing do.
#[tokio::test]
async fn a_conditional_create_ignores_another_patients_matches() {
    let w = world().await;
    let create = |criteria: String| {
        Req::post("Observation", a_observation()).header("If-None-Exist", criteria)
    };
    let cases = vec![
        twin(&w.b_obs_id, |v| create(format!("identifier={OBS_ID}|{v}"))),
        twin(&w.b, |id| create(format!("subject=Patient/{id}"))),
        twin(&w.b_mrn, |v| {
            create(format!("patient.identifier={MRN}|{v}"))
        }),
        twin(&w.b_mrn, |v| {
            Req::post(
                "Patient",
                json!({"resourceType": "Patient", "name": [{"family": "New"}]}),
            )
            .header("If-None-Exist", format!("identifier={MRN}|{v}"))
        }),
    ];
    assert_alike(&w, &cases).await;
    let criteria = format!("identifier={OBS_ID}|{}", w.b_obs_id);
    assert_eq!(status(&w, create(criteria)).await, 201);
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn a_conditional_update_ignores_another_patients_matches() {
    let w = world().await;
    let mut me = w.a_patient.clone();
    me.as_object_mut().unwrap().shift_remove("meta");
    let cases = vec![
        twin(&w.b_mrn, |v| {
            Req::put(format!("Patient?identifier={MRN}|{v}"), me.clone())
        }),
        twin(&w.b_obs_id, |v| {
            Req::put(
                format!("Observation?identifier={OBS_ID}|{v}"),
                a_observation(),
            )
        }),
        twin(&w.b, |id| {
            Req::put(
                format!("Observation?subject=Patient/{id}&code:text=none"),
                a_observation(),
            )
        }),
    ];
    assert_alike(&w, &cases).await;
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn a_conditional_patch_ignores_another_patients_matches() {
    let w = world().await;
    let cases = vec![
        twin(&w.b_obs_id, |v| {
            Req::patch(format!("Observation?identifier={OBS_ID}|{v}"))
        }),
        twin(&w.b_mrn, |v| {
            Req::patch(format!("Patient?identifier={MRN}|{v}"))
        }),
        twin(&w.org_b, |o| {
            Req::patch(format!("Encounter?service-provider=Organization/{o}"))
        }),
    ];
    assert_alike(&w, &cases).await;
    let criteria = format!("Observation?identifier={OBS_ID}|{}", w.b_obs_id);
    assert_eq!(status(&w, Req::patch(criteria)).await, 404);
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn a_conditional_delete_ignores_another_patients_matches() {
    let w = world().await;
    let cases = vec![
        twin(&w.b_obs_id, |v| {
            Req::delete(format!("Observation?identifier={OBS_ID}|{v}"))
        }),
        twin(&w.b_mrn, |v| {
            Req::delete(format!("Patient?identifier={MRN}|{v}"))
        }),
        twin(&w.b_obs_id, |v| {
            Req::delete(format!("Observation?identifier={OBS_ID}|{v}"))
                .header("Prefer", "return=OperationOutcome")
        }),
        twin(&w.org_b, |o| {
            Req::delete(format!("Encounter?service-provider=Organization/{o}"))
        }),
    ];
    assert_alike(&w, &cases).await;
    let criteria = format!("Observation?identifier={OBS_ID}|{}", w.b_obs_id);
    assert_eq!(status(&w, Req::delete(criteria)).await, 204);
    assert_b_unchanged(&w).await;
}

/// Criteria matching several of B's resources never answer 412 "several
/// matches" to A: they answer like criteria matching nothing.
#[tokio::test]
async fn several_matches_among_another_patients_data_never_answer_412() {
    let w = world().await;
    let by_code = |v: &str| format!("code={CODES}|{v}");
    let by_subject = |id: &str| format!("subject=Patient/{id}");
    let mut cases = Vec::new();
    for (value, criteria) in [
        (&w.b_code, &by_code as &dyn Fn(&str) -> String),
        (&w.b, &by_subject),
    ] {
        cases.push(twin(value, |v| {
            Req::post("Observation", a_observation()).header("If-None-Exist", criteria(v))
        }));
        cases.push(twin(value, |v| {
            Req::put(format!("Observation?{}", criteria(v)), a_observation())
        }));
        cases.push(twin(value, |v| {
            Req::patch(format!("Observation?{}", criteria(v)))
        }));
        cases.push(twin(value, |v| {
            Req::delete(format!("Observation?{}", criteria(v)))
        }));
        cases.push(twin(value, |v| {
            Req::post(
                "",
                json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"resource": a_observation(),
                     "request": {"method": "POST", "url": "Observation", "ifNoneExist": criteria(v)}}]}),
            )
        }));
    }
    for c in &cases {
        let st = status(&w, c.one.clone()).await;
        assert_ne!(st, 412, "{}", c.one.label());
    }
    assert_alike(&w, &cases).await;
    assert_b_unchanged(&w).await;
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

/// Entries of batches and transactions answer for B's data as for nothing:
/// GET, PUT, DELETE, `ifNoneExist`, conditional references, conditional
/// updates and conditional deletes.
#[tokio::test]
async fn batch_and_transaction_entries_answer_like_for_missing_data() {
    let w = world().await;
    let get_all = |ids: &[String]| {
        bundle(
            "batch",
            w.b_records
                .iter()
                .zip(ids)
                .map(|((t, _), id)| json!({"request": {"method": "GET", "url": format!("{t}/{id}")}}))
                .collect(),
        )
    };
    let ones: Vec<String> = w.b_records.iter().map(|(_, id)| id.clone()).collect();
    let others: Vec<String> = ones.iter().map(|_| missing()).collect();
    let mut cases = vec![Case {
        one: Req::post("", get_all(&ones)),
        ones: ones.clone(),
        other: Req::post("", get_all(&others)),
        others,
    }];
    let obs_b = w.obs_b[0].clone();
    let entry_cases: Vec<(&str, &String, MakeEntry)> = vec![
        (
            "transaction",
            &obs_b,
            Box::new(
                |id: &str| json!({"request": {"method": "GET", "url": format!("Observation/{id}")}}),
            ),
        ),
        (
            "batch",
            &obs_b,
            Box::new(
                |id: &str| json!({"request": {"method": "DELETE", "url": format!("Observation/{id}")}}),
            ),
        ),
        (
            "transaction",
            &obs_b,
            Box::new(
                |id: &str| json!({"request": {"method": "DELETE", "url": format!("Observation/{id}")}}),
            ),
        ),
        (
            "batch",
            &obs_b,
            Box::new(|id: &str| {
                let mut o = a_observation();
                o["id"] = json!(id);
                json!({"resource": o, "request": {"method": "PUT", "url": format!("Observation/{id}")}})
            }),
        ),
        (
            "transaction",
            &w.b_obs_id,
            Box::new(|v: &str| {
                json!({"resource": a_observation(), "request": {"method": "POST", "url": "Observation",
                "ifNoneExist": format!("identifier={OBS_ID}|{v}")}})
            }),
        ),
        (
            "transaction",
            &w.b_obs_id,
            Box::new(|v: &str| {
                json!({"resource": a_observation(), "request": {"method": "PUT",
                "url": format!("Observation?identifier={OBS_ID}|{v}")}})
            }),
        ),
        (
            "transaction",
            &w.b_obs_id,
            Box::new(
                |v: &str| json!({"request": {"method": "DELETE", "url": format!("Observation?identifier={OBS_ID}|{v}")}}),
            ),
        ),
        (
            "transaction",
            &w.b_mrn,
            Box::new(|v: &str| {
                let mut o = a_observation();
                o["focus"] = json!([{"reference": format!("Patient?identifier={MRN}|{v}")}]);
                json!({"resource": o, "request": {"method": "POST", "url": "Observation"}})
            }),
        ),
        (
            "batch",
            &w.b_mrn,
            Box::new(|v: &str| {
                let mut o = a_observation();
                o["focus"] = json!([{"reference": format!("Patient?identifier={MRN}|{v}")}]);
                json!({"resource": o, "request": {"method": "POST", "url": "Observation"}})
            }),
        ),
    ];
    for (kind, value, entry) in &entry_cases {
        cases.push(twin(value, |v| Req::post("", bundle(kind, vec![entry(v)]))));
    }
    assert_alike(&w, &cases).await;
    assert_b_unchanged(&w).await;
}

#[tokio::test]
async fn everything_and_the_signed_document_of_another_patient_answer_like_a_missing_patient() {
    let w = world().await;
    let cases = vec![
        twin(&w.b, |id| Req::get(format!("Patient/{id}/$everything"))),
        twin(&w.b, |id| {
            Req::get(format!(
                "Patient/{id}/$everything?_type=Observation,Encounter"
            ))
        }),
        twin(&w.b, |id| {
            Req::get(format!("Patient/{id}/$signed-document"))
        }),
    ];
    assert_admin_tells_apart(&w, &cases).await;
    assert_alike(&w, &cases).await;
    let everything = format!("Patient/{}/$everything", w.b);
    assert_eq!(status(&w, Req::get(everything)).await, 404);
}

/// Device (`patient`), Task (`for`), Contract and GuidanceResponse
/// (`subject`) hold one patient's data outside the compartment: A reads and
/// finds its own, and B's answer like missing ones.
#[tokio::test]
async fn patient_data_outside_the_compartment_is_seen_only_by_its_own_patient() {
    let w = world().await;
    for (t, id) in &w.a_outside {
        let r = as_a(&w, &Req::get(format!("{t}/{id}"))).await;
        assert_eq!(r.status, 200, "A reads its own {t}: {}", r.body);
        let (st, found) = all_pages(&w.s, &w.token, &format!("{t}?_count=1000")).await;
        assert_eq!(st, 200, "{t}");
        let found: Vec<String> = found.into_iter().map(|(_, r)| r).collect();
        assert!(found.contains(&format!("{t}/{id}")), "{t}: {found:?}");
        let theirs = format!("{t}/{}", w.b_records_id(t));
        assert!(!found.contains(&theirs), "{t}: {found:?}");
        let (_, bundle) = get(&w.s, &w.token, &format!("{t}?_count=1000")).await;
        for e in bundle["entry"].as_array().into_iter().flatten() {
            let res = &e["resource"];
            assert!(
                !refers_to_a_patient(res) || res.to_string().contains(&format!("Patient/{A}\"")),
                "{t}: A finds another patient's {res}"
            );
        }
    }
    let mut cases = Vec::new();
    for t in PATIENT_DATA_OUTSIDE_THE_COMPARTMENT {
        let id = w.b_records_id(t).to_string();
        cases.push(twin(&id, |id| Req::get(format!("{t}/{id}"))));
        cases.push(twin(&id, |id| Req::get(format!("{t}?_id={id}"))));
        cases.push(twin(&w.b, |b| Req::get(format!("{t}?patient={b}"))));
    }
    assert_alike(&w, &cases).await;
}

/// Organizations, practitioners, locations, medications, substances and
/// terminology describe no patient: A reads and searches them, and can
/// write none of them.
#[tokio::test]
async fn shared_reference_data_is_readable_but_not_writable_with_a_patient_token() {
    let w = world().await;
    for (t, id) in SHARED {
        let path = format!("{t}/{id}");
        let (st, stored) = get(&w.s, &w.admin, &path).await;
        assert_eq!(st, 200, "{path}");
        let r = as_a(&w, &Req::get(path.clone())).await;
        assert_eq!((r.status, &r.body), (200, &stored), "A reads {path}");
        let r = as_a(&w, &Req::get(format!("{t}?_id={id}"))).await;
        assert_eq!(
            (r.status, &r.body["total"]),
            (200, &json!(1)),
            "{t}?_id={id}"
        );
        let mut copy = stored.clone();
        copy.as_object_mut().unwrap().shift_remove("meta");
        let mut new = copy.clone();
        new.as_object_mut().unwrap().shift_remove("id");
        let mut changed = copy.clone();
        changed["language"] = json!("de");
        for (what, req) in [
            ("create", Req::post(t, new)),
            ("update", Req::put(path.clone(), changed)),
            ("patch", Req::patch(path.clone())),
            ("delete", Req::delete(path.clone())),
        ] {
            let r = as_a(&w, &req).await;
            assert_eq!(r.status, 403, "{what} {path}: {}", r.body);
        }
        let (_, after) = get(&w.s, &w.admin, &path).await;
        assert_eq!(after, stored, "{path} unchanged");
    }
}

/// Bundle, MessageHeader and Binary can hold anyone's data: a `patient/`
/// token reaches none of them, whatever the id (so the answer says nothing
/// about the data).
#[tokio::test]
async fn bundles_message_headers_and_binaries_are_out_of_reach_of_a_patient_token() {
    let w = world().await;
    let examples = examples_by_type();
    for t in UNREACHABLE {
        let example = examples[t][0]["id"].as_str().unwrap().to_string();
        let b_id = w.b_records_id(t).to_string();
        let mut mine = record_of(&examples, t, A);
        mine["id"] = json!(format!("a{}", hex()));
        let own = put(&w.s, &w.admin, &mine).await;
        let mut new = mine.clone();
        new.as_object_mut().unwrap().shift_remove("id");
        for req in [
            Req::get(format!("{t}/{b_id}")),
            Req::get(format!("{t}/{example}")),
            Req::get(format!("{t}/{}", missing())),
            Req::get(own.clone()),
            Req::get(format!("{own}/_history")),
            Req::get(t),
            Req::get(format!("{t}?_id={b_id}")),
            Req::post(t, new),
            Req::delete(own.clone()),
        ] {
            let r = as_a(&w, &req).await;
            assert_eq!(r.status, 403, "{}: {}", req.label(), r.body);
        }
    }
    assert_b_unchanged(&w).await;
}
