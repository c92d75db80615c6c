//! Loading a caller's circle of trust: who they are (their roles,
//! organisations and care teams), whom they treat, which Consents name
//! them or govern their patients, and their break-the-glass grants.
//!
//! A change counts on the next request: every transaction that writes a
//! resource of a type the circle is read from ([`CIRCLE_TYPES`]) or a
//! break-the-glass grant raises the database's circle generation before it
//! commits, and a circle is kept ([`Cache`]) only while the generation read
//! at the start of the request is the one it was loaded under. What depends
//! on the time (a Consent's period, a grant's expiry) is decided per
//! request, so a kept circle never outlives them.
//!
//! The decisions are made in `policy::consent`; this is only the SQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use super::{Store, StoreResult};
use crate::policy::consent::{ConsentDefault, Facts};
use crate::policy::role::{Practitioner, Role};

/// The resource types the circle statement below reads: a write of any of
/// them raises the generation.
pub const CIRCLE_TYPES: [&str; 5] = [
    "CareTeam",
    "Consent",
    "Coverage",
    "Patient",
    "PractitionerRole",
];

/// Whether writing a resource of `rtype` can change someone's circle.
pub fn reads_type(rtype: &str) -> bool {
    CIRCLE_TYPES.contains(&rtype)
}

/// Raises the circle generation, inside the writing transaction.
pub(super) async fn raise_generation(conn: &mut AnyConnection) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO circle_generation (id, gen) VALUES (1, 1) \
         ON CONFLICT (id) DO UPDATE SET gen = circle_generation.gen + 1",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Facts (identities, patients, grants, Consents) kept at most, over all
/// circles; past it the cache starts over, and a circle with more is not
/// kept at all (its caller's requests read it each time).
const CACHE_FACTS: usize = 50_000;

/// Callers' circles, loaded under one generation.
#[derive(Clone, Default)]
pub struct Cache(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    generation: i64,
    circles: HashMap<String, Arc<Facts>>,
    /// Facts in `circles`.
    facts: usize,
}

/// How many facts a circle holds.
fn size(f: &Facts) -> usize {
    f.identity.len()
        + f.treatment.len()
        + f.emergency.len()
        + f.covered.len()
        + f.consents.values().map(Vec::len).sum::<usize>()
}

impl Cache {
    fn get(&self, generation: i64, key: &str) -> Option<Arc<Facts>> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (kept.generation == generation)
            .then(|| kept.circles.get(key).cloned())
            .flatten()
    }

    /// Keeps `facts`, loaded after `generation` was read.
    fn put(&self, generation: i64, key: String, facts: Arc<Facts>) {
        let n = size(&facts);
        if n > CACHE_FACTS {
            return;
        }
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.generation != generation || kept.facts + n > CACHE_FACTS {
            kept.circles.clear();
            kept.facts = 0;
            kept.generation = generation;
        }
        if let Some(old) = kept.circles.insert(key, facts) {
            kept.facts -= size(&old);
        }
        kept.facts += n;
    }
}

/// Facts of one circle beyond which a warning is logged (every fact
/// counts: leaving a Consent out could leave out a deny).
const MAX_ROWS: usize = 50_000;

/// A statement with `$n` parameters, built up.
struct Sql {
    text: String,
    binds: Vec<String>,
}

impl Sql {
    fn new(text: &str) -> Sql {
        Sql {
            text: text.to_string(),
            binds: Vec::new(),
        }
    }
    fn bind(&mut self, v: &str) -> String {
        self.binds.push(v.to_string());
        format!("${}", self.binds.len())
    }
}

