//! Access decisions: what a caller may do, as pure functions over resource
//! types, resource contents and search conditions.
//!
//! An [`Access`] is computed once per request from the token, or named for
//! one of ehrx's own maintenance jobs ([`Access::maintenance`]); there is no
//! unrestricted default. The caller-scoped store (`store::gate`) asks it:
//! - may this caller do operation X on type T at all ([`Access::check_type`]);
//! - may it see or write this resource ([`Access::permits`]);
//! - which conditions confine a query of type T — and every chain and `_has`
//!   sub-select inside it — to what the caller may see ([`Access::confine`]),
//!   so pages, totals, includes and conditional matches never count what
//!   the caller cannot read.
//!
//! `patient/` scopes bind every rule to the token's patient: what each type
//! of resource may then reach is written down in [`patient_data`] (the
//! patient's record by its references, shared reference data read-only,
//! everything else nothing). Granular v2 filters (`?category=…|laboratory`)
//! are limited to token parameters, so the same test runs in SQL for
//! searches and on the resource for everything else. An exchange subscriber
//! creates, and sees only what it created itself (`meta.source`).

pub mod consent;
pub mod insurer;
pub mod patient_data;
pub mod rights;
pub mod role;
pub mod scope;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::search::cond::{Bind, Cond, Table, Test};
use crate::search::index;
use crate::search::registry::{registry, Kind};
use consent::Circle;
use patient_data::Reach;
pub use role::Role;
use scope::{Context, Ops, Scope};
use std::sync::Arc;

/// ehrx's own jobs that act on every resource, each by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Maintenance {
    /// `ehrx import`: loading Bundles from the operator's files.
    Import,
    /// `ehrx explain`: showing a search's SQL and plan to the operator.
    Explain,
    /// The sign-up page creating a new patient's own Patient resource.
    SignUp,
    /// `auth_disabled = true`: development without tokens.
    AuthDisabled,
    /// `ehrx subscriber …`: a subscriber's Organization and Endpoint.
    Subscribers,
    /// Checking that a patient exists before breaking the glass.
    EmergencyAccess,
    /// Counting a patient's whole record for `$access-preview`.
    AccessPreview,
}

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
    /// Only resources whose `meta.source` is this (exchange subscribers).
    source: Option<String>,
    /// Only the resource with this id (a subscriber's own Organization).
    id: Option<String>,
}

/// What one caller may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    /// Set for ehrx's own jobs: no limits.
    maintenance: Option<Maintenance>,
    rules: Vec<Rule>,
    patient: Option<String>,
    role: Role,
    /// The circle of trust, loaded for this request (`store::circle`);
    /// a role that needs one and has none sees no patient's record.
    circle: Option<Arc<Circle>>,
}

impl Access {
    /// No limits, for one of ehrx's own jobs, named.
    pub fn maintenance(job: Maintenance) -> Access {
        Access {
            maintenance: Some(job),
            rules: Vec::new(),
            patient: None,
            role: Role::Administrator,
            circle: None,
        }
    }

    /// Nothing at all.
    pub fn none() -> Access {
        Access {
            maintenance: None,
            rules: Vec::new(),
            patient: None,
            role: Role::Nobody,
            circle: None,
        }
    }

    /// The access granted by `scopes`; `patient` is the token's patient
    /// context. `patient/` scopes without a patient grant nothing. The
    /// caller's role is [`Role::System`]; see [`Access::from_token`].
    pub fn from_scopes(scopes: &[Scope], patient: Option<&str>) -> Access {
        Access::from_token(scopes, patient, Role::System)
    }

    /// The access of a token: its scopes, limited by its role. A patient
    /// reaches only their own record, whatever the scopes say; a role
    /// that depends on the circle of trust sees patients' records only
    /// once [`Access::with_circle`] gave it one; [`Role::Nobody`] gets
    /// nothing.
    pub fn from_token(scopes: &[Scope], patient: Option<&str>, role: Role) -> Access {
        if role == Role::Nobody {
            return Access::none();
        }
        let patient = match &role {
            Role::Patient(own) => Some(own.as_str()),
            _ => patient,
        };
        let mut rules = Vec::new();
        for s in scopes {
            let Scope::Resource(r) = s else { continue };
            if !grantable_filter(r.rtype.as_deref(), &r.filter) {
                continue;
            }
            let bound = match (r.context, &role) {
                (_, Role::Patient(own)) => Some(own.clone()),
                (Context::Patient, _) => match patient {
                    Some(p) => Some(p.to_string()),
                    None => continue,
                },
                (Context::User | Context::System, _) => None,
            };
            rules.push(Rule {
                rtype: r.rtype.clone(),
                ops: r.ops,
                patient: bound,
                filter: r.filter.clone(),
                source: None,
                id: None,
            });
        }
        Access {
            maintenance: None,
            rules,
            patient: patient.map(str::to_string),
            role,
            circle: None,
        }
    }

