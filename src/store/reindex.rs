//! Rebuilding the search indexes of every current resource, after an
//! upgrade that changes what is indexed (`ehrx reindex`).

use super::{current_page, Store, StoreResult};

use crate::search::index;

const BATCH: usize = 500;

/// Re-extracts and rewrites the index rows of every current resource, one
/// transaction per batch. Returns how many resources were reindexed.
pub async fn reindex(store: &Store, mut progress: impl FnMut(u64)) -> StoreResult<u64> {
    let mut done = 0u64;
    let mut after: Option<(String, String)> = None;
    loop {
        let page = {
            let mut conn = store.reader().await?;
            current_page(
                &mut conn,
                after.as_ref().map(|(t, i)| (t.as_str(), i.as_str())),
                BATCH,
            )
            .await?
        };
        let Some(last) = page.last() else { break };
        after = Some((last.rtype.clone(), last.id.clone()));
        let mut tx = store.begin().await?;
        for v in &page {
            let Some(body) = &v.body else { continue };
            let Ok(resource) = serde_json::from_str(body) else {
                tracing::warn!(rtype = %v.rtype, id = %v.id, "stored body is not JSON; not reindexed");
                continue;
            };
            let rows = index::extract(&v.rtype, &resource);
            tx.replace_index(&v.rtype, &v.id, &rows).await?;
        }
        tx.commit().await?;
        done += page.len() as u64;
        progress(done);
    }
    Ok(done)
}