/// The facts of `role`'s circle of trust as the database holds them now
/// (kept from an earlier request while nothing they are read from changed).
pub async fn facts(
    store: &Store,
    role: &Role,
    default: ConsentDefault,
    now_unix: i64,
) -> StoreResult<Arc<Facts>> {
    let Some(key) = cache_key(role, default) else {
        return Ok(Arc::new(Facts {
            default: Some(default),
            ..Facts::default()
        }));
    };
    let mut conn = store.reader().await?;
    // Read before the facts: facts loaded after it are at least as new.
    let generation: i64 =
        sqlx::query("SELECT COALESCE((SELECT gen FROM circle_generation WHERE id = 1), 0)")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
    if let Some(f) = store.circles.get(generation, &key) {
        return Ok(f);
    }
    let mut f = load(&mut conn, role, now_unix).await?;
    f.default = Some(default);
    let f = Arc::new(f);
    store.circles.put(generation, key, f.clone());
    Ok(f)
}

/// What a circle is kept under: the caller as the statement reads them.
fn cache_key(role: &Role, default: ConsentDefault) -> Option<String> {
    let who = match role {
        Role::Practitioner(Practitioner::Id(x)) => format!("Practitioner/{x}"),
        Role::Practitioner(Practitioner::Role(r)) => format!("PractitionerRole/{r}"),
        Role::RelatedPerson(x) => format!("RelatedPerson/{x}"),
        Role::Insurer { organization, .. } => format!("Organization/{organization}"),
        _ => return None,
    };
    Some(format!("{default:?} {who}"))
}

