//! The circle of trust: a patient's Consents, care relationships and
//! emergency grants, compiled into store conditions for one caller.
//!
//! Everything here is pure: `store::circle` gives the facts for a caller
//! as the database holds them at the start of every request (so a revoked
//! Consent counts on the very next request, whatever token is used), and
//! this module turns them, with the request's instant, into
//! a [`Cond`] per resource type, which the gate adds to every query, and
//! into the same test on a single resource's index rows.
//!
//! How a decision is made, for caller A and a resource R of patient P:
//! - A break-the-glass grant of A for P in force: visible (and recorded).
//! - Otherwise every active `patient-privacy` Consent of P is evaluated. A
//!   provision applies when its period covers now, its actors (if any) name
//!   A, its actions (if any) include the interaction (`access` for reads,
//!   `correct` for writes), its classes (if any) include R's type, and R
//!   meets its codes, security labels, data period and data references.
//!   Nested provisions refine their parent: among the children that apply,
//!   deny overrides permit; if none applies, the parent's own type decides.
//!   Across Consents, deny overrides permit.
//! - A `permit` names who it permits: a permit with no actor on its path
//!   permits only P's care team and general practitioner (the PCF "basic"
//!   consent), never everybody. A `deny` without actor denies everyone.
//! - Without a decision, the implicit policy: `consent_default =
//!   "permit-treatment"` lets P's general practitioner (a Practitioner,
//!   one of their PractitionerRoles, or an Organization they work for) and
//!   active care teams see the record; `"deny"` lets nobody.
//! - An insurer sees its members' (Coverage.beneficiary of a Coverage it
//!   pays) permitted part (`super::insurer`), minus what Consents deny; a
//!   Consent's permit never widens it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use super::insurer::InsurerRules;
use super::patient_data::{self, Reach};
use super::scope::Ops;
use crate::search::cond::{Bind, Cond, Table, Test};
use crate::search::index::{index_text, Rows};
use crate::search::registry::{registry, Kind};

/// The implicit policy for a patient without a deciding Consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsentDefault {
    /// Nobody but those a Consent permits.
    Deny,
    /// The patient's general practitioner and care teams.
    PermitTreatment,
}

/// What `store::circle` loaded for one caller: kept across requests while
/// the data it comes from is unchanged, so whatever depends on the time is
/// decided by [`Circle`] with the request's own instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// References that name the caller: `Practitioner/x`, its
    /// `PractitionerRole/…`, the `Organization/…` it works for, the
    /// `CareTeam/…` it is part of, `RelatedPerson/…`.
    pub identity: BTreeSet<String>,
    /// Patients the caller treats (general practitioner, care team).
    pub treatment: BTreeSet<String>,
    /// Patients the caller holds a break-the-glass grant for, with the
    /// instant it ends.
    pub emergency: BTreeMap<String, String>,
    /// An insurer's members.
    pub covered: BTreeSet<String>,
    /// Consents, by patient id (whether each is in force is decided per
    /// request: [`in_force`]).
    pub consents: BTreeMap<String, Vec<Value>>,
    pub default: Option<ConsentDefault>,
}

/// One caller's compiled circle of trust.
#[derive(Debug, Clone, PartialEq)]
pub struct Circle {
    facts: Arc<Facts>,
    /// The request's instant (RFC 3339, UTC).
    now: String,
    insurer: Option<Arc<InsurerRules>>,
    /// Conditions compiled so far in this request, by operation and type
    /// (a page's resources are checked one by one against the same one).
    memo: Memo,
}

/// [`Circle::cond`]'s results, shared by clones of one circle; not part of
/// what a circle is.
#[derive(Debug, Clone, Default)]
struct Memo(Arc<std::sync::Mutex<Compiled>>);

/// Conditions by operation and resource type.
type Compiled = std::collections::HashMap<(Ops, String), Option<Arc<Cond>>>;

impl PartialEq for Memo {
    fn eq(&self, _: &Memo) -> bool {
        true
    }
}

/// A boolean over store conditions, simplified as it is built.
#[derive(Debug, Clone, PartialEq)]
enum B {
    T,
    F,
    C(Cond),
    And(Vec<B>),
    Or(Vec<B>),
    Not(Box<B>),
}

