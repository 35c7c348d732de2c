//! Who is calling: bearer tokens mapped to tenants, and what each tenant
//! may do at once.
//!
//! Tokens come from a file (`NEXUS_TOKENS_FILE`), one per line as
//! `<tenant> <token> [admin]`, re-read when it changes, so a token is
//! added or revoked without a restart; `NEXUS_API_TOKEN` is one more token,
//! of tenant `default`, with admin rights. The table keeps SHA-256 digests,
//! not tokens, so a lookup's timing says nothing about a token's bytes.
//!
//! A tenant starts, sees, watches, lists and steers only its own runs;
//! another tenant's run is `NOT_FOUND`, as if it did not exist. Admin
//! tokens (operators) see every run. With no token configured at all there
//! are no tenants and no checks (see `Config::allow_unauthenticated`).
//!
//! Limits, each `RESOURCE_EXHAUSTED` with a message naming it: concurrent
//! watches per tenant and in all on one replica (watchers are a replica's
//! memory), starts per tenant per minute and runs in flight per tenant
//! (both counted in Redis, so they hold across replicas).

use crate::errors::ApiError;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tonic::{Request, Status};

/// How often the tokens file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The caller of a request, put in its extensions by [`Tokens::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// Empty when the server runs without tokens.
    pub name: Arc<str>,
    /// May use the operators' service and see every tenant's runs.
    pub admin: bool,
}

impl Tenant {
    /// The caller when no tokens are configured: sees everything.
    pub fn unauthenticated() -> Self {
        Self {
            name: Arc::from(""),
            admin: true,
        }
    }

    /// Whether this caller may see a run stored with `owner` as its tenant.
    pub fn may_see(&self, owner: &str) -> bool {
        self.admin || *self.name == *owner
    }

    /// The tenant a run this caller starts belongs to ("" without tokens).
    pub fn owner(&self) -> &str {
        &self.name
    }

    /// The caller of `request`.
    pub fn of<T>(request: &Request<T>) -> Tenant {
        request
            .extensions()
            .get::<Tenant>()
            .cloned()
            .unwrap_or_else(Tenant::unauthenticated)
    }
}

type Table = HashMap<[u8; 32], Tenant>;

/// The token table, shared by the interceptors and the reloader.
#[derive(Clone)]
pub struct Tokens {
    table: Arc<RwLock<Table>>,
    /// No token anywhere: every caller is [`Tenant::unauthenticated`].
    open: bool,
    file: Option<PathBuf>,
    api_token: Option<String>,
}

impl Tokens {
    /// Loads the file (if any) and the single API token (if any). A file
    /// that cannot be read or parsed stops the start-up with the reason.
    pub fn load(file: Option<PathBuf>, api_token: Option<String>) -> anyhow::Result<Self> {
        let api_token = api_token.filter(|token| !token.is_empty());
        let table = read_table(file.as_deref(), api_token.as_deref())?;
        Ok(Self {
            open: file.is_none() && api_token.is_none(),
            table: Arc::new(RwLock::new(table)),
            file,
            api_token,
        })
    }

    /// True when no token is configured: requests are not authenticated.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The interceptor: finds the caller's tenant or refuses the call.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.open {
            return Ok(request);
        }
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let tenant = self.table.read().expect("token table").get(&digest(given)).cloned();
        match tenant {
            Some(tenant) => {
                request.extensions_mut().insert(tenant);
                Ok(request)
            }
            None => Err(Status::unauthenticated(
                "missing or unknown token: send metadata \"authorization: Bearer <token>\"",
            )),
        }
    }

    /// The interceptor of the operators' service: admin tokens only.
    pub fn check_admin(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let request = self.check(request)?;
        if Tenant::of(&request).admin {
            Ok(request)
        } else {
            Err(Status::permission_denied("this call needs an admin token"))
        }
    }

    /// Re-reads the tokens file whenever it changes, until `shutdown`. A
    /// file that became unreadable or invalid keeps the old table (and says
    /// so), rather than locking everyone out.
    pub async fn reload(self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(file) = self.file.clone() else { return };
        let mut seen = modified(&file);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = modified(&file);
            if now == seen {
                continue;
            }
            seen = now;
            match read_table(Some(&file), self.api_token.as_deref()) {
                Ok(table) => {
                    let count = table.len();
                    *self.table.write().expect("token table") = table;
                    tracing::info!(tokens = count, file = %file.display(), "tokens reloaded");
                }
                Err(error) => tracing::error!(%error, "tokens file not reloaded; keeping the previous tokens"),
            }
        }
    }
}