/// Reads the facts: grants that expired before `now_unix` are left out.
async fn load(conn: &mut AnyConnection, role: &Role, now_unix: i64) -> StoreResult<Facts> {
    let mut f = Facts::default();
    // One statement: every fact of the circle in one round trip, as rows
    // `(kind, value, body)`.
    let mut q = Sql::new("");
    let empty = "SELECT CAST(NULL AS TEXT) WHERE 1 = 0";
    let (me, roles, covered) = match role {
        Role::Practitioner(Practitioner::Id(x)) => {
            let a = q.bind(x);
            let b = q.bind(x);
            (
                format!("SELECT 'Practitioner', CAST({a} AS TEXT)"),
                format!(
                    "SELECT id FROM idx_reference WHERE rtype = 'PractitionerRole' \
                     AND param = 'practitioner' AND target_type = 'Practitioner' \
                     AND target_id = CAST({b} AS TEXT)"
                ),
                empty.to_string(),
            )
        }
        Role::Practitioner(Practitioner::Role(r)) => {
            let a = q.bind(r);
            let b = q.bind(r);
            let c = q.bind(r);
            (
                format!(
                    "SELECT 'PractitionerRole', CAST({a} AS TEXT) UNION \
                     SELECT 'Practitioner', target_id FROM idx_reference \
                     WHERE rtype = 'PractitionerRole' AND id = CAST({b} AS TEXT) \
                     AND param = 'practitioner' AND target_type = 'Practitioner'"
                ),
                format!("SELECT CAST({c} AS TEXT)"),
                empty.to_string(),
            )
        }
        Role::RelatedPerson(x) => {
            let a = q.bind(x);
            (
                format!("SELECT 'RelatedPerson', CAST({a} AS TEXT)"),
                empty.to_string(),
                empty.to_string(),
            )
        }
        Role::Insurer { organization, .. } => {
            let a = q.bind(organization);
            let b = q.bind(organization);
            (
                format!("SELECT 'Organization', CAST({a} AS TEXT)"),
                empty.to_string(),
                format!(
                    "SELECT b.target_id FROM idx_reference p JOIN idx_reference b \
                     ON b.rtype = 'Coverage' AND b.id = p.id AND b.param = 'beneficiary' \
                     AND b.target_type = 'Patient' \
                     WHERE p.rtype = 'Coverage' AND p.param = 'payor' \
                     AND p.target_type = 'Organization' AND p.target_id = CAST({b} AS TEXT)"
                ),
            )
        }
        _ => return Ok(f),
    };
    let practitioner = matches!(role, Role::Practitioner(_));
    let now = q.bind(&now_unix.to_string());
    let (teams, treat, emerg) = if practitioner {
        (
            "SELECT DISTINCT a.id FROM idx_reference a JOIN base b \
             ON a.target_type = b.t AND a.target_id = b.i \
             WHERE a.rtype = 'CareTeam' AND a.param = 'participant' \
             AND NOT EXISTS (SELECT 1 FROM idx_token s WHERE s.rtype = 'CareTeam' \
             AND s.id = a.id AND s.param = 'status' AND s.code IN ('inactive', 'entered-in-error'))"
                .to_string(),
            "SELECT a.id FROM idx_reference a JOIN base b \
             ON a.target_type = b.t AND a.target_id = b.i \
             WHERE a.rtype = 'Patient' AND a.param = 'general-practitioner' \
             UNION SELECT target_id FROM idx_reference WHERE rtype = 'CareTeam' \
             AND param = 'subject' AND target_type = 'Patient' AND id IN (SELECT id FROM teams)"
                .to_string(),
            // Grants to the practitioner, or to the role they signed in as.
            format!(
                "SELECT patient, expires_at FROM emergency_access WHERE actor IN \
                 (SELECT t || '/' || i FROM me) AND expires_at > CAST({now} AS BIGINT)"
            ),
        )
    } else {
        (
            empty.to_string(),
            empty.to_string(),
            "SELECT CAST(NULL AS TEXT), CAST(NULL AS BIGINT) WHERE 1 = 0".to_string(),
        )
    };
    q.text = format!(
        "WITH me(t, i) AS ({me}), \
         roles(id) AS ({roles}), \
         base(t, i) AS (SELECT t, i FROM me \
           UNION SELECT 'PractitionerRole', id FROM roles \
           UNION SELECT 'Organization', target_id FROM idx_reference \
             WHERE rtype = 'PractitionerRole' AND param = 'organization' \
             AND target_type = 'Organization' AND id IN (SELECT id FROM roles)), \
         teams(id) AS ({teams}), \
         ident(t, i) AS (SELECT t, i FROM base UNION SELECT 'CareTeam', id FROM teams), \
         treat(id) AS ({treat}), \
         emerg(id, until) AS ({emerg}), \
         covered(id) AS ({covered}), \
         named(id) AS (SELECT p.target_id FROM idx_reference a JOIN ident b \
           ON a.target_type = b.t AND a.target_id = b.i \
           JOIN idx_reference p ON p.rtype = 'Consent' AND p.id = a.id \
           AND p.param = 'patient' AND p.target_type = 'Patient' \
           WHERE a.rtype = 'Consent' AND a.param = 'actor'), \
         pats(id) AS (SELECT id FROM named UNION SELECT id FROM treat \
           UNION SELECT id FROM emerg UNION SELECT id FROM covered) \
         SELECT 'identity' AS k, t || '/' || i AS v, CAST(NULL AS TEXT) AS body FROM ident \
         UNION ALL SELECT 'treatment', id, NULL FROM treat \
         UNION ALL SELECT 'emergency', id, CAST(until AS TEXT) FROM emerg \
         UNION ALL SELECT 'covered', id, NULL FROM covered \
         UNION ALL SELECT 'consent', p.target_id, r.body FROM idx_reference p \
           JOIN resource r ON r.rtype = 'Consent' AND r.id = p.id \
           WHERE p.rtype = 'Consent' AND p.param = 'patient' AND p.target_type = 'Patient' \
           AND r.deleted = 0 AND p.target_id IN (SELECT id FROM pats)"
    );
    let mut query = sqlx::query(&q.text);
    for b in &q.binds {
        query = query.bind(b.as_str());
    }
    let rows = query.fetch_all(&mut *conn).await?;
    if rows.len() > MAX_ROWS {
        tracing::warn!(
            rows = rows.len(),
            "one caller's circle of trust has more than {MAX_ROWS} facts"
        );
    }
    for row in rows {
        let kind: String = row.try_get(0)?;
        let value: Option<String> = row.try_get(1)?;
        let Some(value) = value else { continue };
        match kind.as_str() {
            "identity" => {
                f.identity.insert(value);
            }
            "treatment" => {
                f.treatment.insert(value);
            }
            "emergency" => {
                // Until when (the latest of the caller's grants).
                let until: Option<String> = row.try_get(2)?;
                let until = until.and_then(|u| u.parse::<i64>().ok()).unwrap_or(0);
                let until = crate::fhir::unix_instant(until);
                let e = f.emergency.entry(value).or_default();
                if until > *e {
                    *e = until;
                }
            }
            "covered" => {
                f.covered.insert(value);
            }
            _ => {
                let body: Option<String> = row.try_get(2)?;
                let Some(Ok(consent)) = body.as_deref().map(serde_json::from_str::<Value>) else {
                    continue;
                };
                // Whether it is in force (its period) is decided per request.
                f.consents.entry(value).or_default().push(consent);
            }
        }
    }
    Ok(f)
}

