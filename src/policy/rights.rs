//! Who may change a patient's record, and how: patients' rights, consent
//! authorship and four-eyes amendments, as pure decisions over the
//! caller's role and the stored and proposed contents.
//!
//! - A patient changes their own `Patient` only in its demographic elements
//!   ([`DEMOGRAPHIC`]); creates and edits their own patient-reported data
//!   (marked with the [`PATIENT_REPORTED`] tag), never what a clinician
//!   recorded; and writes their own Consents.
//! - A practitioner records a Consent on a patient's behalf only with a
//!   `Provenance` in the same transaction naming them ([`vouches`]).
//! - A practitioner's update or delete of an existing resource of an
//!   amendment-gated type ([`gated`]) becomes a proposal that another
//!   practitioner approves.
//! - Pending amendments and correction requests (Tasks tagged
//!   [`QUEUE`]) change only through `$approve` and `$reject`.
//!
//! The interaction layer (`interaction::rights`) applies these on every
//! write path; here everything is data in, decision out.

use serde_json::{json, Value};

use super::role::Role;
use crate::error::{Error, Result};
use crate::search::compartment::in_compartment_definition;

/// ehrx's own code system for how a record came about and for its
/// workflow codes.
pub const ORIGIN_SYSTEM: &str = "https://ehrx.example/fhir/CodeSystem/provenance-origin";
pub const WORKFLOW_SYSTEM: &str = "https://ehrx.example/fhir/CodeSystem/workflow";

/// `meta.tag` of data a patient recorded themselves.
pub const PATIENT_REPORTED: (&str, &str) = (ORIGIN_SYSTEM, "patient-reported");
/// `meta.tag` of every Task in the amendment queue (proposed amendments
/// and patients' correction requests).
pub const QUEUE: (&str, &str) = (WORKFLOW_SYSTEM, "amendment-queue");
/// `Task.code` of a proposed amendment.
pub const AMENDMENT: (&str, &str) = (WORKFLOW_SYSTEM, "amendment");
/// `Provenance.activity` of an applied amendment.
pub const AMEND: (&str, &str) = (WORKFLOW_SYSTEM, "amend");

/// HL7 Patient Request for Corrections IG: the Task and Communication
/// type of a correction request, its business statuses and output type.
pub const CORRECTION_TASK_TYPES: &str =
    "http://hl7.org/fhir/uv/patient-corrections/CodeSystem/PatientCorrectionTaskTypes";
pub const CORRECTION_COMMUNICATION_TYPES: &str =
    "http://hl7.org/fhir/uv/patient-corrections/CodeSystem/PatientCorrectionCommunicationTypes";
pub const CORRECTION_BUSINESS_STATUS: &str =
    "http://hl7.org/fhir/uv/patient-corrections/CodeSystem/PatientCorrectionBusinessStatus";
pub const CORRECTION_OUTPUT_TYPES: &str =
    "http://hl7.org/fhir/uv/patient-corrections/CodeSystem/PatientCorrectionOutputTypes";
/// The code of a request for correction (Task and Communication).
pub const CORRECTION_REQUEST: &str = "medRecCxReq";

/// The elements of `Patient` a patient may change themselves.
pub const DEMOGRAPHIC: &[&str] = &[
    "name",
    "telecom",
    "address",
    "contact",
    "communication",
    "maritalStatus",
    "photo",
    "gender",
];

/// Deepest nesting of `Consent.provision` accepted (the root provision is
/// level 1): the consent search parameter `actor` indexes three levels, so
/// a deeper actor could not be found by search.
pub const MAX_PROVISION_DEPTH: usize = 3;

/// A refusal of the caller's role (403), naming the element.
pub fn refused(message: impl Into<String>, expression: Option<String>) -> Error {
    Error::Refused {
        message: message.into(),
        expression,
    }
}

/// A refusal by a rule of the record (422), naming the element.
pub fn rule(message: impl Into<String>, expression: Option<String>) -> Error {
    Error::Rule {
        message: message.into(),
        expression,
    }
}

