//! Access decisions: what a caller's granted scopes let it do, as pure
//! functions over resource types and resource contents.
//!
//! An [`Access`] is computed once per request from the token (or is
//! unrestricted when authorization is switched off, and for the server's own
//! tools). The interaction layer asks it three questions, and only these:
//! - may this caller do operation X on type T at all ([`Access::check_type`]);
//! - may it see or write this resource ([`Access::permits`]) — every read,
//!   included resource, history entry and written resource passes here;
//! - which search conditions confine a search of type T to what it may see
//!   ([`Access::search_conds`]), so pages and totals never count what the
//!   caller cannot read.
//!
//! `patient/` scopes bind every rule to the token's patient: a resource type
//! in the Patient compartment must refer to that patient through one of the
//! compartment's parameters (the same index rows compartment search uses), a
//! Patient must be that patient. Types outside the Patient compartment
//! (Organization, Practitioner, Medication, …) hold no one's record and are
//! readable under a `patient/` scope for them — except `Binary`, which can
//! hold any document and is refused. Granular v2 filters
//! (`?category=…|laboratory`) are limited to token parameters, so the same
//! test runs in SQL for searches and on the resource for everything else.

use serde_json::Value;

use crate::auth::scope::{Context, Ops, Scope};
use crate::error::{Error, Result};
use crate::interaction::{compartment_params, in_compartment_definition};
use crate::search::index;
use crate::search::registry::{registry, Kind};
use crate::store::search::Cond;

/// One permission of a caller.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// `None` for every type.
    rtype: Option<String>,
    ops: Ops,
    /// The patient a `patient/` scope binds to.
    patient: Option<String>,
    /// Token filters (granular scopes): `(param, value)`, all must hold.
    filter: Vec<(String, String)>,
}

/// What one caller may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    unrestricted: bool,
    rules: Vec<Rule>,
    patient: Option<String>,
}

impl Access {
    /// No limits: authorization switched off, or ehrx's own tools.
    pub fn full() -> Access {
        Access {
            unrestricted: true,
            rules: Vec::new(),
            patient: None,
        }
    }

    /// Nothing at all (the default when no token was checked).
    pub fn none() -> Access {
        Access {
            unrestricted: false,
            rules: Vec::new(),
            patient: None,
        }
    }

