//! The operations endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is alive)
//! and `/readyz` (connected to PostgreSQL and not stalled).
//!
//! Everything served is read at scrape time from the shared [`Stats`] and from the pipeline's
//! channels, so the endpoint adds nothing to the hot path. Channels are watched through weak senders:
//! watching must never keep a channel open and so delay a drain.

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

use crate::background::{BackgroundError, BackgroundTask};
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
    /// What `/readyz` would answer, as 1 or 0, so a dashboard can graph readiness.
    ready: Gauge,
    stall_after: Duration,
}

/// The endpoint serving on `listener` until its stop token is cancelled, as a background task of the
/// run (an endpoint that fails ends the run rather than going dark unnoticed). The caller binds the
/// listener, so a taken port is an error at start, not a log line later, and a listener bound to
/// port 0 serves on whichever port it got (logged here).
pub fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<Stats>,
    channels: Vec<ChannelProbe>,
    stall_after: Duration,
) -> BackgroundTask {
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
    let ready_gauge = Gauge::default();
    registry.register(
        "sluice_ready",
        "1 while /readyz answers 200 (connected to PostgreSQL, not stalled), else 0",
        ready_gauge.clone(),
    );
    let endpoint = Arc::new(Endpoint {
        stats,
        registry,
        channels,
        used,
        capacity,
        ready: ready_gauge,
        stall_after,
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint);
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    }
    BackgroundTask::new("metrics endpoint", move |stop| async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(BackgroundError::new)
    })
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
    let ready = not_ready_because(&endpoint).is_none();
    endpoint.ready.set(i64::from(ready));
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
    match not_ready_because(&endpoint) {
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// Why the daemon is not ready, or `None` when it is.
fn not_ready_because(endpoint: &Endpoint) -> Option<String> {
    let stats = &endpoint.stats;
    if stats.postgres_connections.get() < 1 {
        return Some("no PostgreSQL connection".to_owned());
    }
    if stats.stalled(endpoint.stall_after) {
        return Some(format!(
            "{} messages waiting and nothing committed for {} s",
            stats.in_flight(),
            endpoint.stall_after.as_secs()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain HTTP GET: (status, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (status, body.unwrap_or_default())
    }

    async fn endpoint(
        stats: Arc<Stats>,
        channels: Vec<ChannelProbe>,
    ) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = serve(listener, stats, channels, Duration::from_secs(60));
        tokio::spawn(task.start(stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn metrics_report_the_counters_and_the_channels() {
        let stats = Arc::new(Stats::default());
        stats.record_received(3);
        stats.record_commit(2, 1, 0, Duration::from_millis(4));
        let (tx, _rx) = mpsc::channel::<u8>(8);
        tx.send(1).await.expect("send");
        let (addr, stop) = endpoint(stats, vec![ChannelProbe::new("a_to_b", &tx)]).await;
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        for line in [
            "sluice_messages_received_total 3",
            "sluice_rows_loaded_total 2",
            "sluice_dead_letters_total 1",
            "sluice_channel_used{channel=\"a_to_b\"} 1",
            "sluice_channel_capacity{channel=\"a_to_b\"} 8",
        ] {
            assert!(body.contains(line), "missing {line:?} in:\n{body}");
        }
        drop(tx);
        let (_, body) = get(addr, "/metrics").await;
        assert!(
            body.contains("sluice_channel_capacity{channel=\"a_to_b\"} 0"),
            "a closed channel reads 0:\n{body}"
        );
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        stop.cancel();
    }

    #[tokio::test]
    async fn ready_needs_a_connection_and_no_stall() {
        let stats = Arc::new(Stats::default());
        let (addr, stop) = endpoint(stats.clone(), Vec::new()).await;
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: no PostgreSQL connection\n".to_owned())
        );
        assert!(get(addr, "/metrics").await.1.contains("sluice_ready 0"));
        stats.postgres_connections.inc();
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
        assert!(get(addr, "/metrics").await.1.contains("sluice_ready 1"));
        stop.cancel();
    }
}
