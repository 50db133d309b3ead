//! Shared by the distributed tests: a cuttable loopback TCP proxy, to make Redis or
//! PostgreSQL unreachable without touching the shared servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// A loopback TCP proxy to a server (Redis, PostgreSQL) that can be cut: while cut, every open
/// connection is closed and new ones are refused, as if the server were unreachable.
pub struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    cut_now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_now = Arc::new(Notify::new());
        let task = {
            let (cut, cut_now) = (cut.clone(), cut_now.clone());
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
                        _ = cut_now.notified() => links.abort_all(),
                        Some(_) = links.join_next(), if !links.is_empty() => {}
                    }
                }
            })
        };
        Proxy {
            port,
            cut,
            cut_now,
            task,
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_now.notify_one();
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
