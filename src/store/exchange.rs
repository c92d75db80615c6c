//! The tables of the signed-XML exchange (`crate::exchange`): ehrx's own
//! exchange keys, the subscribers' registered certificates and channel
//! policy, and the receipts that claim each received document once.
//!
//! It exists so that all SQL stays inside `crate::store`: the exchange
//! parses, checks and decides, these functions only read and write rows.
//! Each takes the connection (or open transaction, [`super::Tx::conn`]) it
//! runs on, so the caller keeps its transaction boundaries; none commits.
//! Keys and certificates come back as stored (PEM text, RFC 3339 times).

use sqlx::{AnyConnection, Row};

use super::StoreResult;

// ---- ehrx's exchange keys ----

/// A row of `exchange_key`.
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// PKCS#8 PEM, sealed when a key-encryption key is configured.
    pub private_key_pem: String,
    pub certificate_pem: String,
}

/// Stores exchange key `id` unless one is stored already (the first row
/// wins).
pub async fn insert_key(
    conn: &mut AnyConnection,
    id: i64,
    key: &KeyRow,
    created: &str,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO exchange_key (id, private_key_pem, certificate_pem, created) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(key.private_key_pem.as_str())
    .bind(key.certificate_pem.as_str())
    .bind(created)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Exchange key `id`, if stored.
pub async fn key(conn: &mut AnyConnection, id: i64) -> StoreResult<Option<KeyRow>> {
    let row =
        sqlx::query("SELECT private_key_pem, certificate_pem FROM exchange_key WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(KeyRow {
        private_key_pem: row.try_get(0)?,
        certificate_pem: row.try_get(1)?,
    }))
}

/// Replaces the stored private key of exchange key `id` (to seal it).
pub async fn set_key_private_pem(
    conn: &mut AnyConnection,
    id: i64,
    private_key_pem: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE exchange_key SET private_key_pem = $1 WHERE id = $2")
        .bind(private_key_pem)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

// ---- subscribers' certificates ----

/// A registered certificate, as listed by [`certificates`].
#[derive(Debug, Clone)]
pub struct CertificateRow {
    pub organization_id: String,
    pub certificate_pem: String,
    /// When it was revoked (RFC 3339), if it was.
    pub revoked: Option<String>,
}

/// Every registered certificate, revoked ones too, by organisation and
/// start of validity.
pub async fn certificates(conn: &mut AnyConnection) -> StoreResult<Vec<CertificateRow>> {
    let rows = sqlx::query(
        "SELECT organization_id, certificate_pem, revoked FROM exchange_certificate \
         ORDER BY organization_id, not_before",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(CertificateRow {
                organization_id: row.try_get(0)?,
                certificate_pem: row.try_get(1)?,
                revoked: row.try_get(2)?,
            })
        })
        .collect()
}

/// The organisation the certificate `fingerprint` is registered for.
pub async fn certificate_organization(
    conn: &mut AnyConnection,
    fingerprint: &str,
) -> StoreResult<Option<String>> {
    let row =
        sqlx::query("SELECT organization_id FROM exchange_certificate WHERE fingerprint = $1")
            .bind(fingerprint)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match row {
        Some(row) => Some(row.try_get(0)?),
        None => None,
    })
}

/// A certificate to register; times are RFC 3339.
#[derive(Debug, Clone)]
pub struct NewCertificate<'a> {
    pub fingerprint: &'a str,
    pub organization_id: &'a str,
    pub certificate_pem: &'a str,
    pub subject: &'a str,
    pub not_before: &'a str,
    pub not_after: &'a str,
    pub added: &'a str,
}

/// Registers a certificate, not revoked.
pub async fn insert_certificate(
    conn: &mut AnyConnection,
    c: &NewCertificate<'_>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO exchange_certificate (fingerprint, organization_id, certificate_pem, subject, \
         not_before, not_after, added, revoked) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
    )
    .bind(c.fingerprint)
    .bind(c.organization_id)
    .bind(c.certificate_pem)
    .bind(c.subject)
    .bind(c.not_before)
    .bind(c.not_after)
    .bind(c.added)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks the certificate `fingerprint` revoked as of `revoked`; false when
