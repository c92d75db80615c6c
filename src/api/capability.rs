//! The CapabilityStatement: its static parts come from
//! `conformance/capability-statement.json`; everything that describes
//! behaviour (resource types, interactions, search parameters) is generated
//! from the code that implements it, so it cannot drift.

use serde_json::{json, Value};

use crate::fhir::types::RESOURCE_TYPES;
use crate::search::registry::registry;

static STATIC_PARTS: &str = include_str!("../../conformance/capability-statement.json");

/// The searchParam list of one type: every R4 core parameter, with those
/// ehrx cannot evaluate marked as such.
fn search_params(rtype: &str) -> Vec<Value> {
    registry()
        .params(rtype)
        .iter()
        .map(|p| {
            let mut v = json!({"name": p.code, "definition": p.url, "type": p.kind.as_str()});
            if !p.supported() {
                v["documentation"] = json!("Not supported: ehrx rejects this parameter (or ignores it with Prefer: handling=lenient).");
            } else if matches!(p.kind, crate::search::registry::Kind::Token) {
                v["documentation"] = json!("Modifiers :not, :text, :of-type (identifiers) and :missing; :in, :not-in, :above and :below need a terminology service and are not supported.");
            }
            v
        })
        .collect()
}

pub fn capability_statement(base: &str) -> Value {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let params = search_params(t);
            json!({
                "type": t,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "patch"},
                    {"code": "delete"}, {"code": "history-instance"}, {"code": "history-type"},
                    {"code": "create"}, {"code": "search-type"}
                ],
                "searchInclude": ["*"],
                "searchRevInclude": ["*"],
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "referencePolicy": ["literal", "local"],
                "searchParam": params,
            })
        })
        .collect();
    let mut cs: Value = serde_json::from_str(STATIC_PARTS).unwrap_or_else(|_| json!({}));
    cs["resourceType"] = json!("CapabilityStatement");
    cs["date"] = json!(crate::search::format_instant(chrono::Utc::now()));
    cs["software"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    cs["implementation"]["url"] = json!(base);
    cs["rest"] = json!([{
        "mode": "server",
        "security": {
            "cors": true,
            "service": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }],
                "text": "OAuth 2.0 with SMART App Launch 2.x and Backend Services; see /.well-known/smart-configuration"
            }],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "authorize", "valueUri": format!("{base}/auth/authorize")},
                    {"url": "token", "valueUri": format!("{base}/auth/token")},
                    {"url": "introspect", "valueUri": format!("{base}/auth/introspect")},
                    {"url": "revoke", "valueUri": format!("{base}/auth/revoke")}
                ]
            }]
        },
        "resource": resources,
        "interaction": [
            {"code": "transaction"}, {"code": "batch"}, {"code": "history-system"},
            {"code": "search-system"}
        ],
        "searchParam": [
            {"name": "_type", "type": "token"},
            {"name": "_count", "type": "number"},
            {"name": "_sort", "type": "string"},
            {"name": "_total", "type": "token"},
            {"name": "_summary", "type": "token"},
            {"name": "_elements", "type": "string"},
            {"name": "_include", "type": "string"},
            {"name": "_revinclude", "type": "string"}
        ],
        "operation": [{
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
        }, {
            "name": "signed-document",
            "definition": format!("{base}/OperationDefinition/Patient-signed-document"),
            "documentation": "GET Patient/{id}/$signed-document[?recipient=Organization/{id}][&signature=rsa-sha256|ecdsa-sha256]: the patient's records as a FHIR XML document Bundle signed (XML-DSig, RSA-SHA256 by default or ECDSA-SHA256) with ehrx's exchange key, the Patient encrypted (XML-Enc) for the recipient subscriber's certificate when asked"
        }, {
            "name": "correction-request",
            "definition": "http://hl7.org/fhir/uv/patient-corrections/OperationDefinition/correction-request",
            "documentation": "POST Patient/{id}/$correction-request with a Communication (payload: what is wrong; about: the resources concerned), by the patient with their own token: stores the Communication and a Task (code medRecCxReq, status requested, business status queued) in the amendment queue; answers 201 with the Task"
        }, {
            "name": "approve",
            "definition": format!("{base}/OperationDefinition/Task-approve"),
            "documentation": "POST Task/{id}/$approve [Parameters comment]: a practitioner other than its author applies a pending amendment (with a Provenance naming author and verifier) or accepts a correction request; 409 when the resource changed since the proposal or the Task is no longer requested"
        }, {
            "name": "reject",
            "definition": format!("{base}/OperationDefinition/Task-reject"),
            "documentation": "POST Task/{id}/$reject with Parameters reason: closes a pending amendment or correction request as rejected; the record is unchanged"
        }],
        "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
    }]);
    cs
}
