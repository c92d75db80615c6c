//! The CapabilityStatement, generated from what the server implements (the
//! resource type list, the search parameters the search module accepts, the
//! interactions the router serves), so it cannot drift from the code.

use serde_json::{json, Value};

use crate::fhir::types::RESOURCE_TYPES;
use crate::search::criteria_params;

fn param_type(name: &str) -> &'static str {
    match name {
        "_id" => "token",
        "_lastUpdated" => "date",
        _ => "token",
    }
}

pub fn capability_statement(base: &str) -> Value {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let params: Vec<Value> = criteria_params(t)
                .into_iter()
                .map(|p| {
                    json!({
                        "name": p,
                        "definition": format!("http://hl7.org/fhir/SearchParameter/{}",
                            if p.starts_with('_') { format!("Resource{}", p.replace('_', "-")) } else { format!("{t}-{p}") }),
                        "type": param_type(p),
                    })
                })
                .collect();
            json!({
                "type": t,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "patch"},
                    {"code": "delete"}, {"code": "history-instance"}, {"code": "history-type"},
                    {"code": "create"}, {"code": "search-type"}
                ],
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
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::search::format_instant(chrono::Utc::now()),
        "publisher": "ehrx",
        "kind": "instance",
        "software": {"name": "ehrx", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "ehrx FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml", "json", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [
                {"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}
            ],
        }],
    })
}
