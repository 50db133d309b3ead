//! `PostgresStore::get_many`: one query for many runs, answered in the order asked, `None` for
//! a run not stored, each record exactly as `get` answers it (kept starts overlaid).

mod common;

use runlane_core::backend::RunStore;
use runlane_core::{RunId, Timestamp};

#[tokio::test]
async fn many_runs_are_read_in_the_order_asked() {
    let store = common::open(common::config()).await;
    let runs = common::insert_records(&store, 3).await;
    store.note_start(runs[0].id, 1, Timestamp(5));
    let unknown = RunId(9 << 100);
    let asked = [runs[2].id, unknown, runs[0].id, runs[1].id];
    let got = store.get_many(&asked).await.expect("get_many");
    let mut one_by_one = Vec::new();
    for &run in &asked {
        one_by_one.push(store.get(run).await.expect("get"));
    }
    assert_eq!(got, one_by_one);
    assert_eq!(
        got.iter()
            .map(|r| r.as_ref().map(|r| r.id))
            .collect::<Vec<_>>(),
        vec![Some(runs[2].id), None, Some(runs[0].id), Some(runs[1].id)]
    );
    assert_eq!(
        got[2].as_ref().and_then(|r| r.started_at),
        Some(Timestamp(5)),
        "a kept start is overlaid"
    );
    assert!(store.get_many(&[]).await.expect("empty").is_empty());
    // One run asked (the single-run statement): the same answers.
    assert_eq!(
        store.get_many(&[runs[0].id]).await.expect("one"),
        vec![one_by_one[2].clone()]
    );
    assert_eq!(
        store.get_many(&[unknown]).await.expect("one unknown"),
        vec![None]
    );
    common::finish(store).await;
}
