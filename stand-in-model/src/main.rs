//! The stand-in model as a process, for the offline demo, benchmarks and scripts: parse flags,
//! bind, announce the address on stdout (scripts read it), serve.

/// mimalloc instead of glibc malloc: a profile of the worker under load
/// showed a quarter of its CPU in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use stand_in_model::StandInConfig;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A local server that speaks OpenRouter's chat completions API. Every reply says it comes from
/// the stand-in. Faults are scripted at runtime through POST /_stand-in/faults.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the actual address is printed).
    #[arg(long, env = "STAND_IN_LISTEN", default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Milliseconds each reply waits before its first token (keep-alive comments meanwhile).
    #[arg(long, env = "STAND_IN_FIRST_TOKEN_LATENCY_MS", default_value_t = 50)]
    first_token_latency_ms: u64,
    /// Content chunks (one word each) streamed per second; 0 sends them unpaced.
    #[arg(long, env = "STAND_IN_TOKENS_PER_SECOND", default_value_t = 200.0)]
    tokens_per_second: f64,
    /// Words of prompt-derived text in each free-text reply, after the stand-in banner.
    #[arg(long, env = "STAND_IN_REPLY_WORDS", default_value_t = 60)]
    reply_words: usize,
}

impl Args {
    fn config(&self) -> StandInConfig {
        StandInConfig {
            first_token_latency: Duration::from_millis(self.first_token_latency_ms),
            tokens_per_second: self.tokens_per_second,
            reply_words: self.reply_words,
            ..StandInConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    tracing::info!(?args, "starting stand-in model");
    let listener = TcpListener::bind(args.listen).await?;
    println!("stand-in model listening on http://{}", listener.local_addr()?);
    stand_in_model::serve(listener, args.config()).await
}
