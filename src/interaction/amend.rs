//! Four-eyes amendments: a practitioner's change of an existing clinical
//! resource becomes a `Task` in the amendment queue, and only another
//! practitioner with access to the patient applies it.
//!
//! - [`propose`]: the Task (`status` requested, `focus` the resource at the
//!   version the proposal was made on, `input` the proposed version as a
//!   contained resource or a delete marker, `requester` the author, tagged
//!   `amendment-queue`); the record is unchanged, the caller gets 202.
//! - [`approve`]: in one transaction, checks the Task is still requested
//!   (its row is locked on PostgreSQL, and SQLite has one writer, so of
//!   concurrent approvals exactly one finds it requested; a second
//!   completion of the same Task version would fail on the version's
//!   uniqueness anyway), refuses self-approval, refuses (409) when the
//!   resource changed since the proposal, applies the change, records a
//!   `Provenance` (activity `amend`, author and verifier, both
//!   signatures) and completes the Task.
//! - [`reject`]: the Task becomes `rejected` with the reason; the record is
//!   unchanged.
//!
//! Patients' correction requests (`super::correction`) sit in the same
//! queue and are closed by the same two operations.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::rights::personal_identity;
use super::{live, new_id, now, parse_stored, store_tombstone, store_version, Written};
use crate::error::{Error, Result};
use crate::policy::patient_data::{self, Reach};
use crate::policy::rights::{self, AMEND, AMENDMENT, QUEUE, WORKFLOW_SYSTEM};
use crate::policy::scope::Ops;
use crate::policy::Role;
use crate::search::index;
use crate::store::{Found, Version, Writer};

const TASK_CODE: &str = "http://hl7.org/fhir/CodeSystem/task-code";
const SIGNATURE_TYPE: &str = "urn:iso-astm:E1762-95:2013";
const PARTICIPANT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
const DATA_OPERATION: &str = "http://terminology.hl7.org/CodeSystem/v3-DataOperation";

/// The id of the contained proposed version in an amendment Task.
const PROPOSED: &str = "proposed";