    /// The access granted by `scopes`; `patient` is the token's patient
    /// context. `patient/` scopes without a patient grant nothing.
    pub fn from_scopes(scopes: &[Scope], patient: Option<&str>) -> Access {
        let mut rules = Vec::new();
        for s in scopes {
            let Scope::Resource(r) = s else { continue };
            if !grantable_filter(r.rtype.as_deref(), &r.filter) {
                continue;
            }
            let bound = match r.context {
                Context::Patient => match patient {
                    Some(p) => Some(p.to_string()),
                    None => continue,
                },
                Context::User | Context::System => None,
            };
            rules.push(Rule {
                rtype: r.rtype.clone(),
                ops: r.ops,
                patient: bound,
                filter: r.filter.clone(),
            });
        }
        Access {
            unrestricted: false,
            rules,
            patient: patient.map(str::to_string),
        }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// The patient every `patient/` rule is bound to.
    pub fn patient(&self) -> Option<&str> {
        self.patient.as_deref()
    }

    fn rules_for<'a>(&'a self, op: Ops, rtype: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            r.ops.contains(op)
                && r.rtype.as_deref().is_none_or(|t| t == rtype)
                && !(r.patient.is_some() && rtype == "Binary")
        })
    }

    /// May the caller do `op` on some resources of `rtype`?
    pub fn check_type(&self, op: Ops, rtype: &str) -> Result<()> {
        if self.unrestricted || self.rules_for(op, rtype).next().is_some() {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "the granted scopes do not allow {} on {rtype}",
                op_name(op)
            )))
        }
    }

    /// May the caller do `op` on every resource of `rtype`, unfiltered
    /// (needed for type- and system-level history)?
    pub fn check_whole_type(&self, op: Ops, rtype: Option<&str>) -> Result<()> {
        let whole = self.unrestricted
            || self.rules.iter().any(|r| {
                r.ops.contains(op)
                    && r.patient.is_none()
                    && r.filter.is_empty()
                    && (r.rtype.is_none() || (rtype.is_some() && r.rtype.as_deref() == rtype))
            });
        if whole {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{} of {} needs an unrestricted user/ or system/ scope",
                op_name(op),
                rtype.unwrap_or("every type")
            )))
        }
    }

    /// May the caller do `op` on this resource (its current content)?
    pub fn permits(&self, op: Ops, rtype: &str, resource: &Value) -> bool {
        if self.unrestricted {
            return true;
        }
        let mut rows = None;
        self.rules_for(op, rtype).any(|r| {
            let rows = rows.get_or_insert_with(|| index::extract(rtype, resource));
            r.patient
                .as_deref()
                .is_none_or(|p| in_patient_compartment(rtype, resource, rows, p))
                && r.filter.iter().all(|(k, v)| token_matches(rows, k, v))
        })
    }

    /// `Ok` if the caller may do `op` on `resource`, else 403.
    pub fn check(&self, op: Ops, rtype: &str, resource: &Value) -> Result<()> {
        if self.permits(op, rtype, resource) {
            Ok(())
        } else {
            let id = resource
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or("(new)");
            Err(Error::Forbidden(format!(
                "{} of {rtype}/{id} is outside the granted scopes{}",
                op_name(op),
                match &self.patient {
                    Some(p) => format!(" (patient context Patient/{p})"),
                    None => String::new(),
                }
            )))
        }
    }

    /// The condition a search of `rtype` must add so it returns only what
    /// the caller may see; `None` when the caller sees every resource.
    pub fn search_conds(&self, rtype: &str, base: &str) -> Result<Option<Cond>> {
        if self.unrestricted {
            return Ok(None);
        }
        self.check_type(Ops::SEARCH, rtype)?;
        let mut alts = Vec::new();
        for r in self.rules_for(Ops::SEARCH, rtype) {
            let mut conds = Vec::new();
            if let Some(p) = &r.patient {
                if rtype == "Patient" {
                    conds.push(Cond::Ids(vec![p.clone()]));
                } else if in_compartment_definition("Patient", rtype) {
                    // No indexed parameter: nothing can be shown as theirs.
                    conds.push(Cond::RefersTo {
                        params: compartment_params("Patient", rtype),
                        target_type: "Patient".into(),
                        target_id: p.clone(),
                    });
                }
            }
            if !r.filter.is_empty() {
                let parsed = crate::search::parse(rtype, &r.filter, true, base)?;
                conds.extend(parsed.conds);
            }
            match conds.len() {
                // One rule sees everything of this type.
                0 => return Ok(None),
                1 => alts.push(conds.pop().expect("one condition")),
                _ => alts.push(Cond::And(conds)),
            }
        }
        Ok(Some(if alts.len() == 1 {
            alts.pop().expect("one alternative")
        } else {
            Cond::Or(alts)
        }))
    }

    /// Chained parameters and `_has` look into other resource types: the
    /// caller must be allowed to search each of them.
    pub fn check_criteria(&self, conds: &[Cond]) -> Result<()> {
        if self.unrestricted {
            return Ok(());
        }
        for c in conds {
            match c {
                Cond::Chain { types, inner, .. } => {
                    for t in types {
                        self.check_type(Ops::SEARCH, t)?;
                    }
                    self.check_criteria(inner)?;
                }
                Cond::Has { source, inner, .. } => {
                    self.check_type(Ops::SEARCH, source)?;
                    self.check_criteria(inner)?;
                }
                Cond::Not(inner) => self.check_criteria(std::slice::from_ref(inner))?,
                Cond::Or(cs) | Cond::And(cs) => self.check_criteria(cs)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The resource types of `candidates` the caller may do `op` on.
    pub fn allowed_types<'a>(&self, op: Ops, candidates: &[&'a str]) -> Vec<&'a str> {
        candidates
            .iter()
            .copied()
            .filter(|t| self.check_type(op, t).is_ok())
            .collect()
    }
}

fn op_name(op: Ops) -> &'static str {
    match op {
        Ops::CREATE => "create",
        Ops::READ => "read",
        Ops::UPDATE => "update",
        Ops::DELETE => "delete",
        Ops::SEARCH => "search",
        _ => "this interaction",
    }
}

/// Granular filters must name token parameters of the type (or of every
/// type, for `*`), so they can be checked both in SQL and on a resource.
pub fn grantable_filter(rtype: Option<&str>, filter: &[(String, String)]) -> bool {
    filter.iter().all(|(k, _)| match rtype {
        Some(t) => registry()
            .get(t, k)
            .is_some_and(|p| p.kind == Kind::Token && p.supported()),
        None => false,
    })
}

/// Whether `resource` belongs to the compartment of `Patient/patient`.
fn in_patient_compartment(
    rtype: &str,
    resource: &Value,
    rows: &index::Rows,
    patient: &str,
) -> bool {
    if rtype == "Patient" {
        return resource.get("id").and_then(Value::as_str) == Some(patient);
    }
    if !in_compartment_definition("Patient", rtype) {
        // Not a patient's record (Organization, Medication, …).
        return true;
    }
    let params = compartment_params("Patient", rtype);
    rows.references
        .iter()
        .any(|r| r.target_type == "Patient" && r.target_id == patient && params.contains(&r.param))
}