fn has_tag(resource: &Value, (system, code): (&str, &str)) -> bool {
    resource
        .pointer("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter().any(|t| {
                t.get("system").and_then(Value::as_str) == Some(system)
                    && t.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

/// Adds `tag` to `resource.meta.tag` unless it is there.
pub fn add_tag(resource: &mut Value, (system, code): (&str, &str)) {
    if has_tag(resource, (system, code)) {
        return;
    }
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let tags = meta
        .as_object_mut()
        .expect("an object")
        .entry("tag")
        .or_insert_with(|| json!([]));
    if !tags.is_array() {
        *tags = json!([]);
    }
    tags.as_array_mut()
        .expect("an array")
        .push(json!({"system": system, "code": code}));
}

/// Whether `resource` is marked as recorded by the patient.
pub fn is_patient_reported(resource: &Value) -> bool {
    has_tag(resource, PATIENT_REPORTED)
}

/// Whether `resource` is a Task of the amendment queue.
pub fn is_queue_task(resource: &Value) -> bool {
    resource.get("resourceType").and_then(Value::as_str) == Some("Task") && has_tag(resource, QUEUE)
}

/// The top-level elements in which `old` and `new` differ, in a stable
/// order; `id`, `resourceType` and the server's `meta.versionId` and
/// `meta.lastUpdated` are not compared.
pub fn changed_elements(old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !matches!(k.as_str(), "id" | "resourceType"))
        .filter(|k| {
            if k.as_str() == "meta" {
                client_meta(o.get("meta")) != client_meta(n.get("meta"))
            } else {
                o.get(k.as_str()) != n.get(k.as_str())
            }
        })
        .cloned()
        .collect()
}

/// `meta` without what the server sets.
fn client_meta(meta: Option<&Value>) -> Option<Value> {
    let mut m = meta?.as_object()?.clone();
    m.shift_remove("versionId");
    m.shift_remove("lastUpdated");
    (!m.is_empty()).then_some(Value::Object(m))
}

/// The elements of a `Patient` update outside [`DEMOGRAPHIC`], as
/// `Patient.element`.
pub fn non_demographic_changes(old: &Value, new: &Value) -> Vec<String> {
    changed_elements(old, new)
        .into_iter()
        .filter(|e| !DEMOGRAPHIC.contains(&e.as_str()))
        .map(|e| format!("Patient.{e}"))
        .collect()
}

/// A patient's change of their own `Patient`: only demographic elements.
pub fn check_patient_self_update(old: &Value, new: &Value) -> Result<()> {
    let others = non_demographic_changes(old, new);
    match others.first() {
        None => Ok(()),
        Some(first) => Err(refused(
            format!(
                "a patient may change only the demographic elements of their Patient ({}); \
                 this update also changes {}",
                DEMOGRAPHIC.join(", "),
                others.join(", ")
            ),
            Some(first.clone()),
        )),
    }
}

/// How deep `Consent.provision` nests (0 without a provision).
pub fn provision_depth(consent: &Value) -> usize {
    fn depth(p: &Value) -> usize {
        1 + p
            .get("provision")
            .and_then(Value::as_array)
            .map(|cs| cs.iter().map(depth).max().unwrap_or(0))
            .unwrap_or(0)
    }
    consent.get("provision").map(depth).unwrap_or(0)
}

/// At most [`MAX_PROVISION_DEPTH`] levels of provisions.
pub fn check_provision_depth(consent: &Value) -> Result<()> {
    let d = provision_depth(consent);
    if d > MAX_PROVISION_DEPTH {
        let path = std::iter::repeat_n("provision", MAX_PROVISION_DEPTH + 1)
            .collect::<Vec<_>>()
            .join(".");
        return Err(rule(
            format!(
                "Consent provisions nest {d} levels deep; at most {MAX_PROVISION_DEPTH} are accepted \
                 (the actor search parameter indexes three levels)"
            ),
            Some(format!("Consent.{path}")),
        ));
    }
    Ok(())
}

/// Who may write a Consent of a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentAuthor {
    /// The patient themselves, the administrator or a system client.
    Allowed,
    /// A practitioner: only with a Provenance in the same transaction
    /// naming one of these references as `agent.who`.
    WithProvenance(Vec<String>),
}

/// The rule for writing a Consent whose patient is `patient` (`Patient/ID`,
/// of the new and, for a change, of the stored version).
pub fn consent_author(role: &Role, patients: &[Option<&str>]) -> Result<ConsentAuthor> {
    let whose = |own: &str| {
        let own = format!("Patient/{own}");
        patients.iter().all(|p| *p == Some(own.as_str()))
    };
    match role {
        Role::Patient(own) if whose(own) => Ok(ConsentAuthor::Allowed),
        Role::Patient(_) => Err(refused(
            "a patient writes only their own Consents",
            Some("Consent.patient".into()),
        )),
        Role::Practitioner(_) => Ok(ConsentAuthor::WithProvenance(
            role.reference().into_iter().collect(),
        )),
        Role::System | Role::Administrator => Ok(ConsentAuthor::Allowed),
        other => Err(refused(
            format!(
                "a {} may not write a patient's Consent; the patient does, or a practitioner \
                 on their behalf with a Provenance",
                other.name()
            ),
            Some("Consent".into()),
        )),
    }
}