/// The patient whose record `resource` belongs to, if any.
pub fn patient_of(rtype: &str, resource: &Value) -> Option<String> {
    if rtype == "Patient" {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    let Reach::Own(params) = patient_data::reach(rtype) else {
        return None;
    };
    index::extract(rtype, resource)
        .references
        .into_iter()
        .find(|r| r.target_type == "Patient" && params.contains(&r.param))
        .map(|r| r.target_id)
}

fn coding(system: &str, code: &str) -> Value {
    json!({"system": system, "code": code})
}

fn has_code(task: &Value, system: &str, code: &str) -> bool {
    task.pointer("/code/coding")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(system)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

/// Proposes replacing the live version `cur` by `proposed` (`None`: its
/// deletion): stores the Task and answers it with 202.
pub async fn propose(tx: &mut Writer, cur: &Version, proposed: Option<Value>) -> Result<Written> {
    let stored = parse_stored(cur.body.as_deref().unwrap_or("{}"))?;
    let requester = tx.access().role().reference().ok_or_else(|| {
        Error::Forbidden("an amendment needs an author named by the token (fhirUser)".into())
    })?;
    let target = format!("{}/{}", cur.rtype, cur.id);
    crate::audit::context::note(
        crate::audit::EventType::amendment_proposed(),
        crate::audit::Action::Create,
        crate::audit::context::patients_of(&cur.rtype, &cur.id, cur.body.as_deref()),
        target.clone(),
    );
    if tx.access().check_type(Ops::CREATE, "Task").is_err() {
        return Err(rights::refused(
            format!(
                "a practitioner's change of {target} is an amendment that another practitioner \
                 approves, kept as a Task: the token needs a scope that creates Task \
                 (user/Task.c, or patient/Task.c)"
            ),
            None,
        ));
    }
    let what = if proposed.is_some() {
        "Update"
    } else {
        "Deletion"
    };
    let mut task = json!({
        "resourceType": "Task",
        "meta": {"tag": [coding(QUEUE.0, QUEUE.1)]},
        "status": "requested",
        "intent": "proposal",
        "code": {
            "coding": [
                coding(AMENDMENT.0, AMENDMENT.1),
                coding(TASK_CODE, "change")
            ],
            "text": "Amendment of a clinical record (four-eyes)"
        },
        "description": format!("{what} of {target} proposed by {requester}, awaiting another practitioner's approval"),
        "focus": {"reference": format!("{target}/_history/{}", cur.version)},
        "authoredOn": now(),
        "requester": {"reference": requester},
    });
    if let Some(p) = patient_of(&cur.rtype, &stored) {
        task["for"] = json!({"reference": format!("Patient/{p}")});
    }
    match proposed {
        Some(mut p) => {
            if let Some(o) = p.as_object_mut() {
                o.insert("id".into(), json!(PROPOSED));
                if let Some(meta) = o.get_mut("meta").and_then(Value::as_object_mut) {
                    meta.shift_remove("versionId");
                    meta.shift_remove("lastUpdated");
                }
            }
            task["contained"] = json!([p]);
            task["input"] = json!([{
                "type": {"coding": [coding(WORKFLOW_SYSTEM, "proposed-version")]},
                "valueReference": {"reference": format!("#{PROPOSED}")}
            }]);
        }
        None => {
            task["input"] = json!([{
                "type": {"coding": [coding(WORKFLOW_SYSTEM, "delete")]},
                "valueBoolean": true
            }]);
        }
    }
    let mut w = store_version(tx, Ops::CREATE, "Task", &new_id(), None, task).await?;
    w.status = StatusCode::ACCEPTED;
    Ok(w)
}

/// A queue Task, live and still pending, locked for this transaction.
async fn pending(tx: &mut Writer, id: &str) -> Result<(Version, Value)> {
    super::check_id(id)?;
    let found = tx.current_for_write("Task", id).await?;
    let cur = live(found, "Task", id)?;
    let task = parse_stored(cur.body.as_deref().unwrap_or("{}"))?;
    if !rights::is_queue_task(&task) {
        return Err(rights::rule(
            format!("Task/{id} is not a pending amendment or correction request"),
            Some("Task.meta.tag".into()),
        ));
    }
    let status = task.get("status").and_then(Value::as_str).unwrap_or("");
    if status != "requested" {
        return Err(Error::Conflict(format!(
            "Task/{id} is no longer pending: its status is '{status}'"
        )));
    }
    if !matches!(tx.access().role(), Role::Practitioner(_)) {
        return Err(rights::refused(
            "only a practitioner decides on an amendment or correction request",
            None,
        ));
    }
    Ok((cur, task))
}

fn reference_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// `POST Task/{id}/$approve`: applies a proposed amendment (or accepts a
/// correction request) by a practitioner other than its author.
/// Notes the decision on amendment or correction request `Task/{id}` for
/// the audit (recorded with the decision's writes).
fn note_decision(id: &str, task: &Value) {
    let body = task.to_string();
    crate::audit::context::note(
        crate::audit::EventType::amendment_decided(),
        crate::audit::Action::Update,
        crate::audit::context::patients_of("Task", id, Some(&body)),
        format!("Task/{id}"),
    );
}

pub async fn approve(tx: &mut Writer, id: &str, note: Option<&str>) -> Result<Written> {
    let (task_version, mut task) = pending(tx, id).await?;
    note_decision(id, &task);
    let approver = tx
        .access()
        .role()
        .reference()
        .expect("a practitioner has a reference");
    let requester = reference_at(&task, "/requester/reference")
        .unwrap_or("")
        .to_string();
    if personal_identity(tx.access()).contains(&requester) {
        return Err(rights::refused(
            format!("{requester} proposed this amendment and may not approve it: another practitioner does"),
            Some("Task.requester".into()),
        ));
    }
    let decided = now();
    if has_code(&task, AMENDMENT.0, AMENDMENT.1) {
        let applied = apply(tx, &task, &requester, &approver, id).await?;
        task["output"] = json!([{
            "type": {"coding": [coding(WORKFLOW_SYSTEM, "applied-version")]},
            "valueReference": {"reference": applied}
        }]);
    } else {
        task["businessStatus"] =
            json!({"coding": [coding(rights::CORRECTION_BUSINESS_STATUS, "accepted")]});
        task["output"] = json!([{
            "type": {"coding": [coding(rights::CORRECTION_OUTPUT_TYPES, "medRecCxReqResolution")]},
            "valueString": note.unwrap_or("The request for correction was accepted.")
        }]);
    }
    task["status"] = json!("completed");
    task["owner"] = json!({"reference": approver});
    task["lastModified"] = json!(decided);
    if let Some(n) = note {
        push_note(&mut task, &approver, n);
    }
    store_version(tx, Ops::UPDATE, "Task", id, Some(&task_version), task).await
}

/// Applies the amendment `task` proposes; its Provenance names the author
/// and the verifier. Returns the new version's `Type/id/_history/n`.
async fn apply(
    tx: &mut Writer,
    task: &Value,
    requester: &str,
    approver: &str,
    task_id: &str,
) -> Result<String> {
    let focus = reference_at(task, "/focus/reference").unwrap_or("");
    let parts: Vec<&str> = focus.split('/').collect();
    let [rtype, rid, "_history", base] = parts.as_slice() else {
        return Err(rights::rule(
            format!("Task/{task_id} names no version of a resource in its focus"),
            Some("Task.focus".into()),
        ));
    };
    let base: i64 = base
        .parse()
        .map_err(|_| Error::invalid_at(format!("'{focus}' has no version number"), "Task.focus"))?;
    let cur = match tx.current_for_write(rtype, rid).await? {
        Found::Live(v) => v,
        Found::Deleted(_) => {
            return Err(Error::Conflict(format!(
                "{rtype}/{rid} was deleted after the amendment was proposed on version {base}"
            )))
        }
        Found::Absent => return Err(super::not_known(rtype, rid)),
    };
    if cur.version != base {
        return Err(Error::Conflict(format!(
            "{rtype}/{rid} changed since the amendment was proposed on version {base} \
             (it is now version {}); reject it and propose again on the current version",
            cur.version
        )));
    }
    let delete = task
        .get("input")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|i| i.get("valueBoolean") == Some(&json!(true)));
    let written = if delete {
        store_tombstone(tx, &cur).await?
    } else {
        let mut proposed = task
            .get("contained")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|r| r.get("id").and_then(Value::as_str) == Some(PROPOSED))
            })
            .cloned()
            .ok_or_else(|| {
                rights::rule(
                    format!("Task/{task_id} carries no proposed version"),
                    Some("Task.contained".into()),
                )
            })?;
        proposed["id"] = json!(rid);
        store_version(tx, Ops::UPDATE, rtype, rid, Some(&cur), proposed).await?
    };
    let applied = written.versioned_path();
    let mut targets = vec![json!({"reference": applied})];
    if let Some(p) = reference_at(task, "/for/reference") {
        if *rtype != "Patient" {
            targets.push(json!({"reference": p}));
        }
    }
    let authored = task
        .get("authoredOn")
        .cloned()
        .unwrap_or_else(|| json!(now()));
    let when = now();
    let provenance = json!({
        "resourceType": "Provenance",
        "target": targets,
        "recorded": when,
        "activity": {"coding": [
            coding(AMEND.0, AMEND.1),
            coding(DATA_OPERATION, if delete { "DELETE" } else { "UPDATE" })
        ]},
        "agent": [
            {
                "type": {"coding": [coding(PARTICIPANT_TYPE, "author")]},
                "who": {"reference": requester}
            },
            {
                "type": {"coding": [coding(PARTICIPANT_TYPE, "verifier")]},
                "who": {"reference": approver}
            }
        ],
        "entity": [{"role": "source", "what": {"reference": format!("Task/{task_id}")}}],
        "signature": [
            {
                "type": [{"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature"}],
                "when": authored,
                "who": {"reference": requester}
            },
            {
                "type": [{"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.5", "display": "Verification Signature"}],
                "when": when,
                "who": {"reference": approver}
            }
        ]
    });
    store_version(tx, Ops::CREATE, "Provenance", &new_id(), None, provenance).await?;
    Ok(applied)
}