impl B {
    fn and(parts: Vec<B>) -> B {
        let mut out = Vec::new();
        for p in parts {
            match p {
                B::T => {}
                B::F => return B::F,
                B::And(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        dedup(&mut out);
        match out.len() {
            0 => B::T,
            1 => out.pop().expect("one"),
            _ => B::And(out),
        }
    }
    fn or(parts: Vec<B>) -> B {
        let mut out = Vec::new();
        for p in parts {
            match p {
                B::F => {}
                B::T => return B::T,
                B::Or(inner) => out.extend(inner),
                // Tests of one token parameter join into one lookup
                // (`_security` is PSY or ETH: one index probe, not two).
                B::C(Cond::Index {
                    table: Table::Token,
                    param,
                    test,
                }) => match out.iter_mut().find_map(|o| match o {
                    B::C(Cond::Index {
                        table: Table::Token,
                        param: p,
                        test: Test::Or(ts),
                    }) if *p == param => Some(ts),
                    _ => None,
                }) {
                    Some(ts) => {
                        for t in alternatives(test) {
                            if !ts.contains(&t) {
                                ts.push(t)
                            }
                        }
                    }
                    None => out.push(B::C(Cond::Index {
                        table: Table::Token,
                        param,
                        test: Test::Or(alternatives(test)),
                    })),
                },
                other => out.push(other),
            }
        }
        dedup(&mut out);
        match out.len() {
            0 => B::F,
            1 => out.pop().expect("one"),
            _ => B::Or(out),
        }
    }
    fn not(b: B) -> B {
        match b {
            B::T => B::F,
            B::F => B::T,
            B::Not(inner) => *inner,
            other => B::Not(Box::new(other)),
        }
    }
    fn to_cond(&self) -> Cond {
        match self {
            B::T => Cond::And(Vec::new()),
            B::F => Cond::Or(Vec::new()),
            B::C(c) => c.clone(),
            B::And(bs) => Cond::And(bs.iter().map(B::to_cond).collect()),
            B::Or(bs) => Cond::Or(bs.iter().map(B::to_cond).collect()),
            B::Not(b) => Cond::Not(Box::new(b.to_cond())),
        }
    }
}

/// The alternatives of a test: an `Or` joined again is not nested (so that
/// one label deny reached twice is one term, and written once).
fn alternatives(t: Test) -> Vec<Test> {
    match t {
        Test::Or(ts) => ts,
        t => vec![t],
    }
}

/// Drops repeated terms (the same test is written once in SQL).
fn dedup(terms: &mut Vec<B>) {
    let mut kept: Vec<B> = Vec::with_capacity(terms.len());
    for t in terms.drain(..) {
        if !kept.contains(&t) {
            kept.push(t);
        }
    }
    *terms = kept;
}

/// A condition that matches nothing.
pub fn nothing() -> Cond {
    Cond::Or(Vec::new())
}

/// Why a provision applies or not, for `$access-preview`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reason {
    /// `Consent/ID` and the provision's path (`provision.provision[1]`), or
    /// the implicit policy, or break-the-glass.
    pub source: String,
    pub effect: &'static str,
}

impl Circle {
    /// The circle of `facts` at the instant `now` (RFC 3339, UTC).
    pub fn new(
        facts: impl Into<Arc<Facts>>,
        now: String,
        insurer: Option<Arc<InsurerRules>>,
    ) -> Circle {
        Circle {
            facts: facts.into(),
            now,
            insurer,
            memo: Memo::default(),
        }
    }

    /// Whether `p`'s break-the-glass grant is running.
    fn emergency(&self, p: &str) -> bool {
        self.facts
            .emergency
            .get(p)
            .is_some_and(|until| *until > self.now)
    }

    /// `p`'s Consents in force now.
    fn consents<'a>(&'a self, p: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let now = self.now.as_str();
        self.facts
            .consents
            .get(p)
            .into_iter()
            .flatten()
            .filter(move |c| in_force(c, now))
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    pub fn insurer(&self) -> Option<&InsurerRules> {
        self.insurer.as_deref()
    }

    /// Every patient the caller could see something of.
    pub fn patients(&self) -> BTreeSet<&str> {
        let f = &self.facts;
        let mut all: BTreeSet<&str> = f
            .emergency
            .keys()
            .filter(|p| self.emergency(p))
            .map(String::as_str)
            .collect();
        if self.insurer.is_some() {
            all.extend(f.covered.iter().map(String::as_str));
        } else {
            all.extend(f.treatment.iter().map(String::as_str));
            all.extend(
                f.consents
                    .keys()
                    .filter(|p| self.consents(p).next().is_some())
                    .map(String::as_str),
            );
        }
        all
    }

    /// Whether the caller may reach type `rtype` at all.
    pub fn reaches_type(&self, rtype: &str) -> bool {
        match &self.insurer {
            Some(rules) => rules.allows(rtype),
            None => !matches!(patient_data::reach(rtype), Reach::None),
        }
    }

    /// The condition confining resources of `rtype` to what the circle
    /// lets the caller `op`; `None` when it adds nothing (shared reference
    /// data for a practitioner).
    pub fn cond(&self, op: Ops, rtype: &str) -> Option<Cond> {
        self.compiled(op, rtype).map(|c| Cond::clone(&c))
    }

    /// Builds [`Circle::cond`] from the facts.
    fn compile(&self, op: Ops, rtype: &str) -> Option<Cond> {
        if !self.reaches_type(rtype) {
            return Some(nothing());
        }
        let extra = self.insurer.as_ref().and_then(|r| r.filter(rtype));
        let params = match patient_data::reach(rtype) {
            Reach::Own(params) => params,
            // Shared reference data describes no patient.
            Reach::Shared | Reach::None => return extra,
        };
        let mut full = Vec::new();
        let mut alts = Vec::new();
        for p in self.patients() {
            match self.visible(p, op, rtype) {
                B::F => {}
                B::T => full.push(p.to_string()),
                b => alts.push(B::and(vec![
                    B::C(member(rtype, &params, vec![p.to_string()])),
                    b,
                ])),
            }
        }
        if !full.is_empty() {
            alts.push(B::C(member(rtype, &params, full)));
        }
        if op == Ops::CREATE && rtype == "Patient" && self.insurer.is_none() {
            // A practitioner registers a new patient whose general
            // practitioner they are (themself, a role, an organisation).
            for (t, ids) in by_type(&self.facts.identity) {
                if ["Practitioner", "PractitionerRole", "Organization"].contains(&t) {
                    alts.push(B::C(Cond::RefersTo {
                        params: vec!["general-practitioner".into()],
                        target_type: t.to_string(),
                        target_ids: ids,
                    }));
                }
            }
        }
        let mut all = B::or(alts);
        if let Some(e) = extra {
            all = B::and(vec![all, B::C(e)]);
        }
        Some(all.to_cond())
    }

    /// The same decision as [`Circle::cond`], on one resource's index rows.
    pub fn holds(&self, op: Ops, rtype: &str, id: &str, rows: &Rows) -> bool {
        match self.compiled(op, rtype) {
            None => true,
            Some(c) => holds(&c, id, rows),
        }
    }

    /// [`Circle::compile`], once per circle (a request), operation and type:
    /// a request's queries, includes and single resources all ask again.
    fn compiled(&self, op: Ops, rtype: &str) -> Option<Arc<Cond>> {
        let key = (op, rtype.to_string());
        let memo = |m: &Memo| {
            m.0.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned()
        };
        if let Some(c) = memo(&self.memo) {
            return c;
        }
        let c = self.compile(op, rtype).map(Arc::new);
        self.memo
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, c.clone());
        c
    }

    /// What decides for patient `p`, resource type `rtype` and `op`.
    fn visible(&self, p: &str, op: Ops, rtype: &str) -> B {
        let f = &self.facts;
        if self.emergency(p) && self.insurer.is_none() {
            return B::T;
        }
        let treats = f.treatment.contains(p);
        let mut permits = Vec::new();
        let mut denies = Vec::new();
        for c in self.consents(p) {
            if let Some(root) = c.get("provision") {
                let ctx = Ctx {
                    circle: self,
                    op,
                    rtype,
                    treats,
                };
                if let Some((permit, deny)) = ctx.node(root, false) {
                    permits.push(permit);
                    denies.push(deny);
                }
            }
        }
        let denied = B::or(denies);
        if self.insurer.is_some() {
            return if f.covered.contains(p) {
                B::not(denied)
            } else {
                B::F
            };
        }
        let base = treats && f.default == Some(ConsentDefault::PermitTreatment);
        B::and(vec![
            B::not(denied),
            B::or(vec![B::or(permits), if base { B::T } else { B::F }]),
        ])
    }

    /// For `$access-preview`: which provisions of which Consents decide for
    /// patient `p` and type `rtype` (reads).
    pub fn reasons(&self, p: &str, rtype: &str) -> Vec<Reason> {
        let f = &self.facts;
        let mut out = Vec::new();
        if self.emergency(p) && self.insurer.is_none() {
            out.push(Reason {
                source: "break-the-glass grant".into(),
                effect: "permit",
            });
        }
        if let Some(rules) = &self.insurer {
            out.push(Reason {
                source: format!("insurer policy '{}'", rules.name),
                effect: if rules.allows(rtype) && f.covered.contains(p) {
                    "permit"
                } else {
                    "deny"
                },
            });
        } else if f.treatment.contains(p) {
            out.push(Reason {
                source: "care relationship (general practitioner or care team)".into(),
                effect: if f.default == Some(ConsentDefault::PermitTreatment) {
                    "permit"
                } else {
                    "none (consent_default = deny)"
                },
            });
        }
        let ctx = Ctx {
            circle: self,
            op: Ops::READ,
            rtype,
            treats: f.treatment.contains(p),
        };
        for c in self.consents(p) {
            let id = c.get("id").and_then(Value::as_str).unwrap_or("?");
            if let Some(root) = c.get("provision") {
                ctx.explain(root, false, &format!("Consent/{id}.provision"), &mut out);
            }
        }
        out
    }
}

struct Ctx<'a> {
    circle: &'a Circle,
    op: Ops,
    rtype: &'a str,
    treats: bool,
}

