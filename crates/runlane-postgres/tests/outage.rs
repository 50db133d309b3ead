//! An outage between the store and PostgreSQL: a tiny TCP proxy in the test is cut (every
//! connection closed, new ones refused) and restored. While it is cut, writes and reads fail
//! with `Unavailable`; once it is back, the same store recovers by itself (no reopen), and
//! nothing acknowledged was lost.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{Inserted, RunStore};
use runlane_core::{RunStatus, StoreError, Timestamp};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// A loopback TCP proxy to the test server that can be cut and restored. A cut closes every
/// open connection before it returns, so nothing sent afterwards reaches the server.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cuts: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, mut cut_requests) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let accepting = up.clone();
        tokio::spawn(async move {
            let mut links = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { return };
                        if !accepting.load(Ordering::SeqCst) {
                            // Cut: refuse by closing at once.
                            drop(inbound);
                            continue;
                        }
                        links.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(target).await {
                                let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    Some(done) = cut_requests.recv() => {
                        links.shutdown().await;
                        let _ = done.send(());
                    }
                    Some(_) = links.join_next(), if !links.is_empty() => {}
                }
            }
        });
        Proxy { addr, up, cuts }
    }

    async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let (done, closed) = oneshot::channel();
        if self.cuts.send(done).is_ok() {
            let _ = closed.await;
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn target() -> SocketAddr {
    // The test server's address from the URL (loopback only).
    let url = common::url();
    let rest = url.split('@').nth(1).unwrap_or("127.0.0.1:5432/test");
    let hostport = rest.split('/').next().unwrap_or("127.0.0.1:5432");
    hostport
        .parse()
        .expect("RUNLANE_DATABASE_URL must name host:port as an ip address")
}

#[tokio::test]
async fn calls_fail_with_unavailable_during_an_outage_and_recover_by_themselves() {
    let proxy = Proxy::start(target()).await;
    let mut config = common::config();
    config.url = format!("postgres://postgres@{}/test", proxy.addr);
    config.acquire_timeout = Duration::from_millis(500);
    config.commit_timeout = Duration::from_secs(2);
    let store = common::open(config.clone()).await;
    let (r1, r2) = (common::record(1), common::record(2));
    assert_eq!(
        store.insert(vec![(r1.clone(), None)], Timestamp(1)).await,
        Ok(vec![Inserted::New])
    );

    proxy.cut().await;
    let write = store.insert(vec![(r2.clone(), None)], Timestamp(2)).await;
    assert!(
        matches!(write, Err(StoreError::Unavailable(_))),
        "{write:?}"
    );
    let finish = store
        .finish(r1.id, RunStatus::Completed, None, None, Timestamp(3))
        .await;
    assert!(
        matches!(finish, Err(StoreError::Unavailable(_))),
        "{finish:?}"
    );
    let read = store.get(r1.id).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(store.ping().await.is_err());
    assert!(store.stats().failed_batches >= 2);

    proxy.restore();
    // The pool reconnects on its own: wait (bounded) for the first call that goes through.
    let mut tries = 0;
    let inserted = loop {
        tries += 1;
        match store.insert(vec![(r2.clone(), None)], Timestamp(4)).await {
            Ok(answer) => break answer,
            Err(StoreError::Unavailable(_)) if tries < 100 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    };
    assert_eq!(inserted, vec![Inserted::New]);
    store.ping().await.expect("ping after the outage");
    // What was acknowledged before the outage is there; what failed was not half-written.
    assert_eq!(store.get(r1.id).await.expect("get"), Some(r1.clone()));
    let done = store
        .finish(r1.id, RunStatus::Completed, None, None, Timestamp(5))
        .await
        .expect("finish after the outage");
    assert_eq!(done.finished_at, Some(Timestamp(5)));
    assert_eq!(
        store.get(r2.id).await.expect("get").map(|r| r.id),
        Some(r2.id)
    );
    common::finish(store).await;
}
