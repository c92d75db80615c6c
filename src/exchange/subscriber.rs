//! Subscribers: the organisations (hospitals, labs, radiology centres,
//! insurers, pharmacies) that exchange signed documents with ehrx. Each is a
//! FHIR `Organization` (plus an `Endpoint` when it has an address) and one or
//! more registered signing certificates.

use serde_json::{json, Value};

use super::keys::{self, Cert};
use crate::error::{Error, Result};
use crate::interaction;
use crate::policy::{Access, Maintenance};
use crate::store::{Store, Writer};

/// The kinds of subscriber.
pub const KINDS: &[&str] = &["hospital", "lab", "radiology", "insurer", "pharmacy"];

/// Identifier system of subscriber organisations.
pub const SUBSCRIBER_SYSTEM: &str = "urn:ehrx:exchange:subscriber";

/// `organization-type` code for a subscriber kind.
fn organization_type(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "hospital" => ("prov", "Healthcare Provider"),
        "lab" | "radiology" | "pharmacy" => ("prov", "Healthcare Provider"),
        "insurer" => ("ins", "Insurance Company"),
        _ => ("other", "Other"),
    }
}

/// Registers a subscriber: Organization, optional Endpoint and its first
/// signing certificate, in one transaction. Returns a JSON summary.
pub async fn add(
    store: &Store,
    name: &str,
    kind: &str,
    cert_pem: &[u8],
    endpoint: Option<&str>,
    require_mtls: bool,
) -> Result<Value> {
    if !KINDS.contains(&kind) {
        return Err(Error::invalid(format!(
            "unknown subscriber kind '{kind}': use one of {}",
            KINDS.join(", ")
        )));
    }
    let cert = Cert::parse(cert_pem)?;
    let (code, display) = organization_type(kind);
    let gate = store.gate(Access::maintenance(Maintenance::Subscribers));
    let mut tx = gate.begin().await?;
    let org_id = interaction::new_id();
    let mut org = json!({
        "resourceType": "Organization",
        "identifier": [{"system": SUBSCRIBER_SYSTEM, "value": org_id}],
        "active": true,
        "type": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": code, "display": display}],
            "text": kind
        }],
        "name": name,
    });
    let mut endpoint_id = None;
    if let Some(address) = endpoint {
        let ep = json!({
            "resourceType": "Endpoint",
            "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "direct-project"},
            "name": format!("{name} document exchange"),
            "managingOrganization": {"reference": format!("Organization/{org_id}")},
            "payloadType": [{"text": "signed XML documents (C-CDA R2.1, FHIR Bundle)"}],
            "payloadMimeType": ["application/xml"],
            "address": address,
        });
        let written = interaction::create(&mut tx, "Endpoint", ep, None).await?;
        org["endpoint"] = json!([{"reference": format!("Endpoint/{}", written.id)}]);
        endpoint_id = Some(written.id);
    }
    interaction::create_as(&mut tx, "Organization", &org_id, org).await?;
    keys::register(tx.own_tables(), &org_id, &cert).await?;
    keys::set_requires_mtls(tx.own_tables(), &org_id, require_mtls).await?;
    tx.commit().await.map_err(Error::from)?;
    Ok(json!({
        "organization": format!("Organization/{org_id}"),
        "endpoint": endpoint_id.map(|id| format!("Endpoint/{id}")),
        "requireMutualTls": require_mtls,
        "certificate": summary(&org_id, &cert),
    }))
}

fn summary(org_id: &str, cert: &Cert) -> Value {
    keys::Registered {
        organization_id: org_id.to_string(),
        cert: cert.clone(),
        revoked: None,
    }
    .summary()
}

/// Adds another signing certificate to a subscriber (the old ones stay
/// valid until they expire or are revoked).
pub async fn rotate_cert(store: &Store, organization: &str, cert_pem: &[u8]) -> Result<Value> {
    let org_id = organization.trim_start_matches("Organization/");
    let cert = Cert::parse(cert_pem)?;
    let gate = store.gate(Access::maintenance(Maintenance::Subscribers));
    let mut tx = gate.begin().await?;
    existing_organization(&mut tx, org_id).await?;
    keys::register(tx.own_tables(), org_id, &cert).await?;
    tx.commit().await.map_err(Error::from)?;
    Ok(summary(org_id, &cert))
}

/// Sets whether the subscriber must connect with mutual TLS.
pub async fn require_mtls(store: &Store, organization: &str, required: bool) -> Result<Value> {
    let org_id = organization.trim_start_matches("Organization/");
    let gate = store.gate(Access::maintenance(Maintenance::Subscribers));
    let mut tx = gate.begin().await?;
    existing_organization(&mut tx, org_id).await?;
    keys::set_requires_mtls(tx.own_tables(), org_id, required).await?;
    tx.commit().await.map_err(Error::from)?;
    Ok(json!({"organization": format!("Organization/{org_id}"), "requireMutualTls": required}))
}

/// Revokes a certificate by its SHA-256 fingerprint.
pub async fn revoke_cert(store: &Store, fingerprint: &str) -> Result<Value> {
    if keys::revoke(store, fingerprint).await? {
        Ok(json!({"revoked": fingerprint}))
    } else {
        Err(Error::NotFound(format!(
            "no unrevoked certificate with SHA-256 fingerprint {fingerprint} is registered"
        )))
    }
}

/// Every registered certificate.
pub async fn list(store: &Store) -> Result<Value> {
    let all = keys::registered(store).await?;
    Ok(Value::Array(all.iter().map(|r| r.summary()).collect()))
}

/// `Ok` if the subscriber's Organization exists (locked for this write).
async fn existing_organization(tx: &mut Writer, org_id: &str) -> Result<()> {
    match tx.current_for_write("Organization", org_id).await?.live() {
        Some(_) => Ok(()),
        None => Err(Error::NotFound(format!(
            "Organization/{org_id} does not exist"
        ))),
    }
}