    /// This access with the circle of trust loaded for this request.
    pub fn with_circle(mut self, circle: Circle) -> Access {
        self.circle = Some(Arc::new(circle));
        self
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn circle(&self) -> Option<&Circle> {
        self.circle.as_deref()
    }

    /// Whether the circle of trust limits this caller.
    fn circled(&self) -> bool {
        self.role.needs_circle()
    }

    /// An exchange subscriber: creates resources marked with its `source`
    /// (`meta.source`), and reads and searches only those — and its own
    /// `Organization/{organization}`, which its documents refer to.
    pub fn subscriber(source: &str, organization: &str) -> Access {
        Access {
            maintenance: None,
            rules: vec![
                Rule {
                    rtype: None,
                    ops: Ops::CREATE.union(Ops::READ).union(Ops::SEARCH),
                    patient: None,
                    filter: Vec::new(),
                    source: Some(source.to_string()),
                    id: None,
                },
                Rule {
                    rtype: Some("Organization".into()),
                    ops: Ops::READ.union(Ops::SEARCH),
                    patient: None,
                    filter: Vec::new(),
                    source: None,
                    id: Some(organization.to_string()),
                },
            ],
            patient: None,
            role: Role::Subscriber,
            circle: None,
        }
    }

    /// The `meta.source` a subscriber's access is bound to.
    pub fn source(&self) -> Option<&str> {
        self.rules.iter().find_map(|r| r.source.as_deref())
    }

    pub fn is_unrestricted(&self) -> bool {
        self.maintenance.is_some()
    }

    /// The maintenance job this access was made for, if any.
    pub fn maintenance_job(&self) -> Option<Maintenance> {
        self.maintenance
    }

    /// The patient every `patient/` rule is bound to.
    pub fn patient(&self) -> Option<&str> {
        self.patient.as_deref()
    }

    fn rules_for<'a>(&'a self, op: Ops, rtype: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        let circled = self.circled();
        let reached = !circled || self.circle.as_ref().is_some_and(|c| c.reaches_type(rtype));
        self.rules.iter().filter(move |r| {
            reached
                && r.ops.contains(op)
                && r.rtype.as_deref().is_none_or(|t| t == rtype)
                && (r.patient.is_none()
                    || match patient_data::reach(rtype) {
                        Reach::Own(_) => true,
                        Reach::Shared => op == Ops::READ || op == Ops::SEARCH,
                        Reach::None => false,
                    })
        })
    }