impl Ctx<'_> {
    /// `(permit, deny)` of a provision for the resources it applies to, or
    /// `None` when it cannot apply to this caller, type and interaction.
    fn node(&self, n: &Value, named_above: bool) -> Option<(B, B)> {
        let (m, named) = self.applies(n, named_above)?;
        let mut child_permit = Vec::new();
        let mut child_deny = Vec::new();
        for c in list(n, "provision") {
            if let Some((p, d)) = self.node(c, named) {
                child_permit.push(p);
                child_deny.push(d);
            }
        }
        let any_deny = B::or(child_deny);
        let any_permit = B::or(child_permit);
        let kind = n.get("type").and_then(Value::as_str);
        let own_permit = kind == Some("permit") && (named || self.treats);
        let own_deny = kind == Some("deny");
        let deny = B::and(vec![
            m.clone(),
            B::or(vec![
                any_deny.clone(),
                if own_deny {
                    B::not(any_permit.clone())
                } else {
                    B::F
                },
            ]),
        ]);
        let permit = B::and(vec![
            m,
            B::not(any_deny),
            B::or(vec![any_permit, if own_permit { B::T } else { B::F }]),
        ]);
        Some((permit, deny))
    }

    fn explain(&self, n: &Value, named_above: bool, path: &str, out: &mut Vec<Reason>) {
        let Some((_, named)) = self.applies(n, named_above) else {
            return;
        };
        let kind = n.get("type").and_then(Value::as_str).unwrap_or("");
        let effect = match kind {
            "deny" => "deny",
            "permit" if named || self.treats => "permit",
            _ => "none (a permit names no actor of this caller)",
        };
        out.push(Reason {
            source: path.to_string(),
            effect,
        });
        for (i, c) in list(n, "provision").enumerate() {
            self.explain(c, named, &format!("{path}.provision[{i}]"), out);
        }
    }

    /// Whether provision `n` can apply (period, actor, action, class), the
    /// condition on resources it adds (codes, labels, data period, data),
    /// and whether an actor on its path names the caller.
    fn applies(&self, n: &Value, named_above: bool) -> Option<(B, bool)> {
        let now = &self.circle.now;
        if let Some(p) = n.get("period") {
            if !covers(p, now) {
                return None;
            }
        }
        let actors: Vec<&str> = list(n, "actor")
            .filter_map(|a| a.pointer("/reference/reference").and_then(Value::as_str))
            .collect();
        let named = if actors.is_empty() {
            named_above
        } else if actors
            .iter()
            .any(|a| self.circle.facts.identity.contains(*a))
        {
            true
        } else {
            return None;
        };
        let actions: Vec<&str> = list(n, "action").flat_map(codes).collect();
        if !actions.is_empty() {
            let wanted: &[&str] = if self.op == Ops::READ || self.op == Ops::SEARCH {
                &["access", "use", "disclose"]
            } else {
                &["correct"]
            };
            if !actions.iter().any(|a| wanted.contains(a)) {
                return None;
            }
        }
        let classes: Vec<&str> = list(n, "class")
            .filter_map(|c| c.get("code").and_then(Value::as_str))
            .collect();
        if !classes.is_empty() && !classes.contains(&self.rtype) {
            return None;
        }
        let mut conds = Vec::new();
        let labels: Vec<B> = list(n, "securityLabel")
            .map(|c| B::C(token("_security", c)))
            .collect();
        if !labels.is_empty() {
            conds.push(B::or(labels));
        }
        let code_param = registry()
            .get(self.rtype, "code")
            .filter(|p| p.kind == Kind::Token && p.supported());
        let codes: Vec<B> = list(n, "code")
            .flat_map(|cc| list(cc, "coding"))
            .map(|c| match code_param {
                Some(_) => B::C(token("code", c)),
                None => B::F,
            })
            .collect();
        if !codes.is_empty() {
            conds.push(B::or(codes));
        }
        if let Some(dp) = n.get("dataPeriod") {
            conds.push(self.data_period(dp));
        }
        let data: Vec<B> = list(n, "data")
            .filter_map(|d| d.pointer("/reference/reference").and_then(Value::as_str))
            .map(|r| match r.split_once('/') {
                Some((t, id)) if t == self.rtype => B::C(Cond::Ids(vec![id.to_string()])),
                _ => B::F,
            })
            .collect();
        if !data.is_empty() {
            conds.push(B::or(data));
        }
        Some((B::and(conds), named))
    }

    /// Resources whose clinical date (`date` parameter) lies in `period`.
    fn data_period(&self, period: &Value) -> B {
        let Some(p) = registry()
            .get(self.rtype, "date")
            .filter(|p| p.kind == Kind::Date && p.supported())
        else {
            return B::F;
        };
        let mut params = Vec::new();
        if let Some(s) = period.get("start").and_then(Value::as_str) {
            params.push((p.code.clone(), format!("ge{s}")));
        }
        if let Some(e) = period.get("end").and_then(Value::as_str) {
            params.push((p.code.clone(), format!("le{e}")));
        }
        if params.is_empty() {
            return B::T;
        }
        match crate::search::parse(self.rtype, &params, true, "") {
            Ok(parsed) => B::and(parsed.conds.into_iter().map(B::C).collect()),
            Err(_) => B::F,
        }
    }
}