/// A break-the-glass grant, recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Emergency {
    pub id: String,
    pub actor: String,
    pub patient: String,
    pub reason: String,
    pub granted_at: i64,
    pub expires_at: i64,
}

/// Records a break-the-glass grant.
pub async fn grant_emergency(store: &Store, e: &Emergency) -> StoreResult<()> {
    let mut tx = store.begin().await?;
    sqlx::query(
        "INSERT INTO emergency_access (id, actor, patient, reason, granted_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&e.id)
    .bind(&e.actor)
    .bind(&e.patient)
    .bind(&e.reason)
    .bind(e.granted_at)
    .bind(e.expires_at)
    .execute(tx.conn())
    .await?;
    tx.circle_changed();
    tx.commit().await
}

/// The break-the-glass grants for one patient, newest first (for the
/// patient, and for `$access-preview`).
pub async fn emergencies_of(store: &Store, patient: &str) -> StoreResult<Vec<Emergency>> {
    let mut conn = store.reader().await?;
    let rows = sqlx::query(
        "SELECT id, actor, patient, reason, granted_at, expires_at FROM emergency_access \
         WHERE patient = $1 ORDER BY granted_at DESC LIMIT 1000",
    )
    .bind(patient)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Emergency {
                id: r.try_get(0)?,
                actor: r.try_get(1)?,
                patient: r.try_get(2)?,
                reason: r.try_get(3)?,
                granted_at: r.try_get(4)?,
                expires_at: r.try_get(5)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(patients: usize) -> Arc<Facts> {
        Arc::new(Facts {
            treatment: (0..patients).map(|i| format!("p{i}")).collect(),
            ..Facts::default()
        })
    }

    #[test]
    fn a_kept_circle_is_found_only_under_the_generation_it_was_loaded_under() {
        let c = Cache::default();
        c.put(3, "a".into(), facts(1));
        assert!(c.get(3, "a").is_some());
        assert!(c.get(4, "a").is_none());
        assert!(c.get(2, "a").is_none());
        // A newer generation starts over.
        c.put(4, "b".into(), facts(1));
        assert!(c.get(4, "a").is_none());
        assert!(c.get(4, "b").is_some());
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_facts() {
        let c = Cache::default();
        c.put(1, "huge".into(), facts(CACHE_FACTS + 1));
        assert!(c.get(1, "huge").is_none());
        c.put(1, "a".into(), facts(CACHE_FACTS / 2));
        c.put(1, "a".into(), facts(CACHE_FACTS / 2));
        assert!(c.get(1, "a").is_some(), "replacing counts once");
        c.put(1, "b".into(), facts(CACHE_FACTS / 2));
        assert!(c.get(1, "a").is_some() && c.get(1, "b").is_some());
        c.put(1, "c".into(), facts(1));
        assert!(c.get(1, "a").is_none() && c.get(1, "c").is_some());
        assert_eq!(c.0.lock().unwrap().facts, 1);
    }
}