/// Whether `provenance` names `target` (`Type/id`, any version) among its
/// targets and one of `agents` as an `agent.who`.
pub fn vouches(provenance: &Value, target: &str, agents: &[String]) -> bool {
    let refs = |field: &str, inner: &str| -> Vec<String> {
        provenance
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let r = if inner.is_empty() {
                    v.get("reference")
                } else {
                    v.pointer(inner)
                };
                r.and_then(Value::as_str).map(unversioned)
            })
            .collect()
    };
    provenance.get("resourceType").and_then(Value::as_str) == Some("Provenance")
        && refs("target", "").iter().any(|t| t == target)
        && refs("agent", "/who/reference")
            .iter()
            .any(|a| agents.contains(a))
}

/// `Type/id` of a relative reference, without `_history/n`.
pub fn unversioned(reference: &str) -> String {
    let segs: Vec<&str> = reference.split('/').collect();
    match segs.as_slice() {
        [.., t, id, "_history", _] => format!("{t}/{id}"),
        [.., t, id] => format!("{t}/{id}"),
        _ => reference.to_string(),
    }
}

/// The types gated by default: every type of the Patient compartment but
/// `Consent` (a Patient's demographic elements are never gated).
pub fn default_amendment_types() -> Vec<String> {
    crate::fhir::types::RESOURCE_TYPES
        .iter()
        .filter(|t| **t == "Patient" || in_compartment_definition("Patient", t))
        .filter(|t| **t != "Consent")
        .map(|t| t.to_string())
        .collect()
}

/// Whether a practitioner's change of `rtype` from `old` to `new` (`None`:
/// a delete) needs a second practitioner, given the gated `types`.
pub fn gated(types: &[String], rtype: &str, old: &Value, new: Option<&Value>) -> bool {
    if !types.iter().any(|t| t == rtype) || is_patient_reported(old) {
        return false;
    }
    match (rtype, new) {
        ("Patient", Some(new)) => !non_demographic_changes(old, new).is_empty(),
        _ => true,
    }
}

/// What a write of `rtype` must be, by the caller's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store it as it is.
    Store,
    /// Store it marked as patient-reported, with a Provenance naming the
    /// patient as author.
    StoreAsPatientReported(String),
    /// Do not change the record: propose an amendment.
    Propose,
}

