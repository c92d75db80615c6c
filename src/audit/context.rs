//! What the request being served has touched, and for whom.
//!
//! The audit middleware runs each request inside [`scope`] with a fresh
//! [`Context`]; the authentication step names the caller ([`identify`]);
//! the caller-scoped store notes every resource it hands out ([`read`]) or
//! writes ([`wrote`]), with the patients it belongs to. When the handler is
//! done, the middleware turns the context into AuditEvents (one per patient
//! touched); writes are turned into events inside their own transaction
//! ([`take_written`], called when the write commits). Outside a scope (the
//! command-line jobs, audit switched off) every call here does nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use super::event::{Action, Event, EventType, MAX_ORGANIZATIONS};

tokio::task_local! {
    static CONTEXT: Arc<Context>;
}

/// One request's audit context.
#[derive(Debug, Default)]
pub struct Context {
    inner: Mutex<Inner>,
}

/// The caller and request, as far as known.
#[derive(Debug, Default, Clone)]
pub struct Caller {
    /// `fhirUser` (or the account at sign-in).
    pub user: Option<String>,
    pub client: Option<String>,
    /// The token's patient context.
    pub patient: Option<String>,
    pub address: Option<String>,
    pub purpose: Vec<String>,
    pub request_id: Option<String>,
    /// The server's base URL.
    pub observer: String,
    /// The Organizations (ids) the caller acts for: an insurer's, from its
    /// token, or a practitioner's, from their roles ([`acting_for`]).
    pub organizations: Vec<String>,
}

/// A resource written in this request, not yet recorded.
#[derive(Debug, Clone)]
pub struct Written {
    pub action: Action,
    pub interaction: &'static str,
    pub reference: String,
    pub patients: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    caller: Caller,
    /// Patient id ("" for none) → resources read of that patient.
    read: BTreeMap<String, BTreeSet<String>>,
    written: Vec<Written>,
    /// Writes already recorded inside their transaction.
    done: Vec<Written>,
    /// Events of what the writes mean (a consent change, an amendment),
    /// recorded with them in their transaction.
    extra: Vec<(EventType, Action, Vec<String>, String)>,
}

