//! The circle of trust, through HTTP with real tokens for every role.
//!
//! Patient P has one resource of every type that can carry a patient
//! reference (R4 examples pointed at P), some labelled HIV or PSY, and a
//! Consent of five provisions: the basic permit for P's care team, a
//! permit for the clinic's organisation, a permit for P's related person
//! limited to a few types, a deny of HIV-labelled data to the insurer and
//! a deny of PSY-labelled data to the clinic. Patient Q has a few records
//! of their own and another general practitioner.
//!
//! What each role must see of each resource is computed from the data
//! (its type and labels) by [`Role::sees`], the specification of the
//! Consent above; every path — read, vread, history, type search with its
//! total, `_include`, `_revinclude`, chain, `_has`, `$everything`,
//! `$signed-document`, batch GET entries — must show exactly that.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::records::{compartment_types, examples_by_type, record_of};
use common::smart::{
    admin_token, app_token, backend_client_with, backend_token, cli, client_key, fhir, get,
    public_client, ClientKey,
};
use common::TestServer;
use jsonwebtoken::Algorithm;
use reqwest::Method;
use serde_json::{json, Value};

const LABELS: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const HIV_TYPES: [&str; 3] = ["Observation", "ExplanationOfBenefit", "DocumentReference"];
const PSY_TYPES: [&str; 3] = ["Condition", "Encounter", "DiagnosticReport"];
/// What the related person is permitted (the Consent's classes).
const RELATED_TYPES: [&str; 3] = ["Observation", "Condition", "Patient"];
/// The insurer policy's types (`policies/insurer.json`).
const INSURER_TYPES: [&str; 7] = [
    "Coverage",
    "Claim",
    "ClaimResponse",
    "ExplanationOfBenefit",
    "Encounter",
    "Procedure",
    "Condition",
];
/// Text found only in masked elements of P's Claim.
const SECRET: &str = "masked-note-7f3a";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Patient,
    Related,
    Treating,
    Outside,
    Clinic,
    Insurer,
    Emergency,
}

const ROLES: [Role; 7] = [
    Role::Patient,
    Role::Related,
    Role::Treating,
    Role::Outside,
    Role::Clinic,
    Role::Insurer,
    Role::Emergency,
];

/// One of the stored resources, with what decides who sees it.
#[derive(Debug, Clone)]
struct Rec {
    rtype: String,
    id: String,
    /// `p` or `q`.
    owner: &'static str,
    labels: Vec<&'static str>,
}

impl Rec {
    fn path(&self) -> String {
        format!("{}/{}", self.rtype, self.id)
    }
}

impl Role {
    /// The specification: whether this role sees `r`.
    fn sees(self, r: &Rec) -> bool {
        let t = r.rtype.as_str();
        if r.owner == "q" {
            return self == Role::Outside;
        }
        match self {
            Role::Patient | Role::Treating | Role::Emergency => true,
            Role::Outside => false,
            Role::Clinic => !r.labels.contains(&"PSY"),
            Role::Related => RELATED_TYPES.contains(&t),
            Role::Insurer => INSURER_TYPES.contains(&t) && !r.labels.contains(&"HIV"),
        }
    }
}

struct World {
    s: TestServer,
    admin: String,
    tokens: BTreeMap<Role, String>,
    recs: Vec<Rec>,
    p_family: String,
    /// P's Consent, written by P.
    consent: String,
}

impl World {
    fn token(&self, r: Role) -> &str {
        &self.tokens[&r]
    }
    fn expected(&self, role: Role, rtype: &str) -> BTreeSet<String> {
        self.recs
            .iter()
            .filter(|r| r.rtype == rtype && role.sees(r))
            .map(|r| r.id.clone())
            .collect()
    }
    fn types(&self) -> BTreeSet<String> {
        self.recs.iter().map(|r| r.rtype.clone()).collect()
    }
    fn p_recs(&self) -> impl Iterator<Item = &Rec> {
        self.recs.iter().filter(|r| r.owner == "p")
    }
    /// `(type, id)` of every record of P that `role` sees — nothing at all
    /// if it cannot see P itself (what `$everything` and `_revinclude` on
    /// P can show).
    fn record_of_p_as_seen_by(&self, role: Role) -> BTreeSet<(String, String)> {
        let p = self.recs.iter().find(|r| r.id == "p").expect("Patient/p");
        if !role.sees(p) {
            return BTreeSet::new();
        }
        self.p_recs()
            .filter(|r| role.sees(r))
            .map(|r| (r.rtype.clone(), r.id.clone()))
            .collect()
    }
    /// The entries that are this test's data.
    fn of_test_data(&self, got: BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
        got.into_iter()
            .filter(|(_, id)| self.recs.iter().any(|r| &r.id == id))
            .collect()
    }
}

