//! Insurers' permitted part of a record: which types an insurer role may
//! read, which of their elements never leave ehrx, from a policy file.
//!
//! The policy is data (`policies/insurer.json`, built in; the operator may
//! name another file with `insurer_policy`), documented in the file
//! itself. Masking happens in the gate, on every version an insurer is
//! given, before any response format, `_elements` or `_summary` sees it, so
//! no path can show a masked element.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::search::cond::Cond;

/// The policy file's text built into ehrx.
pub const BUILT_IN: &str = include_str!("../../policies/insurer.json");

#[derive(Debug, Clone, Deserialize)]
struct File {
    roles: BTreeMap<String, RoleFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
struct RoleFile {
    #[serde(default)]
    mask: Vec<String>,
    #[serde(default)]
    member_identifier_types: Vec<String>,
    types: BTreeMap<String, TypeFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
struct TypeFile {
    #[serde(default)]
    filter: BTreeMap<String, String>,
    #[serde(default)]
    keep: Option<Vec<String>>,
    #[serde(default)]
    mask: Vec<String>,
}

/// The rules of one insurer role.
#[derive(Debug, Clone, PartialEq)]
pub struct InsurerRules {
    pub name: String,
    role: RoleFile,
}

/// Every insurer role of a policy file.
#[derive(Debug, Clone)]
pub struct InsurerPolicy {
    roles: BTreeMap<String, InsurerRules>,
}

/// `meta.security` for an answer with elements taken out.
pub fn subsetted() -> Value {
    json!({
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED",
        "display": "subsetted"
    })
}

impl InsurerPolicy {
    /// Parses and checks a policy file: every type must exist and every
    /// filter must be a token parameter of it.
    pub fn parse(text: &str) -> Result<InsurerPolicy, String> {
        let file: File = serde_json::from_str(text).map_err(|e| format!("insurer policy: {e}"))?;
        for (name, role) in &file.roles {
            for (t, rule) in &role.types {
                if !crate::fhir::types::is_resource_type(t) {
                    return Err(format!(
                        "insurer policy '{name}': unknown resource type {t}"
                    ));
                }
                let filter: Vec<(String, String)> = rule.filter.clone().into_iter().collect();
                if !super::grantable_filter(Some(t), &filter) {
                    return Err(format!(
                        "insurer policy '{name}': filters of {t} must be token parameters"
                    ));
                }
            }
        }
        Ok(InsurerPolicy {
            roles: file
                .roles
                .into_iter()
                .map(|(name, role)| (name.clone(), InsurerRules { name, role }))
                .collect(),
        })
    }

    pub fn built_in() -> InsurerPolicy {
        InsurerPolicy::parse(BUILT_IN).expect("the built-in insurer policy is valid")
    }

    /// No insurer role at all: insurers see nothing.
    pub fn empty() -> InsurerPolicy {
        InsurerPolicy {
            roles: BTreeMap::new(),
        }
    }

    pub fn role(&self, name: &str) -> Option<&InsurerRules> {
        self.roles.get(name)
    }
}

impl InsurerRules {
    /// A role the policy does not name: no type at all.
    pub fn nothing(name: &str) -> InsurerRules {
        InsurerRules {
            name: name.to_string(),
            role: RoleFile::default(),
        }
    }

    pub fn allows(&self, rtype: &str) -> bool {
        self.role.types.contains_key(rtype)
    }

    /// Whether the policy filters `rtype` on parameter `param`.
    pub fn filters_on(&self, rtype: &str, param: &str) -> bool {
        self.role
            .types
            .get(rtype)
            .is_some_and(|t| t.filter.contains_key(param))
    }

    /// The policy's token filters for `rtype`, as one condition.
    pub fn filter(&self, rtype: &str) -> Option<Cond> {
        let rule = self.role.types.get(rtype)?;
        if rule.filter.is_empty() {
            return None;
        }
        let params: Vec<(String, String)> = rule.filter.clone().into_iter().collect();
        let parsed = crate::search::parse(rtype, &params, true, "").ok()?;
        Some(Cond::And(parsed.conds))
    }

    /// Whether a search parameter of `rtype` reads a masked element: a
    /// search on it would tell what the mask hides.
    pub fn masks_param(&self, rtype: &str, param: &str) -> bool {
        let Some(expr) = crate::search::registry::registry()
            .get(rtype, param)
            .and_then(|p| p.expr.as_ref())
        else {
            return false;
        };
        crate::search::fhirpath::element_paths(expr)
            .iter()
            .any(|path| self.masks_path(rtype, path))
    }

    fn masks_path(&self, rtype: &str, path: &[String]) -> bool {
        let Some(top) = path.first() else {
            return false;
        };
        if self.masks_element(rtype, top) {
            return true;
        }
        let rule = self.role.types.get(rtype);
        self.role
            .mask
            .iter()
            .chain(rule.map(|r| r.mask.iter()).into_iter().flatten())
            .filter_map(|m| m.strip_prefix("*."))
            .any(|deep| path.iter().any(|p| p == deep))
    }

