//! The circle of trust's own operations: a practitioner breaking the glass
//! for one patient (`$emergency-access`), and a patient seeing what
//! somebody could read of their record and why (`$access-preview`).

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::policy::consent::{Circle, ConsentDefault};
use crate::policy::insurer::InsurerPolicy;
use crate::policy::patient_data::{self, Reach};
use crate::policy::role::{Practitioner, Role};
use crate::policy::scope::{parse_scopes, Ops};
use crate::policy::{Access, Maintenance};
use crate::search::cond::{Cond, Query};
use crate::store::{circle, Found, Gate, Store};

/// Longest reason kept for a break-the-glass grant.
const MAX_REASON: usize = 1_000;

const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// `POST /Patient/{id}/$emergency-access`: a practitioner outside the
/// patient's circle asks for emergency access, with purpose of use `BTG`
/// and a reason. Granted for `minutes`, recorded, and shown to the patient.
pub async fn emergency_access(
    gate: &Gate,
    store: &Store,
    minutes: u64,
    patient: &str,
    body: &Value,
) -> Result<Value> {
    let actor = match gate.access().role() {
        Role::Practitioner(Practitioner::Id(x)) => format!("Practitioner/{x}"),
        Role::Practitioner(Practitioner::Role(r)) => format!("PractitionerRole/{r}"),
        _ => {
            return Err(Error::Forbidden(
                "only a practitioner may break the glass".into(),
            ))
        }
    };
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(Error::invalid_at(
            "$emergency-access takes a Parameters resource with 'purpose' (BTG) and 'reason'",
            "resourceType",
        ));
    }
    let param = |name: &str| {
        body.get("parameter")
            .and_then(Value::as_array)
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            })
    };
    let purpose = param("purpose").and_then(|p| p.get("valueCoding"));
    let is_btg = purpose.is_some_and(|c| {
        c.get("code").and_then(Value::as_str) == Some("BTG")
            && c.get("system")
                .and_then(Value::as_str)
                .is_none_or(|s| s == ACT_REASON)
    });
    if !is_btg {
        return Err(Error::invalid_at(
            format!("'purpose' must be the Coding {ACT_REASON}|BTG (break the glass)"),
            "Parameters.parameter.where(name = 'purpose')",
        ));
    }
    let reason = param("reason")
        .and_then(|p| p.get("valueString"))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if reason.is_empty() || reason.len() > MAX_REASON {
        return Err(Error::invalid_at(
            format!("'reason' must be a valueString of 1 to {MAX_REASON} bytes"),
            "Parameters.parameter.where(name = 'reason')",
        ));
    }
    let admin = store.gate(Access::maintenance(Maintenance::EmergencyAccess));
    let mut r = admin.reader().await?;
    if !matches!(
        r.view().current(Ops::READ, "Patient", patient).await?,
        Found::Live(_)
    ) {
        return Err(Error::NotFound(format!("Patient/{patient}")));
    }
    drop(r);
    let now = chrono::Utc::now().timestamp();
    let grant = circle::Emergency {
        id: super::new_id(),
        actor: actor.clone(),
        patient: patient.to_string(),
        reason: reason.to_string(),
        granted_at: now,
        expires_at: now + (minutes as i64) * 60,
    };
    circle::grant_emergency(store, &grant).await?;
    tracing::warn!(actor = %actor, patient = %patient, grant = %grant.id, "break-the-glass access granted");
    Ok(json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}},
            {"name": "actor", "valueReference": {"reference": actor}},
            {"name": "expires", "valueInstant": instant(grant.expires_at)},
            {"name": "reason", "valueString": grant.reason},
        ]
    }))
}

fn instant(t: i64) -> String {
    crate::fhir::format_instant(chrono::DateTime::from_timestamp(t, 0).unwrap_or_default())
}

