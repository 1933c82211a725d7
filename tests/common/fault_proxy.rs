//! A TCP proxy that can cut the line: sluice talks to an emulator through it, and the test decides
//! when the network fails and how.
//!
//! Open, it forwards each connection to the upstream address, both ways. [`FaultProxy::cut`] ends
//! every connection in progress at once and then treats new ones as the [`Cut`] says: closed as
//! soon as they are accepted (a peer that went away), or accepted and never answered (a network
//! that swallows packets, which only a timeout notices). [`FaultProxy::restore`] lets new
//! connections through again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How a cut line behaves towards new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Accepted and closed at once.
    Refuse,
    /// Accepted and left unanswered until the line is restored, then closed.
    Blackhole,
}

const OPEN: u8 = 0;
const REFUSE: u8 = 1;
const BLACKHOLE: u8 = 2;

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

struct State {
    upstream: SocketAddr,
    mode: AtomicU8,
    /// Cancelled by a cut: ends the connections opened before it.
    live: Mutex<CancellationToken>,
    /// Cancelled by a restore: closes the connections held unanswered.
    held: Mutex<CancellationToken>,
    forwarded: AtomicU64,
    turned_away: AtomicU64,
}

impl FaultProxy {
    /// A proxy on a free loopback port, forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve the upstream")
            .next()
            .expect("an upstream address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            upstream,
            mode: AtomicU8::new(OPEN),
            live: Mutex::new(CancellationToken::new()),
            held: Mutex::new(CancellationToken::new()),
            forwarded: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        FaultProxy {
            addr,
            state,
            accept,
        }
    }

    /// `http://` and the proxy's address, for an `endpoint_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends every connection in progress; new ones are treated as `how` says until restored.
    pub fn cut(&self, how: Cut) {
        let mode = match how {
            Cut::Refuse => REFUSE,
            Cut::Blackhole => BLACKHOLE,
        };
        // Under the lock the accept loop takes to hand a connection the current line.
        let mut live = self.state.live.lock().expect("live");
        self.state.mode.store(mode, Ordering::SeqCst);
        std::mem::take(&mut *live).cancel();
    }

    /// Lets new connections through again, and closes those held unanswered.
    pub fn restore(&self) {
        self.state.mode.store(OPEN, Ordering::SeqCst);
        let previous = std::mem::take(&mut *self.state.held.lock().expect("held"));
        previous.cancel();
    }

    /// Connections turned away (closed or held) while the line was cut.
    pub fn turned_away(&self) -> u64 {
        self.state.turned_away.load(Ordering::SeqCst)
    }

    /// Connections forwarded while the line was open.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.live.lock().expect("live").cancel();
        self.state.held.lock().expect("held").cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let (mode, live) = {
            let live = state.live.lock().expect("live");
            (state.mode.load(Ordering::SeqCst), live.clone())
        };
        match mode {
            OPEN => {
                state.forwarded.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(inbound, state.upstream, live));
            }
            REFUSE => {
                state.turned_away.fetch_add(1, Ordering::SeqCst);
                drop(inbound);
            }
            _ => {
                state.turned_away.fetch_add(1, Ordering::SeqCst);
                let held = state.held.lock().expect("held").clone();
                tokio::spawn(async move {
                    held.cancelled().await;
                    drop(inbound);
                });
            }
        }
    }
}

/// Copies both ways until either side closes or the line is cut.
async fn forward(mut inbound: TcpStream, upstream: SocketAddr, live: CancellationToken) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = live.cancelled() => {}
    }
}
