//! The operations endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is alive)
//! and `/readyz` (connected to PostgreSQL and not stalled).
//!
//! Everything served is read at scrape time from the shared [`Stats`] and from the pipeline's
//! channels, so the endpoint adds nothing to the hot path. Channels are watched through weak senders:
//! watching must never keep a channel open and so delay a drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// Reads how full one channel is: (messages-in-chunks used, capacity), or `None` once it is closed.
pub struct ChannelProbe {
    name: &'static str,
    read: Box<dyn Fn() -> Option<(usize, usize)> + Send + Sync>,
}

impl ChannelProbe {
    pub fn new<T: Send + 'static>(name: &'static str, sender: &mpsc::Sender<T>) -> ChannelProbe {
        let weak = sender.downgrade();
        ChannelProbe {
            name,
            read: Box::new(move || {
                weak.upgrade()
                    .map(|s| (s.max_capacity() - s.capacity(), s.max_capacity()))
            }),
        }
    }
}

type ChannelGauges = Family<Vec<(String, String)>, Gauge>;

struct Endpoint {
    stats: Arc<Stats>,
    registry: Registry,
    channels: Vec<ChannelProbe>,
    used: ChannelGauges,
    capacity: ChannelGauges,
    stall_after: Duration,
}

/// Binds `listen` and serves until `stop`. Binding happens before this returns, so a taken port is
/// an error at start, not a log line later.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    channels: Vec<ChannelProbe>,
    stall_after: Duration,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let mut registry = Registry::default();
    stats.register(&mut registry);
    let used = ChannelGauges::default();
    let capacity = ChannelGauges::default();
    registry.register(
        "sluice_channel_used",
        "Chunks waiting in a channel between stages",
        used.clone(),
    );
    registry.register(
        "sluice_channel_capacity",
        "Capacity of a channel between stages, in chunks",
        capacity.clone(),
    );
    let endpoint = Arc::new(Endpoint {
        stats,
        registry,
        channels,
        used,
        capacity,
        stall_after,
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint);
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    }))
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    for probe in &endpoint.channels {
        let labels = vec![("channel".to_owned(), probe.name.to_owned())];
        let (used, capacity) = (probe.read)().unwrap_or((0, 0));
        endpoint.used.get_or_create(&labels).set(used as i64);
        endpoint
            .capacity
            .get_or_create(&labels)
            .set(capacity as i64);
    }
    let mut body = String::new();
    match encode(&mut body, &endpoint.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "cannot encode metrics\n".to_owned(),
        ),
    }
}

async fn ready(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let stats = &endpoint.stats;
    if stats.postgres_connections.get() < 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no PostgreSQL connection\n".to_owned(),
        );
    }
    if stats.stalled(endpoint.stall_after) {
        let message = format!(
            "not ready: {} messages waiting and nothing committed for {} s\n",
            stats.in_flight(),
            endpoint.stall_after.as_secs()
        );
        return (StatusCode::SERVICE_UNAVAILABLE, message);
    }
    (StatusCode::OK, "ready\n".to_owned())
}
