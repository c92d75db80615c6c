//! SMART scopes (App Launch 2.x, scopes-and-launch-context): parsing of v1
//! (`patient/Observation.read`) and v2 (`patient/Observation.rs`, with
//! granular `?param=value` filters) resource scopes and the launch/identity
//! scopes, and narrowing a request to what a client and a user may have.
//!
//! Parsing is strict: an unknown or malformed scope is an error naming it,
//! never a silent widening.

use std::fmt;

use crate::fhir::types::is_resource_type;

/// A scope string that is not a valid SMART scope (the reason says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidScope(pub String);

/// The five v2 permissions, in their canonical order `c r u d s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Ops(u8);

impl Ops {
    pub const CREATE: Ops = Ops(1);
    pub const READ: Ops = Ops(2);
    pub const UPDATE: Ops = Ops(4);
    pub const DELETE: Ops = Ops(8);
    pub const SEARCH: Ops = Ops(16);
    pub const ALL: Ops = Ops(31);
    const LETTERS: [(char, Ops); 5] = [
        ('c', Ops::CREATE),
        ('r', Ops::READ),
        ('u', Ops::UPDATE),
        ('d', Ops::DELETE),
        ('s', Ops::SEARCH),
    ];

    pub fn contains(self, other: Ops) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn intersect(self, other: Ops) -> Ops {
        Ops(self.0 & other.0)
    }
    pub fn union(self, other: Ops) -> Ops {
        Ops(self.0 | other.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `cruds` letters in canonical order; each at most once.
    fn parse_v2(s: &str) -> Option<Ops> {
        let mut ops = Ops(0);
        let mut next = 0;
        for ch in s.chars() {
            let pos = Ops::LETTERS[next..].iter().position(|(c, _)| *c == ch)?;
            ops = ops.union(Ops::LETTERS[next + pos].1);
            next += pos + 1;
        }
        (!ops.is_empty()).then_some(ops)
    }

    fn letters(self) -> String {
        Ops::LETTERS
            .iter()
            .filter(|(_, o)| self.contains(*o))
            .map(|(c, _)| *c)
            .collect()
    }
}

/// Whose data a resource scope covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// The patient in context (launch or selection).
    Patient,
    /// Whatever the logged-in user may see.
    User,
    /// A backend system, without a user.
    System,
}

impl Context {
    fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` for `*`.
    pub rtype: Option<String>,
    pub ops: Ops,
    /// Granular v2 filter: search parameters every permitted resource meets.
    pub filter: Vec<(String, String)>,
    /// Written in v1 syntax (`read`, `write`, `*`); kept to answer in kind.
    pub v1: bool,
}

impl ResourceScope {
    /// Whether this scope grants everything `other` asks for.
    pub fn covers(&self, other: &ResourceScope) -> bool {
        self.context == other.context
            && (self.rtype.is_none() || self.rtype == other.rtype)
            && self.ops.contains(other.ops)
            && (self.filter.is_empty() || self.filter == other.filter)
    }
}

impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.rtype.as_deref().unwrap_or("*");
        let ops = if self.v1 {
            match (
                self.ops.contains(Ops(Ops::READ.0 | Ops::SEARCH.0)),
                self.ops
                    .contains(Ops(Ops::CREATE.0 | Ops::UPDATE.0 | Ops::DELETE.0)),
            ) {
                (true, true) => "*".to_string(),
                (true, false) => "read".to_string(),
                _ => "write".to_string(),
            }
        } else {
            self.ops.letters()
        };
        write!(f, "{}/{}.{}", self.context.as_str(), t, ops)?;
        if !self.filter.is_empty() {
            let q: Vec<String> = self
                .filter
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "?{}", q.join("&"))?;
        }
        Ok(())
    }
}

/// One scope of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Resource(ResourceScope),
    OpenId,
    FhirUser,
    /// v1 `profile`, kept for old clients.
    Profile,
    /// EHR launch (`launch`).
    Launch,
    /// Standalone launch asking for a patient / encounter context.
    LaunchPatient,
    LaunchEncounter,
    OfflineAccess,
    OnlineAccess,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Resource(r) => r.fmt(f),
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::Profile => f.write_str("profile"),
            Scope::Launch => f.write_str("launch"),
            Scope::LaunchPatient => f.write_str("launch/patient"),
            Scope::LaunchEncounter => f.write_str("launch/encounter"),
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::OnlineAccess => f.write_str("online_access"),
        }
    }
}

/// Parses one scope token.
pub fn parse_scope(s: &str) -> Result<Scope, InvalidScope> {
    let bad = |why: &str| InvalidScope(format!("'{s}': {why}"));
    Ok(match s {
        "openid" => Scope::OpenId,
        "fhirUser" => Scope::FhirUser,
        "profile" => Scope::Profile,
        "launch" => Scope::Launch,
        "launch/patient" => Scope::LaunchPatient,
        "launch/encounter" => Scope::LaunchEncounter,
        "offline_access" => Scope::OfflineAccess,
        "online_access" => Scope::OnlineAccess,
        _ => {
            let (ctx, rest) = s.split_once('/').ok_or_else(|| bad("not a known scope"))?;
            let context = match ctx {
                "patient" => Context::Patient,
                "user" => Context::User,
                "system" => Context::System,
                _ => return Err(bad("context must be patient, user or system")),
            };
            let (rest, query) = match rest.split_once('?') {
                Some((r, q)) => (r, Some(q)),
                None => (rest, None),
            };
            let (t, ops) = rest
                .split_once('.')
                .ok_or_else(|| bad("expected Type.permissions"))?;
            let rtype = match t {
                "*" => None,
                t if is_resource_type(t) => Some(t.to_string()),
                _ => return Err(bad("unknown resource type")),
            };
            let (ops, v1) = match ops {
                "read" => (Ops(Ops::READ.0 | Ops::SEARCH.0), true),
                "write" => (Ops(Ops::CREATE.0 | Ops::UPDATE.0 | Ops::DELETE.0), true),
                "*" => (Ops::ALL, true),
                o => (
                    Ops::parse_v2(o).ok_or_else(|| {
                        bad("permissions must be read, write, * or a subset of cruds in that order")
                    })?,
                    false,
                ),
            };
            let mut filter = Vec::new();
            if let Some(q) = query {
                if v1 {
                    return Err(bad("a query is only allowed on v2 scopes"));
                }
                for pair in q.split('&') {
                    let (k, v) = pair
                        .split_once('=')
                        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                        .ok_or_else(|| bad("the query must be param=value pairs"))?;
                    filter.push((k.to_string(), v.to_string()));
                }
            }
            Scope::Resource(ResourceScope {
                context,
                rtype,
                ops,
                filter,
                v1,
            })
        }
    })
}

/// Parses a space-separated scope string; duplicates are dropped.
pub fn parse_scopes(s: &str) -> Result<Vec<Scope>, InvalidScope> {
    let mut out: Vec<Scope> = Vec::new();
    for part in s.split(' ').filter(|p| !p.is_empty()) {
        let sc = parse_scope(part)?;
        if !out.contains(&sc) {
            out.push(sc);
        }
    }
    Ok(out)
}

/// A scope string from parsed scopes.
pub fn join(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The part of `requested` that `allowed` covers. A resource scope that is
/// only partly covered is narrowed to the covered permissions.
pub fn narrow(requested: &[Scope], allowed: &[Scope]) -> Vec<Scope> {
    let mut out = Vec::new();
    for r in requested {
        match r {
            Scope::Resource(rs) => {
                let mut ops = Ops(0);
                for a in allowed {
                    if let Scope::Resource(a) = a {
                        let mut probe = rs.clone();
                        probe.ops = a.ops.intersect(rs.ops);
                        if !probe.ops.is_empty() && a.covers(&probe) {
                            ops = ops.union(probe.ops);
                        }
                    }
                }
                if !ops.is_empty() {
                    let mut n = rs.clone();
                    n.ops = ops;
                    if ops != rs.ops {
                        n.v1 = false;
                    }
                    out.push(Scope::Resource(n));
                }
            }
            other => {
                if allowed.contains(other) {
                    out.push(other.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(s: &str) -> ResourceScope {
        match parse_scope(s).unwrap() {
            Scope::Resource(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_and_v2_resource_scopes() {
        let r = rs("patient/Observation.read");
        assert_eq!(r.context, Context::Patient);
        assert_eq!(r.rtype.as_deref(), Some("Observation"));
        assert!(r.ops.contains(Ops::READ) && r.ops.contains(Ops::SEARCH));
        assert!(!r.ops.contains(Ops::CREATE));
        assert_eq!(rs("user/*.write").ops, Ops(1 | 4 | 8));
        assert_eq!(rs("system/*.*").ops, Ops::ALL);
        assert_eq!(rs("user/Patient.cruds").ops, Ops::ALL);
        assert_eq!(rs("patient/Observation.rs").ops, Ops(2 | 16));
        assert_eq!(
            rs("patient/Observation.rs").to_string(),
            "patient/Observation.rs"
        );
        assert_eq!(
            rs("patient/Observation.read").to_string(),
            "patient/Observation.read"
        );
        let g = rs("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory");
        assert_eq!(
            g.filter,
            vec![(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_string()
            )]
        );
        assert!(g.to_string().ends_with(
            "?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
        ));
    }

    #[test]
    fn malformed_scopes_are_refused() {
        for bad in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.x",
            "patient/Observation.",
            "patient/Nope.rs",
            "doctor/Observation.rs",
            "patient/Observation",
            "patient/Observation.read?code=1",
            "patient/Observation.rs?code",
            "everything",
        ] {
            assert!(parse_scope(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn narrowing_keeps_only_what_is_allowed() {
        let allowed = parse_scopes("patient/*.rs openid fhirUser launch/patient").unwrap();
        let asked = parse_scopes(
            "patient/Observation.cruds patient/Patient.read user/Patient.rs openid offline_access launch/patient",
        )
        .unwrap();
        let got = join(&narrow(&asked, &allowed));
        assert_eq!(
            got,
            "patient/Observation.rs patient/Patient.read openid launch/patient"
        );
        // A granular request fits under an unfiltered grant, not the reverse.
        let allowed = parse_scopes("patient/Observation.rs?category=laboratory").unwrap();
        assert!(narrow(&parse_scopes("patient/Observation.rs").unwrap(), &allowed).is_empty());
        let asked = parse_scopes("patient/Observation.rs?category=laboratory").unwrap();
        assert_eq!(narrow(&asked, &allowed), asked);
    }
}