/// The decision for a write by `role` of `rtype`: `old` is the stored
/// version (`None` for a create), `new` the proposed one (`None` for a
/// delete). Consents and queue Tasks have their own rules
/// ([`consent_author`], [`is_queue_task`]) and are not decided here.
pub fn decide(
    role: &Role,
    gated_types: &[String],
    rtype: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<Verdict> {
    match role {
        Role::Patient(own) => patient_write(own, rtype, old, new),
        Role::Practitioner(_) => {
            if let Some(n) = new {
                if is_patient_reported(n) && !old.is_some_and(is_patient_reported) {
                    return Err(refused(
                        "only the patient marks data as patient-reported",
                        Some(format!("{rtype}.meta.tag")),
                    ));
                }
            }
            Ok(match old {
                Some(o) if gated(gated_types, rtype, o, new) => Verdict::Propose,
                _ => Verdict::Store,
            })
        }
        _ => Ok(Verdict::Store),
    }
}

fn patient_write(
    own: &str,
    rtype: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<Verdict> {
    if rtype == "Patient" {
        return match (old, new) {
            (Some(o), Some(n)) => check_patient_self_update(o, n).map(|_| Verdict::Store),
            (Some(_), None) => Err(refused(
                "a patient may not delete their Patient record",
                Some("Patient".into()),
            )),
            (None, _) => Ok(Verdict::Store),
        };
    }
    match old {
        Some(o) if !is_patient_reported(o) => Err(refused(
            format!(
                "{rtype}/{} was recorded by a clinician: a patient may not change or delete it; \
                 ask for a correction with POST Patient/{own}/$correction-request",
                o.get("id").and_then(Value::as_str).unwrap_or("?")
            ),
            Some(rtype.to_string()),
        )),
        _ => Ok(Verdict::StoreAsPatientReported(own.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::role::Practitioner;

    fn patient() -> Value {
        json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"},
            "name": [{"family": "Old"}], "birthDate": "1970-01-01", "active": true})
    }

    #[test]
    fn every_demographic_element_is_a_patients_to_change() {
        for e in DEMOGRAPHIC {
            let mut new = patient();
            new[*e] = json!([{"text": "changed"}]);
            assert!(check_patient_self_update(&patient(), &new).is_ok(), "{e}");
        }
    }

    #[test]
    fn any_other_element_is_refused_by_name() {
        for e in [
            "birthDate",
            "active",
            "identifier",
            "generalPractitioner",
            "extension",
        ] {
            let mut new = patient();
            new[e] = json!("x");
            match check_patient_self_update(&patient(), &new) {
                Err(Error::Refused { expression, .. }) => {
                    assert_eq!(expression.as_deref(), Some(format!("Patient.{e}").as_str()))
                }
                other => panic!("{e}: {other:?}"),
            }
        }
        // The server's own meta elements are not the client's change.
        let mut new = patient();
        new["meta"] = json!({"versionId": "9", "lastUpdated": "2020-01-01T00:00:00Z"});
        assert!(check_patient_self_update(&patient(), &new).is_ok());
        new["meta"]["security"] = json!([{"code": "R"}]);
        assert!(check_patient_self_update(&patient(), &new).is_err());
    }

    #[test]
    fn a_patient_edits_only_patient_reported_data() {
        let role = Role::Patient("p1".into());
        let clinical = json!({"resourceType": "Observation", "id": "o"});
        let mut own = clinical.clone();
        add_tag(&mut own, PATIENT_REPORTED);
        assert_eq!(
            decide(&role, &[], "Observation", None, Some(&clinical)).unwrap(),
            Verdict::StoreAsPatientReported("p1".into())
        );
        assert!(decide(&role, &[], "Observation", Some(&clinical), Some(&own)).is_err());
        assert!(decide(&role, &[], "Observation", Some(&clinical), None).is_err());
        assert!(decide(&role, &[], "Observation", Some(&own), None).is_ok());
    }

    #[test]
    fn practitioners_changes_of_gated_types_are_proposals() {
        let role = Role::Practitioner(Practitioner::Id("a".into()));
        let types = default_amendment_types();
        assert!(types.contains(&"Observation".to_string()));
        assert!(!types.contains(&"Consent".to_string()));
        assert!(!types.contains(&"Task".to_string()));
        let o = json!({"resourceType": "Observation", "id": "o", "status": "final"});
        let n = json!({"resourceType": "Observation", "id": "o", "status": "amended"});
        assert_eq!(
            decide(&role, &types, "Observation", Some(&o), Some(&n)).unwrap(),
            Verdict::Propose
        );
        assert_eq!(
            decide(&role, &types, "Observation", None, Some(&n)).unwrap(),
            Verdict::Store
        );
        assert_eq!(
            decide(&role, &[], "Observation", Some(&o), Some(&n)).unwrap(),
            Verdict::Store
        );
        // Demographics of a Patient are not gated; other elements are.
        let mut p2 = patient();
        p2["name"] = json!([{"family": "New"}]);
        assert!(!gated(&types, "Patient", &patient(), Some(&p2)));
        p2["birthDate"] = json!("1971-01-01");
        assert!(gated(&types, "Patient", &patient(), Some(&p2)));
        // A practitioner does not mark data as the patient's.
        let mut forged = n.clone();
        add_tag(&mut forged, PATIENT_REPORTED);
        assert!(decide(&role, &types, "Observation", None, Some(&forged)).is_err());
    }

    #[test]
    fn provisions_nest_three_levels_at_most() {
        let three = json!({"provision": {"provision": [{"provision": [{"type": "deny"}]}]}});
        assert_eq!(provision_depth(&three), 3);
        assert!(check_provision_depth(&three).is_ok());
        let four = json!({"provision": {"provision": [{"provision": [{"provision": [{}]}]}]}});
        assert!(check_provision_depth(&four).is_err());
    }

    #[test]
    fn consent_authors_by_role() {
        let mine = [Some("Patient/p1")];
        assert_eq!(
            consent_author(&Role::Patient("p1".into()), &mine).unwrap(),
            ConsentAuthor::Allowed
        );
        assert!(consent_author(&Role::Patient("p2".into()), &mine).is_err());
        assert!(consent_author(&Role::RelatedPerson("r".into()), &mine).is_err());
        assert!(consent_author(
            &Role::Insurer {
                organization: "o".into(),
                rules: "claims".into()
            },
            &mine
        )
        .is_err());
        assert_eq!(
            consent_author(&Role::Practitioner(Practitioner::Id("a".into())), &mine).unwrap(),
            ConsentAuthor::WithProvenance(vec!["Practitioner/a".into()])
        );
        let prov = json!({"resourceType": "Provenance",
            "target": [{"reference": "Consent/c/_history/1"}, {"reference": "Patient/p1"}],
            "agent": [{"who": {"reference": "Practitioner/a"}}]});
        assert!(vouches(&prov, "Consent/c", &["Practitioner/a".into()]));
        assert!(!vouches(&prov, "Consent/c", &["Practitioner/b".into()]));
        assert!(!vouches(&prov, "Consent/d", &["Practitioner/a".into()]));
    }
}
