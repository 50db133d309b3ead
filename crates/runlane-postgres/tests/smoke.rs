//! A first end-to-end check: insert, read back, finish.
mod common;
use runlane_core::backend::{Inserted, RunStore};
use runlane_core::{RunStatus, Timestamp};

#[tokio::test]
async fn smoke() {
    let store = common::open(common::config()).await;
    let r = common::record(1);
    let out = store
        .insert(vec![(r.clone(), None)], Timestamp(1))
        .await
        .expect("insert");
    assert_eq!(out, vec![Inserted::New]);
    assert_eq!(store.get(r.id).await.expect("get"), Some(r.clone()));
    let done = store
        .finish(
            r.id,
            RunStatus::Completed,
            Some("1".into()),
            None,
            Timestamp(5),
        )
        .await
        .expect("finish");
    assert_eq!(done.status, RunStatus::Completed);
    common::finish(store).await;
}