/// no unrevoked certificate has that fingerprint.
pub async fn revoke_certificate(
    conn: &mut AnyConnection,
    fingerprint: &str,
    revoked: &str,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE exchange_certificate SET revoked = $1 WHERE fingerprint = $2 AND revoked IS NULL",
    )
    .bind(revoked)
    .bind(fingerprint)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

// ---- subscribers' channel policy ----

/// Whether the subscriber requires mutual TLS; `None` when it has no policy.
pub async fn subscriber_requires_mtls(
    conn: &mut AnyConnection,
    organization_id: &str,
) -> StoreResult<Option<bool>> {
    let row =
        sqlx::query("SELECT require_mtls FROM exchange_subscriber WHERE organization_id = $1")
            .bind(organization_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match row {
        Some(r) => Some(r.try_get::<i64, _>(0)? != 0),
        None => None,
    })
}

/// Sets (inserting or replacing) the subscriber's mutual-TLS requirement.
pub async fn set_subscriber_requires_mtls(
    conn: &mut AnyConnection,
    organization_id: &str,
    required: bool,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO exchange_subscriber (organization_id, require_mtls) VALUES ($1, $2) \
         ON CONFLICT (organization_id) DO UPDATE SET require_mtls = excluded.require_mtls",
    )
    .bind(organization_id)
    .bind(required as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

// ---- document receipts ----

/// A document's receipt: when it was claimed and, once stored, its
/// DocumentReference id.
#[derive(Debug, Clone)]
pub struct ReceiptRow {
    /// RFC 3339, UTC.
    pub claimed: String,
    pub document_reference: Option<String>,
}

/// Which receipt: a subscriber's (its `meta.source`) document by content
/// digest. The same content from another subscriber has its own receipt.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptKey<'a> {
    pub subscriber: &'a str,
    pub digest: &'a str,
}

/// Claims the receipt of `key` as of `claimed`; false when a receipt
/// exists already (nothing was inserted).
pub async fn insert_receipt(
    conn: &mut AnyConnection,
    key: ReceiptKey<'_>,
    claimed: &str,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO exchange_receipt (subscriber, digest, claimed, document_reference) \
         VALUES ($1, $2, $3, NULL) ON CONFLICT (subscriber, digest) DO NOTHING",
    )
    .bind(key.subscriber)
    .bind(key.digest)
    .bind(claimed)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// The receipt of `key`, which must exist.
pub async fn receipt(conn: &mut AnyConnection, key: ReceiptKey<'_>) -> StoreResult<ReceiptRow> {
    let row = sqlx::query(
        "SELECT claimed, document_reference FROM exchange_receipt \
         WHERE subscriber = $1 AND digest = $2",
    )
    .bind(key.subscriber)
    .bind(key.digest)
    .fetch_one(&mut *conn)
    .await?;
    Ok(ReceiptRow {
        claimed: row.try_get(0)?,
        document_reference: row.try_get(1)?,
    })
}

/// Completes the receipt of `key` with the DocumentReference id.
pub async fn set_receipt_document(
    conn: &mut AnyConnection,
    key: ReceiptKey<'_>,
    document_reference: &str,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE exchange_receipt SET document_reference = $1 \
         WHERE subscriber = $2 AND digest = $3",
    )
    .bind(document_reference)
    .bind(key.subscriber)
    .bind(key.digest)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Forgets the receipt of `key` (the document may be sent again).
pub async fn delete_receipt(conn: &mut AnyConnection, key: ReceiptKey<'_>) -> StoreResult<()> {
    sqlx::query("DELETE FROM exchange_receipt WHERE subscriber = $1 AND digest = $2")
        .bind(key.subscriber)
        .bind(key.digest)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes over a stale claim by compare-and-set: true only when the receipt
/// was still claimed as of `stale` and is now claimed as of `claimed`.
pub async fn take_over_claim(
    conn: &mut AnyConnection,
    key: ReceiptKey<'_>,
    stale: &str,
    claimed: &str,
) -> StoreResult<bool> {
    let taken = sqlx::query(
        "UPDATE exchange_receipt SET claimed = $1 \
         WHERE subscriber = $2 AND digest = $3 AND claimed = $4",
    )
    .bind(claimed)
    .bind(key.subscriber)
    .bind(key.digest)
    .bind(stale)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(taken == 1)
}
