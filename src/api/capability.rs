//! The CapabilityStatement: its static parts come from
//! `conformance/capability-statement.json`; everything that describes
//! behaviour (resource types, interactions, search parameters) is generated
//! from the code that implements it, so it cannot drift.

use serde_json::{json, Value};

use crate::fhir::types::RESOURCE_TYPES;
use crate::search::criteria_params;

static STATIC_PARTS: &str = include_str!("../../conformance/capability-statement.json");

fn param_type(name: &str) -> &'static str {
    match name {
        "_lastUpdated" => "date",
        _ => "token",
    }
}

fn definition(rtype: &str, param: &str) -> String {
    match param.strip_prefix('_') {
        Some(p) => format!("http://hl7.org/fhir/SearchParameter/Resource-{p}"),
        None => format!("http://hl7.org/fhir/SearchParameter/{rtype}-{param}"),
    }
}

pub fn capability_statement(base: &str) -> Value {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let params: Vec<Value> = criteria_params(t)
                .into_iter()
                .map(|p| json!({"name": p, "definition": definition(t, p), "type": param_type(p)}))
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
    let mut cs: Value = serde_json::from_str(STATIC_PARTS).unwrap_or_else(|_| json!({}));
    cs["resourceType"] = json!("CapabilityStatement");
    cs["date"] = json!(crate::search::format_instant(chrono::Utc::now()));
    cs["software"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    cs["implementation"]["url"] = json!(base);
    cs["rest"] = json!([{
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
    }]);
    cs
}
