//! The write rules of `policy::rights` on every write path: create,
//! update, patch and delete (alone or in a Bundle) pass through
//! [`before_write`] or [`before_delete`], which refuse, let the write
//! through (marking a patient's own data as patient-reported), or turn a
//! practitioner's change into a proposed amendment (`super::amend`).
//!
//! Two things a write path does not pass down explicitly come from the
//! request's scope, the way `crate::limits` does: the amendment-gated
//! types of the configuration ([`scope`]), and the Provenances of the
//! transaction being processed ([`with_vouchers`]), which let a
//! practitioner record a Consent on a patient's behalf.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{amend, new_id, now, store_version, Written};
use crate::error::Result;
use crate::policy::rights::{self, ConsentAuthor, Verdict};
use crate::policy::scope::Ops;
use crate::policy::Access;
use crate::store::{Version, Writer};

tokio::task_local! {
    static GATED: Arc<Vec<String>>;
    static VOUCHERS: Arc<Vec<Value>>;
}

/// Runs `f` (a request) with `gated` as the amendment-gated types.
pub async fn scope<F: std::future::Future>(gated: Arc<Vec<String>>, f: F) -> F::Output {
    GATED.scope(gated, f).await
}

/// Runs `f` (the writes of a transaction) knowing the Provenances it
/// carries.
pub async fn with_vouchers<F: std::future::Future>(vouchers: Vec<Value>, f: F) -> F::Output {
    VOUCHERS.scope(Arc::new(vouchers), f).await
}

fn gated_types() -> Arc<Vec<String>> {
    GATED
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::new(rights::default_amendment_types()))
}

/// What to do with a write that passed the rules.
pub(super) enum Before {
    /// Store it; for a patient's own data, then record a Provenance
    /// naming them (`Some(patient id)`).
    Store(Option<String>),
    /// Not stored: an amendment was proposed instead (202, the Task).
    Proposed(Box<Written>),
}

/// The references naming the caller as a person (not the organisations
/// or care teams it belongs to).
pub(super) fn personal_identity(access: &Access) -> Vec<String> {
    let mut out: Vec<String> = access.role().reference().into_iter().collect();
    if let Some(c) = access.circle() {
        out.extend(
            c.facts()
                .identity
                .iter()
                .filter(|r| r.starts_with("Practitioner/") || r.starts_with("PractitionerRole/"))
                .cloned(),
        );
    }
    out.sort();
    out.dedup();
    out
}

fn consent_patient(c: &Value) -> Option<&str> {
    c.pointer("/patient/reference").and_then(Value::as_str)
}

/// The Consent rules: provision depth (for everyone), and who may write it.
fn check_consent(
    access: &Access,
    id: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<()> {
    if let Some(n) = new {
        rights::check_provision_depth(n)?;
    }
    let patients: Vec<Option<&str>> = old
        .iter()
        .chain(new.iter())
        .map(|c| consent_patient(c))
        .collect();
    match rights::consent_author(access.role(), &patients)? {
        ConsentAuthor::Allowed => Ok(()),
        ConsentAuthor::WithProvenance(_) => {
            let agents = personal_identity(access);
            let target = format!("Consent/{id}");
            let vouched = VOUCHERS
                .try_with(|v| v.iter().any(|p| rights::vouches(p, &target, &agents)))
                .unwrap_or(false);
            if vouched {
                Ok(())
            } else {
                Err(rights::rule(
                    format!(
                        "a practitioner records a patient's Consent only on their behalf: send it in \
                         a transaction Bundle together with a Provenance whose target names {target} \
                         (and the Patient) and whose agent.who is {}",
                        agents.first().map(String::as_str).unwrap_or("you")
                    ),
                    Some("Consent".into()),
                ))
            }
        }
    }
}

fn check_queue_task(rtype: &str, old: Option<&Value>, new: Option<&Value>) -> Result<()> {
    if rtype == "Task" && old.into_iter().chain(new).any(rights::is_queue_task) {
        return Err(rights::refused(
            "pending amendments and correction requests are created by the server and change \
             only through $approve and $reject",
            Some("Task.meta.tag".into()),
        ));
    }
    Ok(())
}

/// Before a create (`prev` `None`) or an update of the live version
/// `prev`: the caller's rights on this content. May mark `resource`.
pub(super) async fn before_write(
    tx: &mut Writer,
    rtype: &str,
    id: &str,
    prev: Option<&Version>,
    resource: &mut Value,
) -> Result<Before> {
    if tx.access().is_unrestricted() {
        return Ok(Before::Store(None));
    }
    let old = prev.map(stored_body).transpose()?;
    if rtype == "Consent" {
        check_consent(tx.access(), id, old.as_ref(), Some(resource))?;
        return Ok(Before::Store(None));
    }
    check_queue_task(rtype, old.as_ref(), Some(resource))?;
    let gated = gated_types();
    match rights::decide(
        tx.access().role(),
        &gated,
        rtype,
        old.as_ref(),
        Some(resource),
    )? {
        Verdict::Store => Ok(Before::Store(None)),
        Verdict::StoreAsPatientReported(p) => {
            rights::add_tag(resource, rights::PATIENT_REPORTED);
            Ok(Before::Store(Some(p)))
        }
        Verdict::Propose => {
            let cur = prev.expect("only a change is proposed");
            let w = amend::propose(tx, cur, Some(resource.clone())).await?;
            Ok(Before::Proposed(Box::new(w)))
        }
    }
}

/// Before a delete of the live version `cur`: `Some` when an amendment
/// was proposed instead.
pub(super) async fn before_delete(tx: &mut Writer, cur: &Version) -> Result<Option<Written>> {
    if tx.access().is_unrestricted() {
        return Ok(None);
    }
    let old = stored_body(cur)?;
    if cur.rtype == "Consent" {
        check_consent(tx.access(), &cur.id, Some(&old), None)?;
        return Ok(None);
    }
    check_queue_task(&cur.rtype, Some(&old), None)?;
    let gated = gated_types();
    match rights::decide(tx.access().role(), &gated, &cur.rtype, Some(&old), None)? {
        Verdict::Store | Verdict::StoreAsPatientReported(_) => Ok(None),
        Verdict::Propose => Ok(Some(amend::propose(tx, cur, None).await?)),
    }
}

fn stored_body(v: &Version) -> Result<Value> {
    super::parse_stored(v.body.as_deref().unwrap_or("{}"))
}

/// The Provenance of a patient's own create or update of `w`.
pub(super) async fn patient_provenance(
    tx: &mut Writer,
    w: &Written,
    patient: &str,
    update: bool,
) -> Result<()> {
    let mut targets = vec![json!({"reference": w.versioned_path()})];
    if w.rtype != "Patient" {
        // So that the Provenance is part of the patient's record: the
        // Patient compartment reaches a Provenance through its target.
        targets.push(json!({"reference": format!("Patient/{patient}")}));
    }
    let p = json!({
        "resourceType": "Provenance",
        "target": targets,
        "recorded": now(),
        "activity": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": if update { "UPDATE" } else { "CREATE" }
        }]},
        "agent": [{
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "code": "author"
            }]},
            "who": {"reference": format!("Patient/{patient}")}
        }]
    });
    store_version(tx, Ops::CREATE, "Provenance", &new_id(), None, p).await?;
    Ok(())
}
