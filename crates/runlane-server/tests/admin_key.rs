//! The first start creates an admin key (shown once); a restart on the same data keeps it and
//! creates none; `RUNLANE_ADMIN_KEY`'s value becomes an admin key.

use runlane_server::{BackendConfig, Server, ServerConfig};

fn config(dir: &std::path::Path, admin: Option<&str>) -> ServerConfig {
    let mut c = ServerConfig::new(BackendConfig::Embedded {
        data_dir: dir.to_path_buf(),
    });
    c.listen = "127.0.0.1:0".parse().expect("address");
    c.admin_key = admin.map(str::to_string);
    c.print_admin_key = false;
    c
}

async fn status(addr: std::net::SocketAddr, key: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .get(format!("http://{addr}/v1/keys"))
        .bearer_auth(key)
        .send()
        .await
        .expect("sent")
        .status()
}

/// Serves until the returned sender fires.
fn run(
    server: Server,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async move {
                let _ = rx.await;
            })
            .await
            .expect("serves");
    });
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_an_admin_key_once() {
    let dir = std::env::temp_dir().join(format!("runlane-admin-key-{}", std::process::id()));
    // A directory left by an earlier run with the same pid would hold its key already.
    let _ = std::fs::remove_dir_all(&dir);
    let server = Server::bind(config(&dir, None)).await.expect("starts");
    let key = server
        .created_admin_key()
        .expect("a first start creates an admin key")
        .to_string();
    assert!(key.starts_with("rl_") && key.len() > 40, "{key}");
    let addr = server.local_addr().expect("addr");
    let (stop, task) = run(server);
    assert_eq!(status(addr, &key).await, reqwest::StatusCode::OK);
    assert_eq!(
        status(addr, "rl_wrong").await,
        reqwest::StatusCode::UNAUTHORIZED
    );
    let _ = stop.send(());
    task.await.expect("stopped");

    // A restart keeps the key (stored hashed in keys.db) and creates none.
    let keys_db = std::fs::read(dir.join("keys.db")).expect("keys.db");
    assert!(
        !keys_db.windows(key.len()).any(|w| w == key.as_bytes()),
        "the key itself is never stored"
    );
    let server = Server::bind(config(&dir, None)).await.expect("restarts");
    assert!(server.created_admin_key().is_none());
    let addr = server.local_addr().expect("addr");
    let (stop, task) = run(server);
    assert_eq!(status(addr, &key).await, reqwest::StatusCode::OK);
    let _ = stop.send(());
    task.await.expect("stopped");

    // RUNLANE_ADMIN_KEY's value becomes an admin key (and none is created).
    let server = Server::bind(config(&dir, Some("rl_given_admin")))
        .await
        .expect("restarts");
    assert!(server.created_admin_key().is_none());
    let addr = server.local_addr().expect("addr");
    let (stop, task) = run(server);
    assert_eq!(
        status(addr, "rl_given_admin").await,
        reqwest::StatusCode::OK
    );
    assert_eq!(status(addr, &key).await, reqwest::StatusCode::OK);
    let _ = stop.send(());
    task.await.expect("stopped");
    let _ = std::fs::remove_dir_all(&dir);
}