/// A token search value (`code`, `system|code`, `|code`, `system|`, with
/// commas for OR) tested against the resource's index rows.
fn token_matches(rows: &index::Rows, param: &str, value: &str) -> bool {
    value.split(',').any(|v| {
        rows.tokens
            .iter()
            .filter(|t| t.param == param)
            .any(|t| match v.split_once('|') {
                None => t.code == v,
                Some(("", code)) => t.system.is_empty() && t.code == code,
                Some((system, "")) => t.system == system,
                Some((system, code)) => t.system == system && t.code == code,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scope::parse_scopes;
    use serde_json::json;

    fn access(scopes: &str, patient: Option<&str>) -> Access {
        Access::from_scopes(&parse_scopes(scopes).unwrap(), patient)
    }

    fn obs(patient: &str, category: &str) -> Value {
        json!({
            "resourceType": "Observation", "id": "o1", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"text": "x"},
            "subject": {"reference": format!("Patient/{patient}")}
        })
    }

    #[test]
    fn patient_scopes_confine_to_the_compartment() {
        let a = access("patient/Observation.rs patient/Patient.r", Some("p1"));
        assert!(a.permits(Ops::READ, "Observation", &obs("p1", "laboratory")));
        assert!(!a.permits(Ops::READ, "Observation", &obs("p2", "laboratory")));
        assert!(!a.permits(Ops::CREATE, "Observation", &obs("p1", "laboratory")));
        assert!(a.permits(
            Ops::READ,
            "Patient",
            &json!({"resourceType": "Patient", "id": "p1"})
        ));
        assert!(!a.permits(
            Ops::READ,
            "Patient",
            &json!({"resourceType": "Patient", "id": "p2"})
        ));
        assert!(!a.permits(
            Ops::SEARCH,
            "Patient",
            &json!({"resourceType": "Patient", "id": "p1"})
        ));
        assert!(a.check_type(Ops::SEARCH, "Condition").is_err());
        assert!(a
            .check_whole_type(Ops::SEARCH, Some("Observation"))
            .is_err());
        // Without a patient context, patient/ scopes grant nothing.
        let a = access("patient/*.rs", None);
        assert!(a.check_type(Ops::READ, "Observation").is_err());
    }

    #[test]
    fn binary_is_never_reachable_through_patient_scopes() {
        let a = access("patient/*.rs", Some("p1"));
        assert!(a.check_type(Ops::READ, "Binary").is_err());
        assert!(a.permits(
            Ops::READ,
            "Organization",
            &json!({"resourceType": "Organization", "id": "o"})
        ));
        let a = access("user/*.rs", None);
        assert!(a.check_type(Ops::READ, "Binary").is_ok());
    }

    #[test]
    fn granular_scopes_filter_by_token() {
        let a = access(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
            Some("p1"),
        );
        assert!(a.permits(Ops::READ, "Observation", &obs("p1", "laboratory")));
        assert!(!a.permits(Ops::READ, "Observation", &obs("p1", "vital-signs")));
        let a = access("user/Observation.rs?category=vital-signs,laboratory", None);
        assert!(a.permits(Ops::READ, "Observation", &obs("p9", "laboratory")));
        assert!(!a.permits(Ops::READ, "Observation", &obs("p9", "social-history")));
        // Non-token filters are not granted at all.
        let a = access("user/Observation.rs?date=ge2020", None);
        assert!(a.check_type(Ops::READ, "Observation").is_err());
    }

    #[test]
    fn search_conditions_follow_the_rules() {
        let base = "http://x";
        assert_eq!(
            Access::full().search_conds("Observation", base).unwrap(),
            None
        );
        assert_eq!(
            access("user/*.rs", None)
                .search_conds("Observation", base)
                .unwrap(),
            None
        );
        let a = access("patient/Observation.rs", Some("p1"));
        match a.search_conds("Observation", base).unwrap() {
            Some(Cond::RefersTo { target_id, .. }) => assert_eq!(target_id, "p1"),
            other => panic!("{other:?}"),
        }
        let a = access("patient/Patient.rs", Some("p1"));
        assert_eq!(
            a.search_conds("Patient", base).unwrap(),
            Some(Cond::Ids(vec!["p1".into()]))
        );
        let a = access("patient/Observation.rs?category=laboratory", Some("p1"));
        assert!(matches!(
            a.search_conds("Observation", base).unwrap(),
            Some(Cond::And(c)) if c.len() == 2
        ));
        assert!(a.search_conds("Condition", base).is_err());
    }
}