fn push_note(task: &mut Value, author: &str, text: &str) {
    let note = json!({"authorReference": {"reference": author}, "time": now(), "text": text});
    match task.get_mut("note").and_then(Value::as_array_mut) {
        Some(notes) => notes.push(note),
        None => task["note"] = json!([note]),
    }
}

/// `POST Task/{id}/$reject`: closes a proposed amendment or a correction
/// request without changing the record, with the reason.
pub async fn reject(tx: &mut Writer, id: &str, reason: &str) -> Result<Written> {
    if reason.trim().is_empty() {
        return Err(Error::invalid_at(
            "a rejection needs a reason (parameter 'reason')",
            "Parameters.parameter",
        ));
    }
    let (task_version, mut task) = pending(tx, id).await?;
    note_decision(id, &task);
    let decider = tx
        .access()
        .role()
        .reference()
        .expect("a practitioner has a reference");
    task["status"] = json!("rejected");
    task["statusReason"] = json!({"text": reason});
    task["owner"] = json!({"reference": decider});
    task["lastModified"] = json!(now());
    if has_code(
        &task,
        rights::CORRECTION_TASK_TYPES,
        rights::CORRECTION_REQUEST,
    ) {
        task["businessStatus"] =
            json!({"coding": [coding(rights::CORRECTION_BUSINESS_STATUS, "denied")]});
        task["output"] = json!([{
            "type": {"coding": [coding(rights::CORRECTION_OUTPUT_TYPES, "medRecCxReqResolution")]},
            "valueString": reason
        }]);
    }
    store_version(tx, Ops::UPDATE, "Task", id, Some(&task_version), task).await
}

/// The value of parameter `name` (`valueString`, `valueMarkdown` or
/// `valueCode`) of a `Parameters` body, if any.
pub fn parameter(body: Option<&Value>, name: &str) -> Option<String> {
    body?
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| {
            ["valueString", "valueMarkdown", "valueCode"]
                .iter()
                .find_map(|k| p.get(*k).and_then(Value::as_str))
        })
        .map(str::to_string)
}
