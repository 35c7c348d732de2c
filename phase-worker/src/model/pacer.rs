//! The [`Pacer`] hook: what the client asks before each try and tells after a `Retry-After`.
//!
//! Only the trait lives here; the client stays free of Redis. The worker's implementation,
//! shared by all workers through Redis, is `crate::pacing::RedisPacer`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, so [`Pacer`] stays object-safe.
pub type PacerFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides when a try may start, shared by every caller of a model (the
/// worker's implementation keeps its state in Redis, so all workers share
/// one rate limit and one provider back-off per model). Waiting for the pacer
/// is not a try.
pub trait Pacer: Send + Sync {
    /// How long to wait before a try of `model` that may use `tokens`
    /// (prompt and answer, estimated) may start; zero means go now (and the
    /// slot and the tokens are taken).
    fn reserve<'a>(&'a self, model: &'a str, tokens: u64) -> PacerFuture<'a, Duration>;
    /// The provider asked callers of `model` to wait `wait` (a `Retry-After`).
    fn back_off<'a>(&'a self, model: &'a str, wait: Duration) -> PacerFuture<'a, ()>;
}
