//! The stand-in model as a process, for the offline demo, benchmarks and scripts: parse flags,
//! bind, announce the address on stdout (scripts read it), serve; with `--tls`, first make a
//! certificate and announce where its PEM is.

/// mimalloc instead of glibc malloc: a profile of the worker under load
/// showed a quarter of its CPU in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use stand_in_model::{SelfSignedTls, StandInConfig};
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
    /// Stream as roughly as SSE allows: events split across writes, CRLF line ends, multi-line
    /// `data:` fields, keep-alive comments between events, reasoning before the answer.
    /// Off by default: benchmarks want the cheap stream.
    #[arg(long, env = "STAND_IN_ROUGH")]
    rough: bool,
    /// Milliseconds of reasoning deltas before each answer's first content token
    /// [default: 200 with --rough, else 0].
    #[arg(long, env = "STAND_IN_REASONING_MS")]
    reasoning_ms: Option<u64>,
    /// Serve HTTPS as OpenRouter does: TLS offering HTTP/2 and HTTP/1.1 (ALPN), on a
    /// self-signed certificate for localhost, 127.0.0.1 and ::1 made at start. Clients trust
    /// it by its PEM (see --cert-out). Off by default: plain HTTP/1.1 is cheaper.
    #[arg(long, env = "STAND_IN_TLS")]
    tls: bool,
    /// With --tls: where to write the certificate (PEM) for clients to trust
    /// [default: stand-in-model-<pid>.pem in the temporary directory]. Its path is printed
    /// before the listening line.
    #[arg(long, env = "STAND_IN_CERT_OUT", requires = "tls")]
    cert_out: Option<PathBuf>,
}

/// Reasoning time when `--rough` is given without `--reasoning-ms`.
const ROUGH_REASONING_MS: u64 = 200;

impl Args {
    fn config(&self) -> StandInConfig {
        StandInConfig {
            first_token_latency: Duration::from_millis(self.first_token_latency_ms),
            tokens_per_second: self.tokens_per_second,
            reply_words: self.reply_words,
            reasoning: Duration::from_millis(self.reasoning_ms()),
            rough: self.rough,
            ..StandInConfig::default()
        }
    }

    fn reasoning_ms(&self) -> u64 {
        let default = if self.rough { ROUGH_REASONING_MS } else { 0 };
        self.reasoning_ms.unwrap_or(default)
    }
}

/// One thread: the stand-in shares the machine with what it measures, and a thread per core
/// would only add cross-thread wake-ups to its cost.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    tracing::info!(?args, "starting stand-in model");
    let listener = TcpListener::bind(args.listen).await?;
    if !args.tls {
        println!("stand-in model listening on http://{}", listener.local_addr()?);
        return stand_in_model::serve(listener, args.config()).await;
    }
    let tls = SelfSignedTls::generate()?;
    let cert_out = args
        .cert_out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("stand-in-model-{}.pem", std::process::id())));
    std::fs::write(&cert_out, tls.cert_pem())?;
    println!("stand-in model certificate in {}", cert_out.display());
    println!("stand-in model listening on https://{}", listener.local_addr()?);
    stand_in_model::serve_tls(listener, args.config(), &tls).await
}
