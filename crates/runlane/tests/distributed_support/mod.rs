//! Shared by the distributed tests: a cuttable loopback TCP proxy, to make Redis or
//! PostgreSQL unreachable without touching the shared servers.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// A loopback TCP proxy to a server (Redis, PostgreSQL) that can be cut: while cut, every open
/// connection is closed and new ones are refused, as if the server were unreachable.
pub struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    cuts: mpsc::UnboundedSender<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, mut cut_requests) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let task = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut links = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((mut client, _)) = accepted else { continue };
                            if cut.load(Ordering::SeqCst) {
                                drop(client);
                                continue;
                            }
                            let upstream = upstream.clone();
                            links.spawn(async move {
                                if let Ok(mut server) = TcpStream::connect(&upstream).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                }
                            });
                        }
                        Some(done) = cut_requests.recv() => {
                            // Every link is aborted and joined (its sockets closed) before the
                            // cut is acknowledged: nothing sent after `cut` returns gets through.
                            links.shutdown().await;
                            let _ = done.send(());
                        }
                        Some(_) = links.join_next(), if !links.is_empty() => {}
                    }
                }
            })
        };
        Proxy {
            port,
            cut,
            cuts,
            task,
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every open connection and refuses new ones; returns once every open connection
    /// is closed, so a request sent afterwards cannot reach the server.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let (done, closed) = oneshot::channel();
        if self.cuts.send(done).is_ok() {
            let _ = closed.await;
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `(user@, host:port, /db)` of a `postgres://` URL.
pub fn split_url(url: &str) -> (String, String, String) {
    let rest = url
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let (host, db) = match rest.split_once('/') {
        Some((host, db)) => (host.to_string(), format!("/{db}")),
        None => (rest.to_string(), String::new()),
    };
    (user, host, db)
}
