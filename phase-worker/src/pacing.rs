//! Per-model rate limits and provider back-off, shared by all workers
//! through Redis (`lua/pace.lua`), so ten workers together respect a limit
//! meant for one account, and one 429 with `Retry-After` holds off every
//! worker calling that model, not just the one that received it.

use crate::model::{Pacer, PacerFuture};
use futures::StreamExt;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::connection::RedisArgs;
use nexus_pipeline::keys::{PACE_CHANNEL, model_pace, model_tokens};
use redis::Script;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

static PACE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/pace.lua")));

/// Per-model limits from `NEXUS_MODEL_RATE_LIMITS`: the minimum spacing of
/// calls, and the tokens a minute's calls may reserve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimits {
    per_model: HashMap<String, Duration>,
    default: Option<Duration>,
    tokens_per_model: HashMap<String, u64>,
    default_tokens: Option<u64>,
}

impl RateLimits {
    /// Parses "model=N/s,other=N/min,*=N/s,model=N tok/min" (`*` applies to
    /// unlisted models).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut limits = Self::default();
        for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let (model, rate) = entry
                .rsplit_once('=')
                .ok_or_else(|| format!("{entry:?} is not model=N/s, model=N/min or model=N tok/min"))?;
            let model = model.trim();
            if let Some(tokens) = parse_tokens_per_minute(rate.trim()) {
                match model {
                    "*" => limits.default_tokens = Some(tokens),
                    model => {
                        limits.tokens_per_model.insert(model.to_string(), tokens);
                    }
                }
                continue;
            }
            let interval =
                parse_rate(rate.trim()).ok_or_else(|| format!("{rate:?} is not N/s, N/min or N tok/min with N > 0"))?;
            match model {
                "*" => limits.default = Some(interval),
                model => {
                    limits.per_model.insert(model.to_string(), interval);
                }
            }
        }
        Ok(limits)
    }

    /// The minimum spacing of calls to `model` (zero: unlimited).
    pub fn interval(&self, model: &str) -> Duration {
        self.per_model.get(model).copied().or(self.default).unwrap_or_default()
    }

    /// The tokens a minute's calls to `model` may reserve (0: unlimited).
    pub fn tokens_per_minute(&self, model: &str) -> u64 {
        self.tokens_per_model
            .get(model)
            .copied()
            .or(self.default_tokens)
            .unwrap_or_default()
    }
}

/// "N tok/min" (or "Ntok/min", "N tokens/min") as N.
fn parse_tokens_per_minute(rate: &str) -> Option<u64> {
    let (count, unit) = rate.split_once('/')?;
    let count = count.trim();
    let number = count
        .strip_suffix("tokens")
        .or_else(|| count.strip_suffix("tok"))?
        .trim();
    let minute = matches!(unit.trim(), "min" | "m" | "minute");
    number.parse().ok().filter(|n: &u64| *n > 0 && minute)
}

fn parse_rate(rate: &str) -> Option<Duration> {
    let (count, unit) = rate.split_once('/')?;
    let count: f64 = count.trim().parse().ok().filter(|count: &f64| *count > 0.0)?;
    let period = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "min" | "m" | "minute" => 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(period / count))
}

/// The [`Pacer`] backed by Redis. A model with a rate limit asks Redis before
/// every call; one without keeps the shared back-off locally, learned from
/// the pace channel, and asks Redis nothing. Fails open: if Redis cannot be
/// asked, the call goes ahead rather than stalling the phase.
pub struct RedisPacer {
    conn: Connection,
    limits: RateLimits,
    backed_off_until: Mutex<HashMap<String, Instant>>,
}

impl RedisPacer {
    pub fn new(conn: Connection, limits: RateLimits) -> Self {
        Self {
            conn,
            limits,
            backed_off_until: Mutex::default(),
        }
    }

