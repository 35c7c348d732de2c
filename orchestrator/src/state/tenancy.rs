//! What the store knows of tenants: whose a run is, and whether a tenant
//! may start another (its starts this minute and its runs in flight, both
//! counted in Redis so the limits hold across replicas).

use super::WorkflowStore;
use crate::errors::ApiError;
use crate::tenants::{Limits, Tenant};
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{ShardKeys, WorkflowKeys, field, tenant_starts};

impl WorkflowStore {
    /// Refuses, as `NOT_FOUND`, a run that does not exist or that `caller`
    /// may not see: another tenant's run is indistinguishable from none.
    pub async fn authorize(&self, caller: &Tenant, id: &WorkflowId) -> Result<(), ApiError> {
        if caller.admin {
            return Ok(());
        }
        let (status, owner): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(WorkflowKeys::new(id).state())
            .arg(&[field::STATUS, field::TENANT])
            .query_async(&mut self.conn.clone())
            .await?;
        match status {
            Some(_) if caller.may_see(owner.as_deref().unwrap_or_default()) => Ok(()),
            _ => Err(ApiError::NotFound(id.to_string())),
        }
    }

    /// Counts a start of `caller` against its limits, or says which it
    /// would pass. Races between replicas may let a start or two past the
    /// running limit; the rate limit is exact.
    pub async fn admit_start(&self, caller: &Tenant, limits: Limits) -> Result<(), ApiError> {
        let tenant = caller.owner();
        if tenant.is_empty() {
            return Ok(());
        }
        if limits.running_per_tenant > 0 {
            let running = self.running(tenant).await?;
            if running >= limits.running_per_tenant {
                return Err(ApiError::LimitReached(format!(
                    "tenant {tenant} has {running} runs in flight, its limit (NEXUS_TENANT_MAX_RUNNING); start again when one has ended"
                )));
            }
        }
        if limits.starts_per_minute > 0 {
            let minute = nexus_pipeline::now_ms() as u64 / 60_000;
            let key = tenant_starts(tenant, minute);
            let (count, _): (u64, bool) = redis::pipe()
                .incr(&key, 1)
                .expire(&key, 120)
                .query_async(&mut self.conn.clone())
                .await?;
            if count > limits.starts_per_minute {
                return Err(ApiError::LimitReached(format!(
                    "tenant {tenant} may start {} runs a minute (NEXUS_TENANT_STARTS_PER_MINUTE); retry in the next minute",
                    limits.starts_per_minute
                )));
            }
        }
        Ok(())
    }

    /// The tenant's runs in flight, over every shard.
    async fn running(&self, tenant: &str) -> Result<u64, ApiError> {
        let mut pipe = redis::pipe();
        for shard in 0..self.shards {
            pipe.scard(ShardKeys::new(shard).tenant_running(tenant));
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(counts.iter().sum())
    }
}