fn modified(file: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

fn digest(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The table from the file's lines and the API token. Errors name the line
/// but never quote a token.
fn read_table(file: Option<&std::path::Path>, api_token: Option<&str>) -> anyhow::Result<Table> {
    let mut table = Table::new();
    if let Some(token) = api_token {
        let tenant = Tenant {
            name: Arc::from("default"),
            admin: true,
        };
        table.insert(digest(token), tenant);
    }
    let Some(file) = file else { return Ok(table) };
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", file.display(), number + 1);
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (name, token, admin) = match parts.as_slice() {
            [name, token] => (*name, *token, false),
            [name, token, "admin"] => (*name, *token, true),
            _ => anyhow::bail!("{}: expected \"<tenant> <token> [admin]\"", at()),
        };
        let name_ok = name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            anyhow::bail!("{}: a tenant name is 1 to 64 of [A-Za-z0-9_-]", at());
        }
        if token.len() < 16 {
            anyhow::bail!("{}: a token must have at least 16 characters", at());
        }
        let tenant = Tenant {
            name: Arc::from(name),
            admin,
        };
        if table.insert(digest(token), tenant).is_some() {
            anyhow::bail!("{}: this token is already given to a tenant", at());
        }
    }
    Ok(table)
}

/// What a tenant may do at once; 0 means no limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub watches_per_tenant: usize,
    pub watchers_total: usize,
    pub starts_per_minute: u64,
    pub running_per_tenant: u64,
}

/// Open watch streams on this replica, in all and per tenant.
#[derive(Debug, Default)]
pub struct WatchCounts {
    total: AtomicUsize,
    by_tenant: Mutex<HashMap<Arc<str>, usize>>,
}

/// One open watch, counted until it is dropped.
#[derive(Debug)]
pub struct WatchSlot {
    counts: Arc<WatchCounts>,
    tenant: Arc<str>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
        let mut by_tenant = self.counts.by_tenant.lock().expect("watch counts");
        if let Some(count) = by_tenant.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                by_tenant.remove(&self.tenant);
            }
        }
    }
}

impl WatchCounts {
    /// Counts a new watch of `tenant`, or says which limit it would pass.
    pub fn admit(self: &Arc<Self>, tenant: &Tenant, limits: Limits) -> Result<WatchSlot, ApiError> {
        let mut by_tenant = self.by_tenant.lock().expect("watch counts");
        let total = self.total.load(Ordering::Relaxed);
        if limits.watchers_total > 0 && total >= limits.watchers_total {
            return Err(ApiError::LimitReached(format!(
                "this replica serves at most {} watch streams (NEXUS_MAX_WATCHERS); retry shortly or on another replica",
                limits.watchers_total
            )));
        }
        let mine = by_tenant.entry(tenant.name.clone()).or_default();
        if limits.watches_per_tenant > 0 && !tenant.name.is_empty() && *mine >= limits.watches_per_tenant {
            return Err(ApiError::LimitReached(format!(
                "tenant {} has {} watch streams open on this replica, its limit (NEXUS_TENANT_MAX_WATCHES)",
                tenant.name, *mine
            )));
        }
        *mine += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(WatchSlot {
            counts: self.clone(),
            tenant: tenant.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_from(text: &str) -> anyhow::Result<Table> {
        let path = std::env::temp_dir().join(format!("nexus-tokens-{}-{}", std::process::id(), text.len()));
        std::fs::write(&path, text)?;
        let table = read_table(Some(&path), Some("the-single-api-token"));
        std::fs::remove_file(&path)?;
        table
    }

    #[test]
    fn lines_map_tokens_to_tenants_and_bad_lines_are_refused_without_quoting_tokens() {
        let table = table_from("# teams\nteam-a aaaaaaaaaaaaaaaaaaaa\nops oooooooooooooooooooo admin\n").unwrap();
        assert_eq!(&*table[&digest("aaaaaaaaaaaaaaaaaaaa")].name, "team-a");
        assert!(table[&digest("oooooooooooooooooooo")].admin);
        assert_eq!(&*table[&digest("the-single-api-token")].name, "default");
        let short = table_from("team-a tok3n\n").unwrap_err().to_string();
        assert!(short.contains("line 1") && !short.contains("tok3n"), "{short}");
        let twice = table_from("a aaaaaaaaaaaaaaaaaaaa\nb aaaaaaaaaaaaaaaaaaaa\n")
            .unwrap_err()
            .to_string();
        assert!(twice.contains("line 2") && !twice.contains("aaaa"), "{twice}");
    }

    #[test]
    fn watch_slots_count_per_tenant_and_in_all_until_dropped() {
        let counts = Arc::new(WatchCounts::default());
        let limits = Limits {
            watches_per_tenant: 1,
            watchers_total: 2,
            ..Limits::default()
        };
        let a = Tenant {
            name: Arc::from("a"),
            admin: false,
        };
        let b = Tenant {
            name: Arc::from("b"),
            admin: false,
        };
        let first = counts.admit(&a, limits).unwrap();
        assert!(
            counts
                .admit(&a, limits)
                .unwrap_err()
                .to_string()
                .contains("NEXUS_TENANT_MAX_WATCHES")
        );
        let _second = counts.admit(&b, limits).unwrap();
        let c = Tenant {
            name: Arc::from("c"),
            admin: false,
        };
        assert!(
            counts
                .admit(&c, limits)
                .unwrap_err()
                .to_string()
                .contains("NEXUS_MAX_WATCHERS")
        );
        drop(first);
        counts.admit(&a, limits).unwrap();
    }
}