    async fn pace(&self, model: &str, mode: &str, millis: u128, tokens: Tokens) -> Duration {
        let reply: redis::RedisResult<u64> = PACE
            .key(model_pace(model))
            .key(model_tokens(model))
            .arg(mode)
            .arg(millis as u64)
            .arg(PACE_CHANNEL)
            .arg(model)
            .arg(tokens.limit)
            .arg(tokens.wanted)
            .arg(uuid::Uuid::now_v7().simple().to_string())
            .invoke_async(&mut self.conn.clone())
            .await;
        match reply {
            Ok(wait_ms) => Duration::from_millis(wait_ms),
            Err(error) => {
                tracing::warn!(%error, model, "cannot reach the shared pacing state; not waiting");
                Duration::ZERO
            }
        }
    }

    fn remember_back_off(&self, model: &str, wait: Duration) {
        let until = Instant::now() + wait;
        let mut backed_off = self.backed_off_until.lock().expect("pacer lock");
        let entry = backed_off.entry(model.to_string()).or_insert(until);
        *entry = (*entry).max(until);
    }

    fn local_back_off(&self, model: &str) -> Duration {
        let backed_off = self.backed_off_until.lock().expect("pacer lock");
        backed_off
            .get(model)
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Learns other workers' back-offs until the process ends.
    pub async fn listen(self: Arc<Self>, redis: RedisArgs) {
        nexus_pipeline::connection::listen_forever("pace notifications", || self.listen_once(&redis)).await
    }

    async fn listen_once(&self, redis: &RedisArgs) -> redis::RedisResult<()> {
        let mut pubsub = redis.pubsub_client()?.get_async_pubsub().await?;
        pubsub.subscribe(PACE_CHANNEL).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if let Some((model, millis)) = text.rsplit_once('\n').and_then(|(m, ms)| Some((m, ms.parse().ok()?))) {
                self.remember_back_off(model, Duration::from_millis(millis));
            }
        }
        Ok(())
    }
}

/// A call's tokens against its model's tokens-per-minute limit.
#[derive(Clone, Copy, Default)]
struct Tokens {
    /// 0: no token limit.
    limit: u64,
    wanted: u64,
}

impl Pacer for RedisPacer {
    fn reserve<'a>(&'a self, model: &'a str, tokens: u64) -> PacerFuture<'a, Duration> {
        let interval = self.limits.interval(model);
        let limit = self.limits.tokens_per_minute(model);
        if interval.is_zero() && limit == 0 {
            let wait = self.local_back_off(model);
            return Box::pin(async move { wait });
        }
        let tokens = Tokens { limit, wanted: tokens };
        Box::pin(self.pace(model, "reserve", interval.as_millis(), tokens))
    }

    fn back_off<'a>(&'a self, model: &'a str, wait: Duration) -> PacerFuture<'a, ()> {
        tracing::info!(
            model,
            ?wait,
            "provider asked to back off; holding off every worker for this model"
        );
        self.remember_back_off(model, wait);
        Box::pin(async move {
            self.pace(model, "back_off", wait.as_millis(), Tokens::default()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_per_model_and_default() {
        let limits = RateLimits::parse("anthropic/claude-sonnet-4.5=2/s, *=120/min").unwrap();
        assert_eq!(
            limits.interval("anthropic/claude-sonnet-4.5"),
            Duration::from_millis(500)
        );
        assert_eq!(
            limits.interval("google/gemini-3-pro-preview"),
            Duration::from_millis(500)
        );
        assert_eq!(RateLimits::parse("").unwrap().interval("x"), Duration::ZERO);
    }

    #[test]
    fn token_limits_parse_beside_request_limits() {
        let limits = RateLimits::parse("m=2/s, m=40000 tok/min, *=1000tok/min").unwrap();
        assert_eq!(limits.interval("m"), Duration::from_millis(500));
        assert_eq!(limits.tokens_per_minute("m"), 40_000);
        assert_eq!(limits.tokens_per_minute("other"), 1000);
        assert_eq!(limits.interval("other"), Duration::ZERO);
        assert!(RateLimits::parse("m=10 tok/s").is_err(), "tokens are per minute");
    }

    #[test]
    fn bad_limits_are_rejected_with_the_entry() {
        assert!(RateLimits::parse("model=fast").unwrap_err().contains("fast"));
        assert!(RateLimits::parse("model=0/s").is_err());
        assert!(RateLimits::parse("no-equals").is_err());
    }
}
