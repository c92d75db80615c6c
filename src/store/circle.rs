//! Loading a caller's circle of trust: who they are (their roles,
//! organisations and care teams), whom they treat, which Consents name
//! them or govern their patients, and their break-the-glass grants —
//! read afresh for every request, so a change counts on the next one.
//!
//! The decisions are made in `policy::consent`; this is only the SQL.

use std::collections::BTreeSet;

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use super::{Store, StoreResult};
use crate::policy::consent::{in_force, Facts};
use crate::policy::role::{Practitioner, Role};

/// Most references naming one caller, and most patients in one circle
/// (beyond that, the rest is left out and a warning is logged).
const MAX_IDENTITY: usize = 1_000;
const MAX_PATIENTS: usize = 20_000;
const CHUNK: usize = 500;

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
    /// `(a.target_type = … AND a.target_id IN (…)) OR …` for references
    /// `Type/id`.
    fn targets(&mut self, alias: &str, refs: &BTreeSet<String>) -> String {
        let mut by_type: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for r in refs {
            if let Some((t, id)) = r.split_once('/') {
                by_type.entry(t).or_default().push(id);
            }
        }
        if by_type.is_empty() {
            return "1 = 0".into();
        }
        let parts: Vec<String> = by_type
            .into_iter()
            .map(|(t, ids)| {
                let t = self.bind(t);
                let ids: Vec<String> = ids.into_iter().map(|i| self.bind(i)).collect();
                format!(
                    "({alias}.target_type = {t} AND {alias}.target_id IN ({}))",
                    ids.join(", ")
                )
            })
            .collect();
        format!("({})", parts.join(" OR "))
    }
    fn list(&mut self, vals: &[&str]) -> String {
        let v: Vec<String> = vals.iter().map(|x| self.bind(x)).collect();
        v.join(", ")
    }
    async fn strings(self, conn: &mut AnyConnection) -> StoreResult<Vec<String>> {
        let mut q = sqlx::query(&self.text);
        for b in &self.binds {
            q = q.bind(b.as_str());
        }
        let rows = q.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>(0)?))
            .collect()
    }
}

/// The facts of `role`'s circle of trust, now.
pub async fn facts(store: &Store, role: &Role, now_unix: i64) -> StoreResult<Facts> {
    let mut conn = store.reader().await?;
    facts_on(&mut conn, role, now_unix).await
}