async fn put(s: &TestServer, token: &str, r: &Value) {
    let path = format!(
        "{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    );
    let (st, out) = fhir(s, token, Method::PUT, &path, Some(r)).await;
    assert!((200..300).contains(&st), "PUT {path}: {st} {out}");
}

/// A signed-in person's token (`fhirUser` as given), with `user/` scopes
/// reading for everyone; a patient gets `patient/` scopes for themself,
/// reading and writing.
async fn person_token(s: &TestServer, fhir_user: &str) -> String {
    let scope = if fhir_user.starts_with("Patient/") {
        "openid fhirUser launch/patient patient/*.cruds"
    } else {
        "openid fhirUser user/*.rs"
    };
    let username = format!("u{}", uuid::Uuid::new_v4().simple());
    cli(
        s,
        &[
            "user",
            "add",
            "--username",
            &username,
            "--password-stdin",
            "--fhir-user",
            fhir_user,
        ],
        Some("correct horse battery\n"),
    );
    let client = public_client(s, scope);
    let t = app_token(
        s,
        &client,
        scope,
        Some((&username, "correct horse battery")),
        &[],
    )
    .await;
    t["access_token"].as_str().unwrap().to_string()
}

/// A backend client bound to the insurer's Organization.
async fn insurer_token(s: &TestServer) -> String {
    let k: ClientKey = client_key(Algorithm::RS384);
    let id = backend_client_with(
        s,
        &k,
        "system/*.rs",
        &["--organization", "Organization/insurer"],
    );
    let (st, t) = backend_token(s, &id, &k, "system/*.rs").await;
    assert_eq!(st, 200, "{t}");
    t["access_token"].as_str().unwrap().to_string()
}

fn coding(system: &str, code: &str) -> Value {
    json!({"system": system, "code": code})
}

fn actor(reference: &str) -> Value {
    json!([{"role": {"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP")]},
        "reference": {"reference": reference}}])
}