    /// May the caller do `op` on some resources of `rtype`?
    pub fn check_type(&self, op: Ops, rtype: &str) -> Result<()> {
        if self.is_unrestricted() || self.rules_for(op, rtype).next().is_some() {
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
        if self.sees_whole_type(op, rtype) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{} of {} needs an unrestricted user/ or system/ scope",
                op_name(op),
                rtype.unwrap_or("every type")
            )))
        }
    }

    /// Whether some rule lets the caller do `op` on every resource of
    /// `rtype` (of every type for `None`).
    pub fn sees_whole_type(&self, op: Ops, rtype: Option<&str>) -> bool {
        self.is_unrestricted()
            || !self.circled()
                && self.rules.iter().any(|r| {
                    r.ops.contains(op)
                        && r.patient.is_none()
                        && r.filter.is_empty()
                        && r.source.is_none()
                        && (r.rtype.is_none() || (rtype.is_some() && r.rtype.as_deref() == rtype))
                })
    }

    /// The index rows of `resource` that the caller's rules and circle of
    /// trust test: its patient references, labels, code, date, general
    /// practitioner and the rules' filter parameters.
    fn rows_for(&self, rtype: &str, resource: &Value) -> index::Rows {
        let own = match patient_data::reach(rtype) {
            Reach::Own(params) => params,
            _ => Vec::new(),
        };
        index::extract_some(rtype, resource, |code| {
            own.iter().any(|p| p == code)
                || [
                    "_security",
                    "_source",
                    "code",
                    "date",
                    "general-practitioner",
                ]
                .contains(&code)
                || self
                    .rules
                    .iter()
                    .any(|r| r.filter.iter().any(|(k, _)| k == code))
                || self
                    .circle
                    .as_ref()
                    .and_then(|c| c.insurer())
                    .is_some_and(|i| i.filters_on(rtype, code))
        })
    }

    /// May the caller do `op` on this resource (its content)?
    pub fn permits(&self, op: Ops, rtype: &str, resource: &Value) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let mut rows = None;
        let scoped = self.rules_for(op, rtype).any(|r| {
            let rows = rows.get_or_insert_with(|| self.rows_for(rtype, resource));
            r.patient
                .as_deref()
                .is_none_or(|p| belongs_to(rtype, resource, rows, p))
                && r.filter.iter().all(|(k, v)| token_matches(rows, k, v))
                && r.source.as_deref().is_none_or(|s| {
                    resource.pointer("/meta/source").and_then(Value::as_str) == Some(s)
                })
                && r.id
                    .as_deref()
                    .is_none_or(|i| resource.get("id").and_then(Value::as_str) == Some(i))
        });
        scoped
            && (!self.circled()
                || self.circle.as_ref().is_some_and(|c| {
                    let rows = rows.get_or_insert_with(|| self.rows_for(rtype, resource));
                    let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
                    c.holds(circle_op(op), rtype, id, rows)
                }))
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

    /// The condition that confines resources of `rtype` to those the
    /// caller may do `op` on; `None` when it may do it on every one.
    /// 403 when it may do `op` on none.
    pub fn conds(&self, op: Ops, rtype: &str) -> Result<Option<Cond>> {
        if self.is_unrestricted() {
            return Ok(None);
        }
        self.check_type(op, rtype)?;
        let scoped = self.scope_conds(op, rtype)?;
        if !self.circled() {
            return Ok(scoped);
        }
        let circle = match &self.circle {
            Some(c) => c.cond(circle_op(op), rtype),
            None => Some(consent::nothing()),
        };
        Ok(match (scoped, circle) {
            (s, None) => s,
            (None, c) => c,
            (Some(s), Some(c)) => Some(Cond::And(vec![s, c])),
        })
    }

    fn scope_conds(&self, op: Ops, rtype: &str) -> Result<Option<Cond>> {
        let mut alts = Vec::new();
        for r in self.rules_for(op, rtype) {
            let mut conds = Vec::new();
            if let Some(p) = &r.patient {
                if let Reach::Own(params) = patient_data::reach(rtype) {
                    conds.push(if rtype == "Patient" {
                        Cond::Ids(vec![p.clone()])
                    } else {
                        // No indexed parameter: nothing can be shown as theirs.
                        Cond::RefersTo {
                            params,
                            target_type: "Patient".into(),
                            target_ids: vec![p.clone()],
                        }
                    });
                }
            }
            if !r.filter.is_empty() {
                let parsed = crate::search::parse(rtype, &r.filter, true, "")?;
                conds.extend(parsed.conds);
            }
            if let Some(i) = &r.id {
                conds.push(Cond::Ids(vec![i.clone()]));
            }
            if let Some(s) = &r.source {
                conds.push(Cond::Index {
                    table: Table::Uri,
                    param: "_source".into(),
                    test: Test::Eq("value", Bind::Text(s.clone())),
                });
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

    /// Confines a query of `rtype` for `op`: the caller's condition for
    /// `rtype` is added, and every chain and `_has` inside `conds` is
    /// confined the same way to what the caller may search of the types it
    /// reaches. A chain keeps only the target types the caller may search
    /// (403 if none is left); `_has` on a type it may not search is 403.
    pub fn confine(&self, op: Ops, rtype: &str, conds: &mut Vec<Cond>) -> Result<()> {
        if self.is_unrestricted() {
            return Ok(());
        }
        if let Some(rules) = self.circle.as_ref().and_then(|c| c.insurer()) {
            for c in conds.iter() {
                if let Some(p) = masked_param(rules, rtype, c) {
                    return Err(Error::Forbidden(format!(
                        "{rtype}?{p}: the insurer policy masks what this parameter searches"
                    )));
                }
            }
        }
        for c in conds.iter_mut() {
            self.confine_inner(c)?;
        }
        if let Some(limit) = self.conds(op, rtype)? {
            match crate::search::cond::assume(limit, rtype, conds) {
                Cond::And(all) if all.is_empty() => {}
                limit => conds.push(limit),
            }
        }
        Ok(())
    }

    fn confine_inner(&self, c: &mut Cond) -> Result<()> {
        match c {
            Cond::Chain {
                param,
                types,
                inner,
            } => {
                let mut alts = Vec::new();
                let mut refused = None;
                for t in types.iter() {
                    let mut sub = inner.clone();
                    match self.confine(Ops::SEARCH, t, &mut sub) {
                        Ok(()) => alts.push(Cond::Chain {
                            param: param.clone(),
                            types: vec![t.clone()],
                            inner: sub,
                        }),
                        Err(e) => refused = Some(e),
                    }
                }
                *c = match (alts.len(), refused) {
                    (0, Some(e)) => return Err(e),
                    (1, _) => alts.pop().expect("one chain"),
                    _ => Cond::Or(alts),
                };
            }
            Cond::Has { source, inner, .. } => self.confine(Ops::SEARCH, source, inner)?,
            Cond::Not(inner) => self.confine_inner(inner)?,
            Cond::Or(cs) | Cond::And(cs) => {
                for c in cs {
                    self.confine_inner(c)?;
                }
            }
            _ => {}
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

/// A search parameter in `c` (on `rtype`, or on the source type of a
/// `_has`) that reads an element the insurer's policy masks. Chains are
/// checked on their target type when they are confined.
fn masked_param<'c>(rules: &insurer::InsurerRules, rtype: &str, c: &'c Cond) -> Option<&'c str> {
    match c {
        Cond::Index { param, .. } | Cond::Chain { param, .. }
            if rules.masks_param(rtype, param) =>
        {
            Some(param)
        }
        Cond::Composite(parts) => parts
            .iter()
            .find(|(_, p, _)| rules.masks_param(rtype, p))
            .map(|(_, p, _)| p.as_str()),
        Cond::Has { source, param, .. } if rules.masks_param(source, param) => Some(param),
        Cond::Not(inner) => masked_param(rules, rtype, inner),
        Cond::Or(cs) | Cond::And(cs) => cs.iter().find_map(|c| masked_param(rules, rtype, c)),
        _ => None,
    }
}

/// The interaction a consent decision is made for: reads and searches
/// are `access`; creating, changing and deleting are `correct`.
fn circle_op(op: Ops) -> Ops {
    if op == Ops::SEARCH {
        Ops::READ
    } else {
        op
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

/// Whether `resource` is `Patient/patient`'s (see [`patient_data`]); shared
/// reference data belongs to nobody and is allowed.
fn belongs_to(rtype: &str, resource: &Value, rows: &index::Rows, patient: &str) -> bool {
    match patient_data::reach(rtype) {
        Reach::Own(_) if rtype == "Patient" => {
            resource.get("id").and_then(Value::as_str) == Some(patient)
        }
        Reach::Own(params) => rows.references.iter().any(|r| {
            r.target_type == "Patient" && r.target_id == patient && params.contains(&r.param)
        }),
        Reach::Shared => true,
        Reach::None => false,
    }
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
    use crate::policy::scope::parse_scopes;
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
        assert_eq!(
            Access::maintenance(Maintenance::Explain)
                .conds(Ops::SEARCH, "Observation")
                .unwrap(),
            None
        );
        assert_eq!(
            access("user/*.rs", None)
                .conds(Ops::SEARCH, "Observation")
                .unwrap(),
            None
        );
        let a = access("patient/Observation.rs", Some("p1"));
        match a.conds(Ops::SEARCH, "Observation").unwrap() {
            Some(Cond::RefersTo { target_ids, .. }) => assert_eq!(target_ids, vec!["p1"]),
            other => panic!("{other:?}"),
        }
        let a = access("patient/Patient.rs", Some("p1"));
        assert_eq!(
            a.conds(Ops::SEARCH, "Patient").unwrap(),
            Some(Cond::Ids(vec!["p1".into()]))
        );
        let a = access("patient/Observation.rs?category=laboratory", Some("p1"));
        assert!(matches!(
            a.conds(Ops::SEARCH, "Observation").unwrap(),
            Some(Cond::And(c)) if c.len() == 2
        ));
        assert!(a.conds(Ops::SEARCH, "Condition").is_err());
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let a = Access::none();
        assert!(a.check_type(Ops::READ, "Patient").is_err());
        assert!(a.conds(Ops::SEARCH, "Observation").is_err());
        assert!(!a.permits(
            Ops::READ,
            "Organization",
            &json!({"resourceType": "Organization", "id": "o"})
        ));
    }

    #[test]
    fn patient_scopes_read_shared_reference_data_but_never_write_it() {
        let a = access("patient/*.cruds", Some("p1"));
        let org = json!({"resourceType": "Organization", "id": "o"});
        assert!(a.permits(Ops::READ, "Organization", &org));
        assert!(!a.permits(Ops::UPDATE, "Organization", &org));
        assert!(!a.permits(Ops::CREATE, "Organization", &org));
        assert!(a.check_type(Ops::DELETE, "Organization").is_err());
        // Types that are neither the patient's nor shared are out of reach.
        assert!(a.check_type(Ops::READ, "Binary").is_err());
    }

    #[test]
    fn a_chain_is_confined_to_the_types_the_caller_may_search() {
        let a = access("patient/Observation.rs patient/Patient.rs", Some("p1"));
        let mut conds = vec![Cond::Chain {
            param: "subject".into(),
            types: vec!["Patient".into(), "Group".into()],
            inner: vec![Cond::Ids(vec!["p2".into()])],
        }];
        a.confine(Ops::SEARCH, "Observation", &mut conds).unwrap();
        assert_eq!(conds.len(), 2, "the chain and the caller's own condition");
        match &conds[0] {
            Cond::Chain { types, inner, .. } => {
                assert_eq!(types, &vec!["Patient".to_string()]);
                assert!(inner.contains(&Cond::Ids(vec!["p1".into()])));
            }
            other => panic!("{other:?}"),
        }
        // A chain that reaches only types the caller may not search: 403.
        let mut conds = vec![Cond::Chain {
            param: "subject".into(),
            types: vec!["Group".into()],
            inner: vec![],
        }];
        assert!(a.confine(Ops::SEARCH, "Observation", &mut conds).is_err());
    }

    #[test]
    fn has_is_confined_to_the_source_type_the_caller_may_search() {
        let a = access("patient/Patient.rs patient/Observation.rs", Some("p1"));
        let mut conds = vec![Cond::Has {
            source: "Observation".into(),
            param: "subject".into(),
            inner: vec![],
        }];
        a.confine(Ops::SEARCH, "Patient", &mut conds).unwrap();
        match &conds[0] {
            Cond::Has { inner, .. } => assert_eq!(inner.len(), 1),
            other => panic!("{other:?}"),
        }
        let mut conds = vec![Cond::Has {
            source: "Condition".into(),
            param: "subject".into(),
            inner: vec![],
        }];
        assert!(a.confine(Ops::SEARCH, "Patient", &mut conds).is_err());
    }

    #[test]
    fn a_subscriber_sees_only_what_it_sent() {
        let a = Access::subscriber("https://h.example/Organization/1", "1");
        assert_eq!(a.source(), Some("https://h.example/Organization/1"));
        let mine = json!({"resourceType": "Patient", "id": "x",
            "meta": {"source": "https://h.example/Organization/1"}});
        let theirs = json!({"resourceType": "Patient", "id": "y",
            "meta": {"source": "https://other.example/Organization/2"}});
        assert!(a.permits(Ops::READ, "Patient", &mine));
        assert!(!a.permits(Ops::READ, "Patient", &theirs));
        assert!(!a.permits(Ops::UPDATE, "Patient", &mine));
        assert!(!a.sees_whole_type(Ops::SEARCH, Some("Patient")));
        assert!(matches!(
            a.conds(Ops::SEARCH, "Patient").unwrap(),
            Some(Cond::Index { .. })
        ));
        // Its own Organization, and no other.
        let own = json!({"resourceType": "Organization", "id": "1"});
        let other = json!({"resourceType": "Organization", "id": "2"});
        assert!(a.permits(Ops::READ, "Organization", &own));
        assert!(!a.permits(Ops::READ, "Organization", &other));
        assert!(!a.permits(Ops::UPDATE, "Organization", &own));
    }
}