/// References `Type/id` grouped by type.
fn by_type(refs: &BTreeSet<String>) -> BTreeMap<&str, Vec<String>> {
    let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in refs {
        if let Some((t, id)) = r.split_once('/') {
            out.entry(t).or_default().push(id.to_string());
        }
    }
    out
}

/// Membership in the record of `patients`.
fn member(rtype: &str, params: &[String], patients: Vec<String>) -> Cond {
    if rtype == "Patient" {
        Cond::Ids(patients)
    } else {
        Cond::RefersTo {
            params: params.to_vec(),
            target_type: "Patient".into(),
            target_ids: patients,
        }
    }
}

/// A token condition for a Coding (`system|code`).
fn token(param: &str, coding: &Value) -> Cond {
    let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
    let test = match coding.get("system").and_then(Value::as_str) {
        Some(s) => Test::And(vec![
            Test::Eq("system", Bind::Text(s.to_string())),
            Test::Eq("code", Bind::Text(code.to_string())),
        ]),
        None => Test::Eq("code", Bind::Text(code.to_string())),
    };
    Cond::Index {
        table: Table::Token,
        param: param.to_string(),
        test,
    }
}

fn list<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> + 'a {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter())
        .into_iter()
        .flatten()
}

fn codes(cc: &Value) -> impl Iterator<Item = &str> + '_ {
    list(cc, "coding").filter_map(|c| c.get("code").and_then(Value::as_str))
}