/// P's Consent: five provisions.
fn p_consent(status: &str) -> Value {
    let class = |t: &str| coding("http://hl7.org/fhir/resource-types", t);
    json!({
        "resourceType": "Consent", "status": status,
        "scope": {"coding": [coding("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")]},
        "category": [{"coding": [coding("http://loinc.org", "59284-0")]}],
        "patient": {"reference": "Patient/p"},
        "policyRule": {"coding": [coding(LABELS, "OPTIN")]},
        "provision": {
            "type": "permit",
            "provision": [
                {"type": "permit", "actor": actor("Organization/clinic"),
                 "action": [{"coding": [coding("http://terminology.hl7.org/CodeSystem/consentaction", "access")]}]},
                {"type": "permit", "actor": actor("RelatedPerson/rp"),
                 "class": RELATED_TYPES.iter().map(|t| class(t)).collect::<Vec<_>>()},
                {"type": "deny", "actor": actor("Organization/insurer"),
                 "securityLabel": [coding(LABELS, "HIV")]},
                {"type": "deny", "actor": actor("Organization/clinic"),
                 "securityLabel": [coding(LABELS, "PSY")]}
            ]
        }
    })
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(adjust: impl FnOnce(&mut ehrx::config::Config)) -> World {
    let s = TestServer::start_with(adjust).await;
    let admin = admin_token(&s).await;
    let p_family = format!("Fam{}", uuid::Uuid::new_v4().simple());
    for r in [
        json!({"resourceType": "Organization", "id": "clinic", "name": "Clinic"}),
        json!({"resourceType": "Organization", "id": "insurer", "name": "Insurer"}),
        json!({"resourceType": "Practitioner", "id": "dr-in"}),
        json!({"resourceType": "Practitioner", "id": "dr-out"}),
        json!({"resourceType": "Practitioner", "id": "dr-org"}),
        json!({"resourceType": "Practitioner", "id": "dr-btg"}),
        json!({"resourceType": "PractitionerRole", "id": "role-org",
            "practitioner": {"reference": "Practitioner/dr-org"},
            "organization": {"reference": "Organization/clinic"}}),
        json!({"resourceType": "Patient", "id": "p", "name": [{"family": p_family}],
            "generalPractitioner": [{"reference": "Practitioner/dr-in"}]}),
        json!({"resourceType": "Patient", "id": "q", "name": [{"family": "Other"}],
            "generalPractitioner": [{"reference": "Practitioner/dr-out"}]}),
        json!({"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/p"}}),
    ] {
        put(&s, &admin, &r).await;
    }
    let mut recs = vec![
        Rec {
            rtype: "Patient".into(),
            id: "p".into(),
            owner: "p",
            labels: vec![],
        },
        Rec {
            rtype: "Patient".into(),
            id: "q".into(),
            owner: "q",
            labels: vec![],
        },
        Rec {
            rtype: "RelatedPerson".into(),
            id: "rp".into(),
            owner: "p",
            labels: vec![],
        },
    ];
    let examples = examples_by_type();
    let mut types: Vec<String> = compartment_types().into_iter().map(|(t, _)| t).collect();
    types.extend(["Device", "Task", "Contract", "GuidanceResponse"].map(String::from));
    for t in types {
        if ["Patient", "RelatedPerson", "Consent"].contains(&t.as_str()) {
            continue;
        }
        let mut r = record_of(&examples, &t, "p");
        r["id"] = json!(format!("p-{}", t.to_lowercase()));
        let mut labels = Vec::new();
        if HIV_TYPES.contains(&t.as_str()) {
            labels.push("HIV");
        }
        if PSY_TYPES.contains(&t.as_str()) {
            labels.push("PSY");
        }
        if !labels.is_empty() {
            r["meta"] =
                json!({"security": labels.iter().map(|l| coding(LABELS, l)).collect::<Vec<_>>()});
        }
        if t == "Coverage" {
            r["payor"] = json!([{"reference": "Organization/insurer"}]);
            r["status"] = json!("active");
            r["identifier"] = json!([
                {"type": {"coding": [coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MB")]},
                 "value": "member-1"},
                {"system": "urn:ssn", "value": SECRET}
            ]);
        }
        if t == "Claim" {
            r["text"] = json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{SECRET}</div>")});
            r["identifier"] = json!([{"system": "urn:claims", "value": SECRET}]);
            r["supportingInfo"] = json!([{"sequence": 1, "category": {"text": "attachment"},
                "valueAttachment": {"contentType": "text/plain", "title": SECRET}}]);
        }
        if t == "Condition" {
            r["code"] = json!({"text": "condition-marker-psy"});
        }
        put(&s, &admin, &r).await;
        recs.push(Rec {
            rtype: t.clone(),
            id: r["id"].as_str().unwrap().to_string(),
            owner: "p",
            labels,
        });
    }
    for t in ["Observation", "Condition", "Claim"] {
        let mut r = record_of(&examples, t, "q");
        r["id"] = json!(format!("q-{}", t.to_lowercase()));
        put(&s, &admin, &r).await;
        recs.push(Rec {
            rtype: t.into(),
            id: r["id"].as_str().unwrap().to_string(),
            owner: "q",
            labels: vec![],
        });
    }
    let mut tokens = BTreeMap::new();
    tokens.insert(Role::Patient, person_token(&s, "Patient/p").await);
    // The patient writes their own Consent with their own token.
    let (st, out) = fhir(
        &s,
        &tokens[&Role::Patient],
        Method::POST,
        "Consent",
        Some(&p_consent("active")),
    )
    .await;
    assert_eq!(st, 201, "{out}");
    let consent = out["id"].as_str().unwrap().to_string();
    recs.push(Rec {
        rtype: "Consent".into(),
        id: consent.clone(),
        owner: "p",
        labels: vec![],
    });
    tokens.insert(Role::Related, person_token(&s, "RelatedPerson/rp").await);
    tokens.insert(Role::Treating, person_token(&s, "Practitioner/dr-in").await);
    tokens.insert(Role::Outside, person_token(&s, "Practitioner/dr-out").await);
    tokens.insert(Role::Clinic, person_token(&s, "Practitioner/dr-org").await);
    tokens.insert(Role::Insurer, insurer_token(&s).await);
    let btg = person_token(&s, "Practitioner/dr-btg").await;
    tokens.insert(Role::Emergency, btg);
    World {
        s,
        admin,
        tokens,
        recs,
        p_family,
        consent,
    }
}

impl World {
    /// P's Consent with `status`, as P writes it back.
    async fn set_consent(&self, status: &str) -> u16 {
        let mut c = p_consent(status);
        c["id"] = json!(self.consent);
        let (st, out) = fhir(
            &self.s,
            self.token(Role::Patient),
            Method::PUT,
            &format!("Consent/{}", self.consent),
            Some(&c),
        )
        .await;
        assert_eq!(st, 200, "{out}");
        st
    }
}

fn btg_request() -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "purpose", "valueCoding": coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "BTG")},
        {"name": "reason", "valueString": "unconscious in the emergency room"}
    ]})
}

/// The break-the-glass practitioner breaks the glass for P.
async fn break_glass(w: &World) {
    let (st, out) = fhir(
        &w.s,
        w.token(Role::Emergency),
        Method::POST,
        "Patient/p/$emergency-access",
        Some(&btg_request()),
    )
    .await;
    assert_eq!(st, 200, "{out}");
}