/// `GET /Patient/{id}/$access-preview?actor=…`, for the patient or an
/// administrator: what the actor could read of the record now, counted per
/// type, which provisions decide, and every break-the-glass grant.
pub async fn access_preview(
    gate: &Gate,
    store: &Store,
    default: ConsentDefault,
    insurers: &InsurerPolicy,
    patient: &str,
    params: &[(String, String)],
) -> Result<Value> {
    let own = matches!(gate.access().role(), Role::Patient(p) if p == patient);
    let admin = gate.access().is_unrestricted()
        || (*gate.access().role() == Role::System
            && gate.access().sees_whole_type(Ops::READ, None));
    if !own && !admin {
        return Err(Error::Forbidden(
            "$access-preview is for the patient themself or an administrator".into(),
        ));
    }
    let actor = params
        .iter()
        .find(|(k, _)| k == "actor")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| Error::invalid("$access-preview needs 'actor' (e.g. Practitioner/ID)"))?;
    let (role, scopes) = match actor.split_once('/') {
        Some(("Practitioner", x)) => (
            Role::Practitioner(Practitioner::Id(x.into())),
            "user/*.rs",
        ),
        Some(("PractitionerRole", x)) => (
            Role::Practitioner(Practitioner::Role(x.into())),
            "user/*.rs",
        ),
        Some(("RelatedPerson", x)) => (Role::RelatedPerson(x.into()), "user/*.rs"),
        Some(("Organization", x)) => (
            Role::Insurer {
                organization: x.into(),
                rules: "claims".into(),
            },
            "system/*.rs",
        ),
        _ => {
            return Err(Error::invalid(
                "'actor' must be Practitioner/ID, PractitionerRole/ID, RelatedPerson/ID or Organization/ID (an insurer)",
            ))
        }
    };
    let now = chrono::Utc::now().timestamp();
    let facts = circle::facts(store, &role, default, now).await?;
    let insurer = match &role {
        Role::Insurer { rules, .. } => Some(std::sync::Arc::new(
            insurers
                .role(rules)
                .cloned()
                .unwrap_or_else(|| crate::policy::insurer::InsurerRules::nothing(rules)),
        )),
        _ => None,
    };
    let circle = Circle::new(facts, crate::fhir::unix_instant(now), insurer);
    let scopes = parse_scopes(scopes).map_err(|e| Error::invalid(e.to_string()))?;
    let theirs = store.gate(Access::from_token(&scopes, None, role).with_circle(circle.clone()));
    let everything = store.gate(Access::maintenance(Maintenance::AccessPreview));
    let mut mine = everything.reader().await?;
    let mut them = theirs.reader().await?;
    let mut out = vec![json!({"name": "actor", "valueReference": {"reference": actor}})];
    for t in crate::fhir::types::RESOURCE_TYPES {
        let member = match patient_data::reach(t) {
            Reach::Own(_) if *t == "Patient" => Cond::Ids(vec![patient.to_string()]),
            Reach::Own(params) => Cond::RefersTo {
                params,
                target_type: "Patient".into(),
                target_ids: vec![patient.to_string()],
            },
            _ => continue,
        };
        let q = Query {
            rtype: t.to_string(),
            conds: vec![member],
            sort: Vec::new(),
        };
        let total = mine.view().count(&q).await?;
        if total == 0 {
            continue;
        }
        let visible = match them.view().count(&q).await {
            Ok(n) => n,
            Err(Error::Forbidden(_)) => 0,
            Err(e) => return Err(e),
        };
        let mut parts = vec![
            json!({"name": "type", "valueCode": t}),
            json!({"name": "total", "valueInteger": total}),
            json!({"name": "visible", "valueInteger": visible}),
        ];
        for r in circle.reasons(patient, t) {
            parts.push(json!({"name": "decision", "part": [
                {"name": "source", "valueString": r.source},
                {"name": "effect", "valueCode": r.effect},
            ]}));
        }
        out.push(json!({"name": "type", "part": parts}));
    }
    for e in circle::emergencies_of(store, patient).await? {
        out.push(json!({"name": "emergency-access", "part": [
            {"name": "actor", "valueReference": {"reference": e.actor}},
            {"name": "granted", "valueInstant": instant(e.granted_at)},
            {"name": "expires", "valueInstant": instant(e.expires_at)},
            {"name": "reason", "valueString": e.reason},
        ]}));
    }
    Ok(json!({"resourceType": "Parameters", "parameter": out}))
}