impl Context {
    pub fn new(caller: Caller) -> Arc<Context> {
        Arc::new(Context {
            inner: Mutex::new(Inner {
                caller,
                ..Inner::default()
            }),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn caller(&self) -> Caller {
        self.with(|i| i.caller.clone())
    }

    /// Patients (ids) of what was read, with the resources read of each;
    /// the key "" holds what belongs to no patient.
    pub fn read_by_patient(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.with(|i| i.read.clone())
    }

    /// How many writes were recorded inside their transactions.
    pub fn recorded_writes(&self) -> usize {
        self.with(|i| i.done.len())
    }

    /// Every write noted, recorded or not.
    pub fn all_writes(&self) -> Vec<Written> {
        self.with(|i| i.done.iter().chain(i.written.iter()).cloned().collect())
    }

    /// Writes noted but not recorded (their transaction did not commit).
    pub fn unrecorded_writes(&self) -> Vec<Written> {
        self.with(|i| i.written.clone())
    }
}

/// Runs `fut` with `ctx` as the current request's audit context.
pub async fn scope<F: std::future::Future>(ctx: Arc<Context>, fut: F) -> F::Output {
    CONTEXT.scope(ctx, fut).await
}

/// `fut` with the current request's audit context, for work the request
/// hands to another task (which would otherwise run outside it, and write
/// without its audit).
pub fn carry<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    let ctx = current();
    async move {
        match ctx {
            Some(c) => CONTEXT.scope(c, fut).await,
            None => fut.await,
        }
    }
}

fn current() -> Option<Arc<Context>> {
    CONTEXT.try_with(Arc::clone).ok()
}

/// Whether the current task is serving an audited request.
pub fn active() -> bool {
    current().is_some()
}

/// Names the caller (from the checked token): its user, client, patient
/// context and the organisation its client acts for.
pub fn identify(
    user: Option<&str>,
    client: &str,
    patient: Option<&str>,
    organization: Option<&str>,
) {
    if let Some(c) = current() {
        c.with(|i| {
            i.caller.user = user.map(str::to_string);
            i.caller.client = Some(client.to_string());
            i.caller.patient = patient.map(str::to_string);
            i.caller.organizations = organization.map(str::to_string).into_iter().collect();
        });
    }
}

/// Names the Organizations (ids) the caller acts for, as their circle of
/// trust found them (a practitioner's roles), unless the token named one.
/// At most [`MAX_ORGANIZATIONS`] are kept, in the order given.
pub fn acting_for<'a>(organizations: impl IntoIterator<Item = &'a str>) {
    if let Some(c) = current() {
        c.with(|i| {
            if i.caller.organizations.is_empty() {
                i.caller.organizations = organizations
                    .into_iter()
                    .take(MAX_ORGANIZATIONS)
                    .map(str::to_string)
                    .collect();
            }
        });
    }
}

/// Adds a purpose of use (a v3-ActReason code such as `BTG`) to every event
/// of the current request: the hook for break-the-glass.
pub fn set_purpose(code: &str) {
    if let Some(c) = current() {
        c.with(|i| {
            if !i.caller.purpose.iter().any(|p| p == code) {
                i.caller.purpose.push(code.to_string());
            }
        });
    }
}

/// An event of the current request's caller (who, client, address,
/// purposes), or `None` outside an audited request: the way to record an
/// event of one's own during a request, e.g.
/// `log.record(vec![context::event(EventType::consent_change(), Action::Update)?.patient(Some(id))])`.
pub fn event(kind: EventType, action: Action) -> Option<Event> {
    current().map(|c| c.caller().event(kind, action))
}

/// Notes a resource handed to the caller (`body`: its stored JSON).
pub fn read(rtype: &str, id: &str, body: Option<&str>) {
    let Some(c) = current() else { return };
    let reference = format!("{rtype}/{id}");
    let patients = patients_of(rtype, id, body);
    c.with(|i| {
        if patients.is_empty() {
            i.read.entry(String::new()).or_default().insert(reference);
        } else {
            for p in patients {
                i.read.entry(p).or_default().insert(reference.clone());
            }
        }
    });
}

/// Notes a resource written (`body`: its new content, or for a deletion
/// the content it had).
pub fn wrote(action: Action, interaction: &'static str, rtype: &str, id: &str, body: Option<&str>) {
    let Some(c) = current() else { return };
    let w = Written {
        action,
        interaction,
        reference: format!("{rtype}/{id}"),
        patients: patients_of(rtype, id, body),
    };
    c.with(|i| i.written.push(w));
}

/// Notes an event that gives a write of this request its meaning (an
/// amendment proposed or decided): recorded with the writes, in their
/// transaction, one per patient.
pub fn note(kind: EventType, action: Action, patients: Vec<String>, data: String) {
    let Some(c) = current() else { return };
    c.with(|i| i.extra.push((kind, action, patients, data)));
}

/// The events of the writes noted and not yet recorded, for recording in
/// the transaction that is about to commit; they count as recorded from
/// now on (if the commit fails, the request fails and the middleware
/// records the failure).
pub fn take_written() -> Vec<Event> {
    let Some(c) = current() else {
        return Vec::new();
    };
    c.with(|i| {
        let written = std::mem::take(&mut i.written);
        i.done.extend(written.iter().cloned());
        let mut out = Vec::new();
        let mut extra = std::mem::take(&mut i.extra);
        // Every change of a Consent is also a consent change.
        for w in written
            .iter()
            .filter(|w| w.reference.starts_with("Consent/"))
        {
            extra.push((
                EventType::consent_change(),
                w.action,
                w.patients.clone(),
                w.reference.clone(),
            ));
        }
        for (kind, action, patients, data) in extra {
            let patients: Vec<Option<String>> = if patients.is_empty() {
                vec![None]
            } else {
                patients.into_iter().map(Some).collect()
            };
            for p in patients {
                out.push(i.caller.event(kind, action).patient(p).data(data.clone()));
            }
        }
        for w in written {
            let patients: Vec<Option<String>> = if w.patients.is_empty() {
                vec![None]
            } else {
                w.patients.iter().cloned().map(Some).collect()
            };
            for p in patients {
                out.push(
                    i.caller
                        .event(EventType::rest(w.interaction), w.action)
                        .patient(p)
                        .data(w.reference.clone()),
                );
            }
        }
        out
    })
}

impl Caller {
    /// An event of this caller.
    pub fn event(&self, kind: EventType, action: Action) -> Event {
        let mut e = Event::new(kind, action)
            .user(self.user.clone())
            .client(self.client.clone())
            .organizations(self.organizations.clone());
        e.address = self.address.clone();
        e.purpose = self.purpose.clone();
        e.request_id = self.request_id.clone();
        e.observer = self.observer.clone();
        e
    }
}

/// The patients (ids) a resource belongs to: a Patient itself, or the
/// patients its references name (`"reference":"Patient/…"`), found in the
/// stored JSON without parsing it.
pub fn patients_of(rtype: &str, id: &str, body: Option<&str>) -> Vec<String> {
    if rtype == "Patient" {
        return vec![id.to_string()];
    }
    let Some(body) = body else {
        return Vec::new();
    };
    const NEEDLE: &str = "\"reference\":\"Patient/";
    let mut out: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(NEEDLE) {
        rest = &rest[at + NEEDLE.len()..];
        let end = rest.find(['"', '/']).unwrap_or(rest.len());
        let pid = &rest[..end];
        if !pid.is_empty()
            && pid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !out.iter().any(|p| p == pid)
        {
            out.push(pid.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patients_are_found_by_their_references() {
        let body = r#"{"resourceType":"Observation","subject":{"reference":"Patient/a"},"performer":[{"reference":"Patient/b"},{"reference":"Practitioner/x"}],"note":{"reference":"Patient/a"}}"#;
        assert_eq!(patients_of("Observation", "o", Some(body)), vec!["a", "b"]);
        assert_eq!(patients_of("Patient", "p", None), vec!["p"]);
        assert!(patients_of("Observation", "o", None).is_empty());
    }
}