    /// The top-level elements of `rtype` that are masked (for refusing
    /// searches on them).
    pub fn masks_element(&self, rtype: &str, element: &str) -> bool {
        let Some(rule) = self.role.types.get(rtype) else {
            return true;
        };
        if let Some(keep) = &rule.keep {
            if !keep.iter().any(|k| k == element) {
                return true;
            }
        }
        self.role
            .mask
            .iter()
            .chain(rule.mask.iter())
            .any(|m| m == element || m.strip_prefix("*.") == Some(element))
    }

    /// Takes the masked elements out of `resource`; marks it SUBSETTED
    /// if anything was taken.
    pub fn mask(&self, rtype: &str, resource: &mut Value) {
        let Some(rule) = self.role.types.get(rtype) else {
            return;
        };
        let Some(obj) = resource.as_object_mut() else {
            return;
        };
        let mut taken = false;
        if let Some(keep) = &rule.keep {
            let before = obj.len();
            obj.retain(|k, _| keep.iter().any(|x| x == k));
            taken |= obj.len() != before;
        }
        for m in self.role.mask.iter().chain(rule.mask.iter()) {
            if let Some(deep) = m.strip_prefix("*.") {
                taken |= remove_everywhere(obj, deep);
            } else if m == "identifier" {
                taken |= self.mask_identifiers(obj);
            } else {
                taken |= obj.remove(m).is_some();
            }
        }
        if taken {
            let meta = obj.entry("meta").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                let sec = meta.entry("security").or_insert_with(|| json!([]));
                if let Some(list) = sec.as_array_mut() {
                    if !list
                        .iter()
                        .any(|c| c.get("code").and_then(Value::as_str) == Some("SUBSETTED"))
                    {
                        list.push(subsetted());
                    }
                }
            }
        }
    }

    /// Keeps only identifiers typed as a member id.
    fn mask_identifiers(&self, obj: &mut serde_json::Map<String, Value>) -> bool {
        let Some(Value::Array(ids)) = obj.get_mut("identifier") else {
            return false;
        };
        let before = ids.len();
        ids.retain(|id| {
            id.pointer("/type/coding")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        let sc = format!(
                            "{}|{}",
                            c.get("system").and_then(Value::as_str).unwrap_or(""),
                            c.get("code").and_then(Value::as_str).unwrap_or("")
                        );
                        self.role.member_identifier_types.contains(&sc)
                    })
                })
        });
        let changed = ids.len() != before;
        if ids.is_empty() {
            obj.remove("identifier");
        }
        changed
    }
}

fn remove_everywhere(obj: &mut serde_json::Map<String, Value>, key: &str) -> bool {
    let mut taken = obj.remove(key).is_some();
    for (k, v) in obj.iter_mut() {
        if k == "meta" {
            continue;
        }
        taken |= remove_in(v, key);
    }
    taken
}

fn remove_in(v: &mut Value, key: &str) -> bool {
    match v {
        Value::Object(o) => remove_everywhere(o, key),
        Value::Array(a) => a.iter_mut().fold(false, |t, x| remove_in(x, key) | t),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_policy_masks_notes_attachments_and_other_identifiers() {
        let p = InsurerPolicy::built_in();
        let r = p.role("claims").unwrap();
        assert!(r.allows("Claim") && r.allows("Coverage") && !r.allows("Observation"));
        let mut cov = serde_json::json!({
            "resourceType": "Coverage", "id": "c", "text": {"div": "x"},
            "identifier": [
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]}, "value": "m1"},
                {"system": "urn:ssn", "value": "123"}
            ],
            "note": [{"text": "n"}], "status": "active"
        });
        r.mask("Coverage", &mut cov);
        assert!(cov.get("text").is_none() && cov.get("note").is_none());
        assert_eq!(cov["identifier"].as_array().unwrap().len(), 1);
        assert_eq!(cov["meta"]["security"][0]["code"], "SUBSETTED");
        let mut cond = serde_json::json!({"resourceType": "Condition", "id": "x",
            "code": {"text": "c"}, "note": [{"text": "secret"}], "evidence": [{}]});
        r.mask("Condition", &mut cond);
        assert!(cond.get("evidence").is_none() && cond.get("note").is_none());
        assert!(r.masks_element("Condition", "evidence"));
        assert!(!r.masks_element("Condition", "code"));
        // Searches on masked elements would tell what the mask hides.
        assert!(r.masks_param("Claim", "identifier"));
        assert!(r.masks_param("Condition", "evidence"));
        assert!(!r.masks_param("Claim", "patient"));
        assert!(!r.masks_param("Condition", "code"));
    }
}
