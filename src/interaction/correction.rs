//! `POST Patient/{id}/$correction-request`: a patient asks for a
//! correction of their clinical record, after the HL7 Patient Request for
//! Corrections IG: the request is a `Communication` (category
//! `medRecCxReq`) and the process a `Task` (code `medRecCxReq`, business
//! status `queued`) that lands in the amendment queue. A practitioner
//! closes it with `$approve` or `$reject` (`super::amend`); the patient
//! follows the Task with their own token.

use serde_json::{json, Value};

use super::{new_id, now, store_version, Written};
use crate::error::{Error, Result};
use crate::policy::rights::{
    self, CORRECTION_BUSINESS_STATUS, CORRECTION_COMMUNICATION_TYPES, CORRECTION_REQUEST,
    CORRECTION_TASK_TYPES, QUEUE,
};
use crate::policy::scope::Ops;
use crate::policy::Role;
use crate::store::Writer;

/// Records the request of `Patient/{patient}` (`body`: a Communication
/// whose `payload` says what is wrong and whose `about` may name the
/// resources concerned); returns the Task (201).
pub async fn request(tx: &mut Writer, patient: &str, body: Value) -> Result<Written> {
    super::check_id(patient)?;
    match tx.access().role() {
        Role::Patient(own) if own == patient => {}
        _ => {
            return Err(rights::refused(
                format!(
                    "Patient/{patient} asks for corrections of their record with their own token"
                ),
                None,
            ))
        }
    }
    if body.get("resourceType").and_then(Value::as_str) != Some("Communication") {
        return Err(Error::invalid_at(
            "$correction-request takes a Communication whose payload describes the correction",
            "resourceType",
        ));
    }
    let payload = body.get("payload").cloned().unwrap_or(json!([]));
    if payload.as_array().is_none_or(Vec::is_empty) {
        return Err(Error::invalid_at(
            "the Communication needs a payload saying what should be corrected",
            "Communication.payload",
        ));
    }
    let about: Vec<Value> = body
        .get("about")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let me = format!("Patient/{patient}");
    let (task_id, comm_id) = (new_id(), new_id());
    let sent = now();
    let mut communication = json!({
        "resourceType": "Communication",
        "status": "completed",
        "category": [{"coding": [{"system": CORRECTION_COMMUNICATION_TYPES, "code": CORRECTION_REQUEST,
            "display": "Correction Request"}]}],
        "subject": {"reference": me},
        "about": [{"reference": format!("Task/{task_id}")}],
        "sent": sent,
        "sender": {"reference": me},
        "payload": payload,
    });
    communication["about"]
        .as_array_mut()
        .expect("an array")
        .extend(about.iter().cloned());
    let mut task = json!({
        "resourceType": "Task",
        "meta": {"tag": [{"system": QUEUE.0, "code": QUEUE.1}]},
        "status": "requested",
        "businessStatus": {"coding": [{"system": CORRECTION_BUSINESS_STATUS, "code": "queued"}]},
        "intent": "order",
        "code": {"coding": [{"system": CORRECTION_TASK_TYPES, "code": CORRECTION_REQUEST,
            "display": "Correction Request"}]},
        "description": "Request for correction of the patient's record",
        "for": {"reference": me},
        "authoredOn": sent,
        "requester": {"reference": me},
        "input": [{
            "type": {"coding": [{"system": CORRECTION_COMMUNICATION_TYPES, "code": CORRECTION_REQUEST}]},
            "valueReference": {"reference": format!("Communication/{comm_id}")}
        }],
    });
    if let Some(focus) = about.first().and_then(|a| a.get("reference")) {
        task["focus"] = json!({"reference": focus});
    }
    store_version(
        tx,
        Ops::CREATE,
        "Communication",
        &comm_id,
        None,
        communication,
    )
    .await?;
    store_version(tx, Ops::CREATE, "Task", &task_id, None, task).await
}
