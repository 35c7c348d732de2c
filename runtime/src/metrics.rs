//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format,
//! on its own port so scraping never competes with the gRPC traffic.

use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;

/// Binds `address` now (so the caller can announce it) and serves
/// `registry` there in the background. Prints "metrics listening on ADDR";
/// port 0 picks a free one.
pub async fn serve(address: SocketAddr, registry: Registry) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    println!("metrics listening on {bound}");
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    ),
                    Err(_) => ([("content-type", "text/plain")], "encoding failed".to_string()),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