/// Whether a FHIR Period covers the instant `now` (a date-only end covers
/// its whole day).
pub fn covers(period: &Value, now: &str) -> bool {
    let start_ok = period
        .get("start")
        .and_then(Value::as_str)
        .is_none_or(|s| s <= now || now.starts_with(s));
    let end_ok = period
        .get("end")
        .and_then(Value::as_str)
        .is_none_or(|e| now <= e || now.starts_with(e));
    start_ok && end_ok
}

/// Whether a Consent is one the circle of trust obeys: active, of scope
/// `patient-privacy`, in its period.
pub fn in_force(consent: &Value, now: &str) -> bool {
    consent.get("status").and_then(Value::as_str) == Some("active")
        && consent
            .get("scope")
            .map(|s| codes(s).any(|c| c == "patient-privacy"))
            .unwrap_or(false)
        && consent
            .pointer("/provision/period")
            .is_none_or(|p| covers(p, now))
}

/// Evaluates a condition on one resource's index rows (the subset of
/// conditions the circle of trust and the scopes produce; anything else is
/// false, so an unknown condition hides rather than shows).
pub fn holds(c: &Cond, id: &str, rows: &Rows) -> bool {
    match c {
        Cond::Ids(ids) => ids.iter().any(|i| i == id),
        Cond::RefersTo {
            params,
            target_type,
            target_ids,
        } => rows.references.iter().any(|r| {
            params.contains(&r.param)
                && &r.target_type == target_type
                && target_ids.contains(&r.target_id)
        }),
        Cond::Index {
            table: Table::Token,
            param,
            test,
        } => rows.tokens.iter().any(|t| {
            &t.param == param
                && test_holds(test, &|col| match col {
                    "system" => Some(t.system.as_str()),
                    "code" => Some(t.code.as_str()),
                    _ => None,
                })
        }),
        Cond::Index {
            table: Table::Date,
            param,
            test,
        } => rows.dates.iter().any(|d| {
            &d.param == param
                && test_holds(test, &|col| match col {
                    "lo" => Some(d.lo.as_str()),
                    "hi" => Some(d.hi.as_str()),
                    _ => None,
                })
        }),
        Cond::Not(inner) => !holds(inner, id, rows),
        Cond::And(cs) => cs.iter().all(|c| holds(c, id, rows)),
        Cond::Or(cs) => cs.iter().any(|c| holds(c, id, rows)),
        _ => false,
    }
}

