//! What `/health/ready` and `/metrics` need to know about the database:
//! whether it answers, whether its schema is this build's, and how much of
//! the connection pool is in use.

use super::{Store, StoreResult};

/// Connections of the pool: open, idle, and the most it opens.
#[derive(Debug, Clone, Copy)]
pub struct PoolUse {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

/// The database's state as a readiness check sees it.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    /// The last migration applied to the database.
    pub schema_version: i64,
    /// The last migration this build knows.
    pub expected_schema_version: i64,
}

impl Readiness {
    pub fn schema_current(&self) -> bool {
        self.schema_version == self.expected_schema_version
    }
}

impl Store {
    pub fn pool_use(&self) -> PoolUse {
        PoolUse {
            size: self.pool.size(),
            idle: self.pool.num_idle() as u32,
            max: self.pool.options().get_max_connections(),
        }
    }

    /// Reaches the database and reads its schema version.
    pub async fn readiness(&self) -> StoreResult<Readiness> {
        let mut conn = self.pool.acquire().await?;
        super::ping(&mut conn).await?;
        drop(conn);
        Ok(Readiness {
            schema_version: self.schema_version().await?,
            expected_schema_version: self.latest_schema_version(),
        })
    }
}