pub(super) async fn facts_on(
    conn: &mut AnyConnection,
    role: &Role,
    now_unix: i64,
) -> StoreResult<Facts> {
    let mut f = Facts {
        now: crate::fhir::format_instant(
            chrono::DateTime::from_timestamp(now_unix, 0).unwrap_or_default(),
        ),
        ..Facts::default()
    };
    match role {
        Role::Practitioner(p) => {
            let (practitioner, roles) = match p {
                Practitioner::Id(x) => {
                    let mut q = Sql::new("");
                    let x_ = q.bind(x);
                    q.text = format!(
                        "SELECT id FROM idx_reference WHERE rtype = 'PractitionerRole' \
                         AND param = 'practitioner' AND target_type = 'Practitioner' AND target_id = {x_}"
                    );
                    (Some(x.clone()), q.strings(conn).await?)
                }
                Practitioner::Role(r) => {
                    let mut q = Sql::new("");
                    let r_ = q.bind(r);
                    q.text = format!(
                        "SELECT target_id FROM idx_reference WHERE rtype = 'PractitionerRole' \
                         AND id = {r_} AND param = 'practitioner' AND target_type = 'Practitioner'"
                    );
                    (q.strings(conn).await?.pop(), vec![r.clone()])
                }
            };
            if let Some(x) = &practitioner {
                f.identity.insert(format!("Practitioner/{x}"));
            }
            for r in roles.iter().take(MAX_IDENTITY) {
                f.identity.insert(format!("PractitionerRole/{r}"));
            }
            if !roles.is_empty() {
                let mut q = Sql::new("");
                let ids: Vec<&str> = roles
                    .iter()
                    .take(MAX_IDENTITY)
                    .map(String::as_str)
                    .collect();
                let list = q.list(&ids);
                q.text = format!(
                    "SELECT DISTINCT target_id FROM idx_reference WHERE rtype = 'PractitionerRole' \
                     AND param = 'organization' AND target_type = 'Organization' AND id IN ({list})"
                );
                for o in q.strings(conn).await? {
                    f.identity.insert(format!("Organization/{o}"));
                }
            }
            // General practitioner: the practitioner, a role, or an
            // organisation they work for.
            let mut q = Sql::new("");
            let t = q.targets("a", &f.identity);
            q.text = format!(
                "SELECT DISTINCT a.id FROM idx_reference a WHERE a.rtype = 'Patient' \
                 AND a.param = 'general-practitioner' AND {t}"
            );
            f.treatment.extend(q.strings(conn).await?);
            // Care teams they (or their roles or organisations) are part of,
            // unless the team is no longer active.
            let mut q = Sql::new("");
            let t = q.targets("a", &f.identity);
            q.text = format!(
                "SELECT DISTINCT a.id FROM idx_reference a WHERE a.rtype = 'CareTeam' \
                 AND a.param = 'participant' AND {t} AND NOT EXISTS (SELECT 1 FROM idx_token s \
                 WHERE s.rtype = 'CareTeam' AND s.id = a.id AND s.param = 'status' \
                 AND s.code IN ('inactive', 'entered-in-error'))"
            );
            let teams = q.strings(conn).await?;
            if !teams.is_empty() {
                let mut q = Sql::new("");
                let ids: Vec<&str> = teams
                    .iter()
                    .take(MAX_IDENTITY)
                    .map(String::as_str)
                    .collect();
                let list = q.list(&ids);
                q.text = format!(
                    "SELECT DISTINCT target_id FROM idx_reference WHERE rtype = 'CareTeam' \
                     AND param = 'subject' AND target_type = 'Patient' AND id IN ({list})"
                );
                f.treatment.extend(q.strings(conn).await?);
                for c in ids {
                    f.identity.insert(format!("CareTeam/{c}"));
                }
            }
            let actor = match p {
                Practitioner::Id(x) => format!("Practitioner/{x}"),
                Practitioner::Role(r) => format!("PractitionerRole/{r}"),
            };
            f.emergency = emergency(conn, &actor, now_unix).await?;
            if let Some(x) = &practitioner {
                if matches!(p, Practitioner::Role(_)) {
                    f.emergency
                        .extend(emergency(conn, &format!("Practitioner/{x}"), now_unix).await?);
                }
            }
        }
        Role::RelatedPerson(id) => {
            f.identity.insert(format!("RelatedPerson/{id}"));
        }
        Role::Insurer {
            organization: o, ..
        } => {
            f.identity.insert(format!("Organization/{o}"));
            let mut q = Sql::new("");
            let o_ = q.bind(o);
            q.text = format!(
                "SELECT DISTINCT b.target_id FROM idx_reference p JOIN idx_reference b \
                 ON b.rtype = 'Coverage' AND b.id = p.id AND b.param = 'beneficiary' \
                 AND b.target_type = 'Patient' \
                 WHERE p.rtype = 'Coverage' AND p.param = 'payor' \
                 AND p.target_type = 'Organization' AND p.target_id = {o_}"
            );
            f.covered.extend(q.strings(conn).await?);
        }
        _ => return Ok(f),
    }
    // Patients whose Consents name the caller (at any provision level).
    let mut q = Sql::new("");
    let t = q.targets("a", &f.identity);
    q.text = format!(
        "SELECT DISTINCT p.target_id FROM idx_reference a JOIN idx_reference p \
         ON p.rtype = 'Consent' AND p.id = a.id AND p.param = 'patient' AND p.target_type = 'Patient' \
         WHERE a.rtype = 'Consent' AND a.param = 'actor' AND {t}"
    );
    let named = q.strings(conn).await?;
    // Every Consent of every patient in the circle: a deny without actor
    // counts for everyone.
    let mut patients: BTreeSet<String> = named.into_iter().collect();
    patients.extend(f.treatment.iter().cloned());
    patients.extend(f.covered.iter().cloned());
    patients.extend(f.emergency.iter().cloned());
    if patients.len() > MAX_PATIENTS {
        tracing::warn!(
            patients = patients.len(),
            "the circle of trust of one caller is larger than {MAX_PATIENTS} patients; the rest is left out"
        );
    }
    let all: Vec<&str> = patients
        .iter()
        .take(MAX_PATIENTS)
        .map(String::as_str)
        .collect();
    for chunk in all.chunks(CHUNK) {
        let mut q = Sql::new("");
        let list = q.list(chunk);
        let sql = format!(
            "SELECT p.target_id, r.body FROM idx_reference p JOIN resource r \
             ON r.rtype = 'Consent' AND r.id = p.id \
             WHERE p.rtype = 'Consent' AND p.param = 'patient' AND p.target_type = 'Patient' \
             AND p.target_id IN ({list}) AND r.deleted = 0"
        );
        let mut query = sqlx::query(&sql);
        for b in &q.binds {
            query = query.bind(b.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let patient: String = row.try_get(0)?;
            let body: Option<String> = row.try_get(1)?;
            let Some(Ok(consent)) = body.as_deref().map(serde_json::from_str::<Value>) else {
                continue;
            };
            if in_force(&consent, &f.now) {
                f.consents.entry(patient).or_default().push(consent);
            }
        }
    }
    Ok(f)
}

async fn emergency(
    conn: &mut AnyConnection,
    actor: &str,
    now_unix: i64,
) -> StoreResult<BTreeSet<String>> {
    let rows = sqlx::query(
        "SELECT DISTINCT patient FROM emergency_access WHERE actor = $1 AND expires_at > $2",
    )
    .bind(actor)
    .bind(now_unix)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| Ok(r.try_get::<String, _>(0)?))
        .collect()
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