fn test_holds<'a>(t: &Test, col: &dyn Fn(&str) -> Option<&'a str>) -> bool {
    let text = |b: &Bind| match b {
        Bind::Text(s) => Some(index_text(s).to_string()),
        Bind::Real(_) => None,
    };
    let cmp = |c: &str, b: &Bind, f: fn(std::cmp::Ordering) -> bool| match (col(c), text(b)) {
        (Some(v), Some(w)) => f(v.cmp(w.as_str())),
        _ => false,
    };
    match t {
        Test::Any => true,
        Test::Eq(c, b) => cmp(c, b, |o| o.is_eq()),
        Test::Ne(c, b) => cmp(c, b, |o| o.is_ne()),
        Test::Lt(c, b) => cmp(c, b, |o| o.is_lt()),
        Test::Le(c, b) => cmp(c, b, |o| o.is_le()),
        Test::Gt(c, b) => cmp(c, b, |o| o.is_gt()),
        Test::Ge(c, b) => cmp(c, b, |o| o.is_ge()),
        Test::In(c, vals) => col(c).is_some_and(|v| vals.iter().any(|w| index_text(w) == v)),
        Test::And(ts) => ts.iter().all(|t| test_holds(t, col)),
        Test::Or(ts) => ts.iter().any(|t| test_holds(t, col)),
        Test::Prefix(..) | Test::Contains(..) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::index;
    use serde_json::json;

    const NOW: &str = "2026-06-01T12:00:00.000Z";
    const LABELS: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

    fn consent(provision: Value) -> Value {
        json!({"resourceType": "Consent", "id": "c", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "patient": {"reference": "Patient/p"}, "provision": provision})
    }

    fn actor(r: &str) -> Value {
        json!([{"role": {"text": "x"}, "reference": {"reference": r}}])
    }

    fn circle(identity: &[&str], treats: bool, consents: Vec<Value>) -> Circle {
        let mut f = Facts {
            identity: identity.iter().map(|s| s.to_string()).collect(),
            default: Some(ConsentDefault::PermitTreatment),
            ..Facts::default()
        };
        if treats {
            f.treatment.insert("p".into());
        }
        if !consents.is_empty() {
            f.consents.insert("p".into(), consents);
        }
        Circle::new(f, NOW.into(), None)
    }

    fn obs(labels: &[&str]) -> (String, Rows) {
        let sec: Vec<Value> = labels
            .iter()
            .map(|l| json!({"system": LABELS, "code": l}))
            .collect();
        let r = json!({"resourceType": "Observation", "id": "o", "status": "final",
            "meta": {"security": sec}, "code": {"text": "x"},
            "subject": {"reference": "Patient/p"}});
        ("o".into(), index::extract("Observation", &r))
    }

    fn sees(c: &Circle, labels: &[&str]) -> bool {
        let (id, rows) = obs(labels);
        c.holds(Ops::READ, "Observation", &id, &rows)
    }

    #[test]
    fn the_care_team_sees_the_record_without_a_consent_and_nobody_else_does() {
        assert!(sees(&circle(&["Practitioner/gp"], true, vec![]), &[]));
        assert!(!sees(&circle(&["Practitioner/x"], false, vec![]), &[]));
        let mut deny_default = circle(&["Practitioner/gp"], true, vec![]);
        Arc::make_mut(&mut deny_default.facts).default = Some(ConsentDefault::Deny);
        assert!(!sees(&deny_default, &[]));
    }

    #[test]
    fn a_permit_without_actor_never_reaches_strangers() {
        let c = consent(json!({"type": "permit"}));
        assert!(!sees(
            &circle(&["Practitioner/x"], false, vec![c.clone()]),
            &[]
        ));
        assert!(sees(&circle(&["Practitioner/gp"], true, vec![c]), &[]));
    }

    #[test]
    fn nested_provisions_refine_and_deny_overrides_permit() {
        // Opt-out of everyone, except x, who may not see HIV data.
        let c = consent(json!({"type": "deny", "provision": [
            {"type": "permit", "actor": actor("Practitioner/x")},
            {"type": "deny", "actor": actor("Practitioner/x"),
             "securityLabel": [{"system": LABELS, "code": "HIV"}]}
        ]}));
        let x = circle(&["Practitioner/x"], false, vec![c.clone()]);
        assert!(sees(&x, &[]));
        assert!(!sees(&x, &["HIV"]));
        // The general practitioner is denied by the root.
        assert!(!sees(
            &circle(&["Practitioner/gp"], true, vec![c.clone()]),
            &[]
        ));
        // A second Consent's deny overrides the first one's permit.
        let other = consent(json!({"type": "permit", "provision": [
            {"type": "deny", "actor": actor("Practitioner/x")}]}));
        assert!(!sees(
            &circle(&["Practitioner/x"], false, vec![c, other]),
            &[]
        ));
    }

    #[test]
    fn classes_actions_and_periods_limit_where_a_provision_applies() {
        let c = consent(json!({"type": "permit", "provision": [
            {"type": "permit", "actor": actor("RelatedPerson/r"),
             "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]},
            {"type": "permit", "actor": actor("Practitioner/late"),
             "period": {"start": "2027-01-01"}},
            {"type": "permit", "actor": actor("Practitioner/fixer"),
             "action": [{"coding": [{"code": "correct"}]}]}
        ]}));
        assert!(!sees(
            &circle(&["RelatedPerson/r"], false, vec![c.clone()]),
            &[]
        ));
        assert!(!sees(
            &circle(&["Practitioner/late"], false, vec![c.clone()]),
            &[]
        ));
        let fixer = circle(&["Practitioner/fixer"], false, vec![c.clone()]);
        assert!(!sees(&fixer, &[]));
        let (id, rows) = obs(&[]);
        assert!(fixer.holds(Ops::UPDATE, "Observation", &id, &rows));
        let r = circle(&["RelatedPerson/r"], false, vec![c]);
        let cond = r.cond(Ops::READ, "Condition").unwrap();
        assert!(matches!(cond, Cond::RefersTo { .. }), "{cond:?}");
    }

    #[test]
    fn an_organisation_actor_covers_who_works_for_it() {
        let c = consent(json!({"type": "permit", "provision": [
            {"type": "permit", "actor": actor("Organization/clinic")}]}));
        assert!(sees(
            &circle(
                &[
                    "Practitioner/y",
                    "PractitionerRole/r",
                    "Organization/clinic"
                ],
                false,
                vec![c.clone()]
            ),
            &[]
        ));
        assert!(!sees(&circle(&["Practitioner/y"], false, vec![c]), &[]));
    }

    #[test]
    fn a_consent_narrows_an_insurer_never_widens_it() {
        let rules = crate::policy::insurer::InsurerPolicy::built_in()
            .role("claims")
            .cloned()
            .unwrap();
        let mut f = Facts {
            identity: ["Organization/acme".to_string()].into(),
            ..Facts::default()
        };
        f.covered.insert("p".into());
        f.consents.insert(
            "p".into(),
            vec![consent(json!({"type": "permit", "provision": [
                {"type": "permit", "actor": actor("Organization/acme"),
                 "class": [{"code": "Observation"}]},
                {"type": "deny", "actor": actor("Organization/acme"),
                 "securityLabel": [{"system": LABELS, "code": "HIV"}]}]}))],
        );
        let c = Circle::new(f, NOW.into(), Some(Arc::new(rules)));
        assert!(!c.reaches_type("Observation"));
        assert!(!sees(&c, &[]));
        let claim = |labels: &[&str]| {
            let sec: Vec<Value> = labels
                .iter()
                .map(|l| json!({"system": LABELS, "code": l}))
                .collect();
            let r = json!({"resourceType": "Claim", "id": "k", "meta": {"security": sec},
                "patient": {"reference": "Patient/p"}});
            index::extract("Claim", &r)
        };
        assert!(c.holds(Ops::READ, "Claim", "k", &claim(&[])));
        assert!(!c.holds(Ops::READ, "Claim", "k", &claim(&["HIV"])));
    }

    #[test]
    fn a_practitioner_registers_only_patients_they_treat() {
        let c = circle(&["Practitioner/x", "Organization/o"], false, vec![]);
        let patient = |gp: &str| {
            let r = json!({"resourceType": "Patient", "id": "new",
                "generalPractitioner": [{"reference": gp}]});
            index::extract("Patient", &r)
        };
        assert!(c.holds(Ops::CREATE, "Patient", "new", &patient("Practitioner/x")));
        assert!(c.holds(Ops::CREATE, "Patient", "new", &patient("Organization/o")));
        assert!(!c.holds(Ops::CREATE, "Patient", "new", &patient("Practitioner/y")));
        assert!(!c.holds(Ops::READ, "Patient", "new", &patient("Practitioner/x")));
    }

    #[test]
    fn codes_and_data_periods_select_resources() {
        let c = consent(json!({"type": "permit", "provision": [
            {"type": "permit", "actor": actor("Practitioner/x"),
             "code": [{"coding": [{"system": "http://loinc.org", "code": "718-7"}]}]},
            {"type": "permit", "actor": actor("Practitioner/y"),
             "dataPeriod": {"start": "2020-01-01", "end": "2020-12-31"}}
        ]}));
        let obs = |code: &str, date: &str| {
            let r = json!({"resourceType": "Observation", "id": "o", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "effectiveDateTime": date, "subject": {"reference": "Patient/p"}});
            index::extract("Observation", &r)
        };
        let x = circle(&["Practitioner/x"], false, vec![c.clone()]);
        assert!(x.holds(Ops::READ, "Observation", "o", &obs("718-7", "2019-05-05")));
        assert!(!x.holds(Ops::READ, "Observation", "o", &obs("2345-7", "2019-05-05")));
        let y = circle(&["Practitioner/y"], false, vec![c]);
        assert!(y.holds(Ops::READ, "Observation", "o", &obs("2345-7", "2020-05-05")));
        assert!(!y.holds(Ops::READ, "Observation", "o", &obs("2345-7", "2021-05-05")));
        // A type without a clinical date matches no data period.
        assert!(!y.holds(Ops::READ, "Patient", "p", &Rows::default()));
    }

    #[test]
    fn one_set_of_facts_decides_by_each_requests_instant() {
        // Kept across requests: the grant and the Consent's period are
        // decided by the instant the circle is made for.
        let mut f = Facts {
            identity: ["Practitioner/x".to_string()].into(),
            default: Some(ConsentDefault::PermitTreatment),
            ..Facts::default()
        };
        f.emergency
            .insert("p".into(), "2026-06-01T13:00:00.000Z".into());
        let f = Arc::new(f);
        let at = |f: &Arc<Facts>, now: &str| sees(&Circle::new(f.clone(), now.into(), None), &[]);
        assert!(at(&f, NOW));
        assert!(!at(&f, "2026-06-01T13:00:00.000Z"));
        let mut g = Facts::clone(&f);
        g.emergency.clear();
        g.consents.insert(
            "p".into(),
            vec![consent(
                json!({"type": "permit", "actor": actor("Practitioner/x"),
                "period": {"start": "2026-06-01T12:30:00Z", "end": "2026-06-02"}}),
            )],
        );
        let g = Arc::new(g);
        assert!(!at(&g, NOW));
        assert!(at(&g, "2026-06-01T12:31:00.000Z"));
        assert!(at(&g, "2026-06-02T23:59:59.000Z"));
        assert!(!at(&g, "2026-06-03T00:00:00.000Z"));
    }

    #[test]
    fn a_condition_compiled_once_serves_every_resource_of_its_type() {
        let c = circle(
            &["Practitioner/gp"],
            true,
            vec![consent(json!({"type": "deny",
            "securityLabel": [{"system": LABELS, "code": "HIV"}]}))],
        );
        assert!(sees(&c, &[]));
        assert!(!sees(&c, &["HIV"]));
        assert!(sees(&c, &["PSY"]));
        assert_eq!(c.memo.0.lock().unwrap().len(), 1);
        assert!(!c
            .clone()
            .holds(Ops::READ, "Observation", "o", &obs(&["HIV"]).1));
    }

    #[test]
    fn inactive_or_other_scope_consents_do_not_count() {
        let mut c = consent(json!({"type": "permit"}));
        assert!(in_force(&c, NOW));
        c["status"] = json!("inactive");
        assert!(!in_force(&c, NOW));
        let mut c = consent(json!({"type": "permit", "period": {"end": "2026-05-31"}}));
        assert!(!in_force(&c, NOW));
        c["provision"]["period"]["end"] = json!("2026-06-01");
        assert!(in_force(&c, NOW));
        c["scope"]["coding"][0]["code"] = json!("research");
        assert!(!in_force(&c, NOW));
    }
}
