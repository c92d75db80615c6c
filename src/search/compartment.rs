//! The compartment definitions of R4 (`conformance/compartments.json`):
//! which resource types belong to a Patient's (or Encounter's, …) record,
//! through which reference parameters. Compartment search, `$everything`
//! and the access policy's patient confinement all read them here.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::registry::{registry, Kind};

static COMPARTMENTS: &str = include_str!("../../conformance/compartments.json");

/// Compartment type → resource type → parameters placing it there.
pub fn compartments() -> &'static HashMap<String, HashMap<String, Vec<String>>> {
    static C: OnceLock<HashMap<String, HashMap<String, Vec<String>>>> = OnceLock::new();
    C.get_or_init(|| serde_json::from_str(COMPARTMENTS).unwrap_or_default())
}

/// Whether the compartment definition of `owner_type` lists `rtype` at all.
pub fn in_compartment_definition(owner_type: &str, rtype: &str) -> bool {
    compartments()
        .get(owner_type)
        .is_some_and(|c| c.contains_key(rtype))
}

/// The reference parameters of `rtype` that place it in the compartment
/// of `owner_type` (only those ehrx indexes).
pub fn compartment_params(owner_type: &str, rtype: &str) -> Vec<String> {
    compartments()
        .get(owner_type)
        .and_then(|c| c.get(rtype))
        .map(|ps| {
            ps.iter()
                .filter(|p| {
                    registry()
                        .get(rtype, p)
                        .is_some_and(|d| d.kind == Kind::Reference && d.supported())
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}