/// `(type, id)` of every entry of a search (all pages), and the totals.
async fn search_all(
    w: &World,
    token: &str,
    path: &str,
) -> (u16, BTreeSet<(String, String)>, Vec<i64>) {
    let mut url = w.s.url(path);
    let mut out = BTreeSet::new();
    let mut totals = Vec::new();
    loop {
        let r =
            w.s.client
                .get(&url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
        let st = r.status().as_u16();
        if st != 200 {
            return (st, out, totals);
        }
        let b: Value = r.json().await.unwrap();
        if let Some(t) = b["total"].as_i64() {
            totals.push(t);
        }
        for e in b["entry"].as_array().into_iter().flatten() {
            let res = &e["resource"];
            if res["resourceType"] == "OperationOutcome" {
                continue;
            }
            out.insert((
                res["resourceType"].as_str().unwrap().to_string(),
                res["id"].as_str().unwrap().to_string(),
            ));
        }
        match common::next_link(&b) {
            Some(n) => url = n,
            None => return (200, out, totals),
        }
    }
}

#[tokio::test]
async fn each_role_reads_exactly_what_the_circle_allows() {
    let w = world().await;
    break_glass(&w).await;
    let mut wrong = Vec::new();
    for role in ROLES {
        for r in &w.recs {
            let want = role.sees(r);
            for path in [
                r.path(),
                format!("{}/_history/1", r.path()),
                format!("{}/_history", r.path()),
            ] {
                let (st, _) = get(&w.s, w.token(role), &path).await;
                // 403: the role may not read the type at all, whatever exists.
                if (st == 200) != want || !(st == 200 || st == 404 || st == 403) {
                    wrong.push(format!(
                        "{role:?} GET {path}: {st}, expected visible={want}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn each_role_searches_exactly_what_the_circle_allows_with_true_totals() {
    let w = world().await;
    break_glass(&w).await;
    let mut wrong = Vec::new();
    for role in ROLES {
        for t in w.types() {
            let want = w.expected(role, &t);
            let (st, all, totals) = search_all(&w, w.token(role), &format!("{t}?_count=7")).await;
            if st == 403 && want.is_empty() {
                continue;
            }
            let got: BTreeSet<String> = all
                .iter()
                .filter(|(rt, _)| *rt == t)
                .map(|(_, id)| id.clone())
                .collect();
            if st != 200 || got != want {
                wrong.push(format!("{role:?} {t}: {st} {got:?}, expected {want:?}"));
            }
            // Every page's total counts exactly what the caller sees.
            if totals.iter().any(|n| *n != got.len() as i64) {
                wrong.push(format!(
                    "{role:?} {t}: totals {totals:?}, {} visible",
                    got.len()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn includes_chains_and_has_show_only_what_the_circle_allows() {
    let w = world().await;
    break_glass(&w).await;
    let obs = w.recs.iter().find(|r| r.id == "p-observation").unwrap();
    let patient = w.recs.iter().find(|r| r.id == "p").unwrap();
    let mut wrong = Vec::new();
    for role in ROLES {
        let tok = w.token(role);
        // _revinclude: every visible record of P that refers to P, ten
        // source types per request.
        let sources: Vec<String> = w.types().into_iter().filter(|t| t != "Patient").collect();
        let mut st = 200;
        let mut got = BTreeSet::new();
        for chunk in sources.chunks(10) {
            let rev: String = chunk
                .iter()
                .map(|t| format!("&_revinclude={t}:*"))
                .collect();
            let (s1, g, _) = search_all(&w, tok, &format!("Patient?_id=p{rev}&_count=500")).await;
            st = st.max(s1);
            got.extend(g);
        }
        let want = w.record_of_p_as_seen_by(role);
        let got_p = w.of_test_data(got);
        if !(st == 403 && want.is_empty()) && got_p != want {
            let missing: Vec<_> = want.difference(&got_p).collect();
            let extra: Vec<_> = got_p.difference(&want).collect();
            wrong.push(format!(
                "{role:?} _revinclude: {st} missing {missing:?} extra {extra:?}"
            ));
        }
        // _include from P's Observation to its subject.
        let (st, got, _) = search_all(
            &w,
            tok,
            "Observation?_id=p-observation&_include=Observation:subject",
        )
        .await;
        let mut want = BTreeSet::new();
        if role.sees(obs) {
            want.insert(("Observation".to_string(), "p-observation".to_string()));
            if role.sees(patient) {
                want.insert(("Patient".to_string(), "p".to_string()));
            }
        }
        if !(st == 403 && want.is_empty()) && got != want {
            wrong.push(format!(
                "{role:?} _include: {st} {got:?}, expected {want:?}"
            ));
        }
        // Chain: P's Observation found through P's family name.
        let (st, got, _) = search_all(
            &w,
            tok,
            &format!("Observation?subject:Patient.family={}", w.p_family),
        )
        .await;
        let found = got.contains(&("Observation".to_string(), "p-observation".to_string()));
        let want = role.sees(obs) && role.sees(patient);
        if found != want || (st != 200 && want) || got.len() > usize::from(found) {
            wrong.push(format!("{role:?} chain: {st} {got:?}, expected {want}"));
        }
        // _has: P found through P's Observation.
        let (st, got, _) = search_all(
            &w,
            tok,
            "Patient?_has:Observation:subject:_id=p-observation",
        )
        .await;
        let want = role.sees(obs) && role.sees(patient);
        let found = got.contains(&("Patient".to_string(), "p".to_string()));
        if found != want || got.len() > usize::from(found) || (st != 200 && want) {
            wrong.push(format!("{role:?} _has: {st} {got:?}, expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn everything_and_batch_reads_show_only_what_the_circle_allows() {
    let w = world().await;
    break_glass(&w).await;
    let mut wrong = Vec::new();
    for role in ROLES {
        let tok = w.token(role);
        let (st, got, _) = search_all(&w, tok, "Patient/p/$everything?_count=500").await;
        // Small pages, filtered by the circle, still page through all of it.
        let (st3, got3, _) = search_all(&w, tok, "Patient/p/$everything?_count=3").await;
        if (st3, &got3) != (st, &got) {
            wrong.push(format!(
                "{role:?} $everything in pages of 3: {st3} {got3:?}, in one page: {st} {got:?}"
            ));
        }
        let want = w.record_of_p_as_seen_by(role);
        let got_p = w.of_test_data(got);
        if want.is_empty() {
            if st == 200 && !got_p.is_empty() {
                wrong.push(format!("{role:?} $everything: {got_p:?}"));
            }
        } else {
            // $everything covers the compartment (and linked types).
            let missing: Vec<_> = want.difference(&got_p).collect();
            let extra: Vec<_> = got_p.difference(&want).collect();
            if st != 200
                || !extra.is_empty()
                || missing
                    .iter()
                    .any(|(t, _)| t != "RelatedPerson" && t != "Consent" && !is_linked(t))
            {
                wrong.push(format!(
                    "{role:?} $everything: {st} missing {missing:?} extra {extra:?}"
                ));
            }
        }
        // Batch GET entries, each answered on its own.
        let entries: Vec<Value> = w
            .recs
            .iter()
            .map(|r| json!({"request": {"method": "GET", "url": r.path()}}))
            .collect();
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        let (st, out) = fhir(&w.s, tok, Method::POST, "", Some(&batch)).await;
        assert_eq!(st, 200, "{out}");
        for (r, e) in w.recs.iter().zip(out["entry"].as_array().unwrap()) {
            let status = e["response"]["status"].as_str().unwrap_or("");
            if status.starts_with("200") != role.sees(r) {
                wrong.push(format!("{role:?} batch GET {}: {status}", r.path()));
            }
        }
        // A transaction of GET entries of only visible resources succeeds
        // with each one; with one invisible resource it fails as a whole,
        // like a transaction naming a resource that does not exist.
        let visible: Vec<&Rec> = w.recs.iter().filter(|r| role.sees(r)).collect();
        let tx = |rs: &[&Rec]| {
            json!({"resourceType": "Bundle", "type": "transaction", "entry": rs
                .iter()
                .map(|r| json!({"request": {"method": "GET", "url": r.path()}}))
                .collect::<Vec<_>>()})
        };
        if !visible.is_empty() {
            let (st, out) = fhir(&w.s, tok, Method::POST, "", Some(&tx(&visible))).await;
            let ok = out["entry"].as_array().is_some_and(|es| {
                es.len() == visible.len()
                    && es.iter().zip(&visible).all(|(e, r)| {
                        e["resource"]["id"].as_str() == Some(r.id.as_str())
                            && e["response"]["status"]
                                .as_str()
                                .is_some_and(|s| s.starts_with("200"))
                    })
            });
            if st != 200 || !ok {
                wrong.push(format!("{role:?} transaction GET of visible: {st} {out}"));
            }
        }
        if let Some(hidden) = w.recs.iter().find(|r| !role.sees(r)) {
            let mut rs = visible.clone();
            rs.push(hidden);
            let (st, _) = fhir(&w.s, tok, Method::POST, "", Some(&tx(&rs))).await;
            let missing = Rec {
                rtype: hidden.rtype.clone(),
                id: "no-such-id".into(),
                owner: "p",
                labels: vec![],
            };
            let mut rs2 = visible.clone();
            rs2.push(&missing);
            let (st2, _) = fhir(&w.s, tok, Method::POST, "", Some(&tx(&rs2))).await;
            if st != st2 || st == 200 {
                wrong.push(format!(
                    "{role:?} transaction GET of hidden {}: {st}, of a missing one: {st2}",
                    hidden.path()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn is_linked(t: &str) -> bool {
    ["Device", "Task", "Contract", "GuidanceResponse"].contains(&t)
}

#[tokio::test]
async fn a_signed_document_carries_only_what_the_circle_allows() {
    let w = world().await;
    let doc = |role: Role| {
        let w = &w;
        async move {
            let r =
                w.s.client
                    .get(w.s.url("Patient/p/$signed-document"))
                    .bearer_auth(w.token(role))
                    .send()
                    .await
                    .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (st, treating) = doc(Role::Treating).await;
    assert_eq!(st, 200, "{treating}");
    assert!(
        treating.contains("condition-marker-psy"),
        "the treating GP's document has the Condition"
    );
    let (st, clinic) = doc(Role::Clinic).await;
    assert_eq!(st, 200, "{clinic}");
    assert!(
        !clinic.contains("condition-marker-psy"),
        "a PSY-labelled Condition reached the clinic"
    );
    let (st, _) = doc(Role::Outside).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn a_revoked_consent_counts_on_the_next_request_for_tokens_issued_before() {
    let w = world().await;
    let clinic = w.token(Role::Clinic);
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
    assert_eq!(
        get(&w.s, w.token(Role::Related), "Observation/p-observation")
            .await
            .0,
        200
    );
    w.set_consent("inactive").await;
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 404);
    let (st, b) = get(&w.s, clinic, "Observation?patient=p").await;
    assert_eq!((st, b["total"].as_i64()), (200, Some(0)), "{b}");
    assert_eq!(
        get(&w.s, w.token(Role::Related), "Observation/p-observation")
            .await
            .0,
        404
    );
    // The care relationship does not depend on the Consent.
    assert_eq!(get(&w.s, w.token(Role::Treating), "Patient/p").await.0, 200);
    // Granted again: visible again, with the same tokens.
    w.set_consent("active").await;
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
}

#[tokio::test]
async fn a_consent_revoked_through_another_server_counts_on_the_next_request_here() {
    let w = world().await;
    let clinic = w.token(Role::Clinic);
    // The clinic's circle is loaded here (and kept while nothing changes).
    for _ in 0..2 {
        assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
    }
    // Another server process on the same database, same issuer.
    let other = TestServer::spawn(&w.s.database_url, &[("EHRX_BASE_URL", &w.s.base)]).await;
    let mut c = p_consent("inactive");
    c["id"] = json!(w.consent);
    let path = format!("Consent/{}", w.consent);
    let (st, out) = fhir(&other, w.token(Role::Patient), Method::PUT, &path, Some(&c)).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 404);
    assert_eq!(get(&w.s, clinic, "Observation/p-observation").await.0, 404);
    // Granted again there: visible again here.
    let (st, out) = fhir(
        &other,
        w.token(Role::Patient),
        Method::PUT,
        &path,
        Some(&{
            let mut c = p_consent("active");
            c["id"] = json!(w.consent);
            c
        }),
    )
    .await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
    other.stop().await;
}

#[tokio::test]
async fn a_consent_stops_counting_when_its_period_ends_without_any_write() {
    let w = world().await;
    let clinic = w.token(Role::Clinic);
    let end = chrono::Utc::now() + chrono::Duration::seconds(3);
    let mut c = p_consent("active");
    c["id"] = json!(w.consent);
    c["provision"]["period"] = json!({"end": end.format("%Y-%m-%dT%H:%M:%SZ").to_string()});
    put(&w.s, w.token(Role::Patient), &c).await;
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 200);
    tokio::time::sleep((end - chrono::Utc::now()).to_std().unwrap_or_default()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(get(&w.s, clinic, "Patient/p").await.0, 404);
    // The care relationship is not a Consent: unchanged.
    assert_eq!(get(&w.s, w.token(Role::Treating), "Patient/p").await.0, 200);
}

#[tokio::test]
async fn an_active_care_team_brings_its_members_into_the_circle() {
    let w = world().await;
    let dr = person_token(&w.s, "Practitioner/dr-team").await;
    assert_eq!(get(&w.s, &dr, "Condition/p-condition").await.0, 404);
    assert_eq!(get(&w.s, &dr, "Patient/p").await.0, 404);
    let team = |status: &str| {
        json!({"resourceType": "CareTeam", "id": "team-p", "status": status,
            "subject": {"reference": "Patient/p"},
            "participant": [{"member": {"reference": "Practitioner/dr-team"}}]})
    };
    put(&w.s, &w.admin, &team("active")).await;
    assert_eq!(get(&w.s, &dr, "Patient/p").await.0, 200);
    assert_eq!(get(&w.s, &dr, "Condition/p-condition").await.0, 200);
    // Still nothing of Q.
    assert_eq!(get(&w.s, &dr, "Patient/q").await.0, 404);
    put(&w.s, &w.admin, &team("inactive")).await;
    assert_eq!(get(&w.s, &dr, "Patient/p").await.0, 404);
}

#[tokio::test]
async fn with_consent_default_deny_only_a_consent_lets_anyone_in() {
    let w = world_with(|c| {
        c.consent_default = ehrx::policy::consent::ConsentDefault::Deny;
    })
    .await;
    // Q has no Consent: their general practitioner sees nothing.
    assert_eq!(get(&w.s, w.token(Role::Outside), "Patient/q").await.0, 404);
    // P's Consent permits P's care team (its root) and the clinic.
    assert_eq!(get(&w.s, w.token(Role::Treating), "Patient/p").await.0, 200);
    assert_eq!(get(&w.s, w.token(Role::Clinic), "Patient/p").await.0, 200);
    // Without it, nobody.
    w.set_consent("inactive").await;
    assert_eq!(get(&w.s, w.token(Role::Treating), "Patient/p").await.0, 404);
    assert_eq!(get(&w.s, w.token(Role::Clinic), "Patient/p").await.0, 404);
}

#[tokio::test]
async fn a_patient_may_write_only_their_own_consent() {
    let w = world().await;
    let mut other = p_consent("active");
    other["patient"] = json!({"reference": "Patient/q"});
    let (st, _) = fhir(
        &w.s,
        w.token(Role::Patient),
        Method::POST,
        "Consent",
        Some(&other),
    )
    .await;
    assert_eq!(st, 403);
    let path = format!("Consent/{}", w.consent);
    let mut revoked = p_consent("inactive");
    revoked["id"] = json!(w.consent);
    for role in [Role::Outside, Role::Insurer, Role::Related, Role::Clinic] {
        let (st, _) = fhir(&w.s, w.token(role), Method::PUT, &path, Some(&revoked)).await;
        assert!(st == 403 || st == 404, "{role:?}: {st}");
    }
    let (_, c) = get(&w.s, &w.admin, &path).await;
    assert_eq!(c["status"], "active");
}

#[tokio::test]
async fn masked_insurer_elements_never_appear_in_any_format() {
    let w = world().await;
    let tok = w.token(Role::Insurer);
    let paths = [
        "Claim/p-claim",
        "Claim/p-claim/_history/1",
        "Claim/p-claim/_history",
        "Claim?patient=p",
        "Claim?_id=p-claim&_elements=identifier,item,text",
        "Claim/p-claim?_summary=false",
        "Claim/p-claim?_summary=data",
        "Claim/p-claim?_summary=true",
        "Claim/p-claim?_elements=identifier",
    ];
    // The admin sees the secret: the check can fail.
    let (_, full) = get(&w.s, &w.admin, "Claim/p-claim").await;
    assert!(full.to_string().contains(SECRET));
    for p in paths {
        for format in ["application/fhir+json", "application/fhir+xml"] {
            let r =
                w.s.client
                    .get(w.s.url(p))
                    .bearer_auth(tok)
                    .header("Accept", format)
                    .send()
                    .await
                    .unwrap();
            let st = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert_eq!(st, 200, "{p} {format}: {text}");
            assert!(
                !text.contains(SECRET),
                "{p} {format} shows a masked element: {text}"
            );
            assert!(text.contains("SUBSETTED"), "{p} {format}: {text}");
        }
    }
    let (st, claim) = get(&w.s, tok, "Claim/p-claim").await;
    assert_eq!(st, 200);
    assert!(claim.get("identifier").is_none() && claim.get("text").is_none());
    assert!(claim["supportingInfo"][0].get("valueAttachment").is_none());
    // Searching a masked element would tell what the mask hides: refused,
    // whether the value exists or not.
    for value in [SECRET, "no-such-value"] {
        let (st, out) = get(&w.s, tok, &format!("Claim?identifier={value}")).await;
        assert_eq!(st, 403, "{out}");
    }
    // A Coverage's member id stays; its other identifiers go.
    let (st, cov) = get(&w.s, tok, "Coverage/p-coverage").await;
    assert_eq!(st, 200, "{cov}");
    let (_, full) = get(&w.s, &w.admin, "Coverage/p-coverage").await;
    let member = |c: &Value| {
        c["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["type"]["coding"][0]["code"] == "MB")
            .count()
    };
    assert_eq!((member(&cov), member(&full)), (1, 1));
    assert!(!cov.to_string().contains(SECRET) && full.to_string().contains(SECRET));
    assert_eq!(
        cov["identifier"].as_array().map_or(0, Vec::len),
        member(&full)
    );
}

#[tokio::test]
async fn break_the_glass_is_explicit_limited_and_shown_to_the_patient() {
    let w = world().await;
    let tok = w.token(Role::Emergency);
    assert_eq!(get(&w.s, tok, "Observation/p-observation").await.0, 404);
    let mut no_purpose = btg_request();
    no_purpose["parameter"][0]["valueCoding"]["code"] = json!("TREAT");
    let (st, out) = fhir(
        &w.s,
        tok,
        Method::POST,
        "Patient/p/$emergency-access",
        Some(&no_purpose),
    )
    .await;
    assert_eq!(st, 400, "{out}");
    // Only a practitioner may break the glass.
    let (st, _) = fhir(
        &w.s,
        w.token(Role::Insurer),
        Method::POST,
        "Patient/p/$emergency-access",
        Some(&btg_request()),
    )
    .await;
    assert_eq!(st, 403);
    let (st, granted) = fhir(
        &w.s,
        tok,
        Method::POST,
        "Patient/p/$emergency-access",
        Some(&btg_request()),
    )
    .await;
    assert_eq!(st, 200, "{granted}");
    let expires = granted["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "expires")
        .unwrap()["valueInstant"]
        .as_str()
        .unwrap()
        .to_string();
    let exp = chrono::DateTime::parse_from_rfc3339(&expires)
        .unwrap()
        .timestamp();
    let now = chrono::Utc::now().timestamp();
    assert!(exp > now + 59 * 60 && exp <= now + 61 * 60, "{expires}");
    assert_eq!(get(&w.s, tok, "Observation/p-observation").await.0, 200);
    // Only for that patient.
    assert_eq!(get(&w.s, tok, "Observation/q-observation").await.0, 404);
    // The patient sees it.
    let (st, preview) = get(
        &w.s,
        w.token(Role::Patient),
        "Patient/p/$access-preview?actor=Practitioner/dr-btg",
    )
    .await;
    assert_eq!(st, 200, "{preview}");
    let text = preview.to_string();
    assert!(
        text.contains("emergency-access")
            && text.contains("Practitioner/dr-btg")
            && text.contains("unconscious"),
        "{text}"
    );
    // And in their access log, marked as break-the-glass.
    let (st, log) = get(&w.s, w.token(Role::Patient), "Patient/p/$access-log").await;
    assert_eq!(st, 200, "{log}");
    let marked = log["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "access")
        .find(|p| {
            p["part"][1]["valueString"] == "Practitioner/dr-btg"
                && p["part"][6]["valueBoolean"] == true
        });
    assert!(
        marked.is_some(),
        "no break-the-glass access of dr-btg in {log}"
    );
}

#[tokio::test]
async fn every_consent_change_is_audited_for_the_patient() {
    let w = world().await;
    w.set_consent("inactive").await;
    let (st, b) = get(
        &w.s,
        w.token(Role::Patient),
        "AuditEvent?patient=p&subtype=consent-change&_count=100",
    )
    .await;
    assert_eq!(st, 200, "{b}");
    // The Consent's creation and its revocation.
    assert_eq!(b["entry"].as_array().map_or(0, Vec::len), 2, "{b}");
}

#[tokio::test]
async fn access_preview_counts_what_an_actor_could_read_and_why() {
    let w = world().await;
    let (st, preview) = get(
        &w.s,
        w.token(Role::Patient),
        "Patient/p/$access-preview?actor=Practitioner/dr-org",
    )
    .await;
    assert_eq!(st, 200, "{preview}");
    let mut wrong = Vec::new();
    for p in preview["parameter"].as_array().unwrap() {
        if p["name"] != "type" {
            continue;
        }
        let parts = p["part"].as_array().unwrap();
        let val = |n: &str| parts.iter().find(|x| x["name"] == n).cloned().unwrap();
        let t = val("type")["valueCode"].as_str().unwrap().to_string();
        let visible = val("visible")["valueInteger"].as_i64().unwrap();
        let want = w
            .p_recs()
            .filter(|r| r.rtype == t && Role::Clinic.sees(r))
            .count() as i64;
        if visible != want {
            wrong.push(format!("{t}: {visible}, expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
    let text = preview.to_string();
    assert!(
        text.contains(&format!("Consent/{}.provision.provision[3]", w.consent)),
        "{text}"
    );
    // Nobody else may ask.
    for role in [Role::Treating, Role::Outside, Role::Related] {
        let (st, _) = get(
            &w.s,
            w.token(role),
            "Patient/p/$access-preview?actor=Practitioner/dr-org",
        )
        .await;
        assert_eq!(st, 403, "{role:?}");
    }
}
