//! The dispatch library on a server that lost it (restarted without persistence, or its
//! functions flushed): the next call loads it again and answers as if nothing happened.

use crate::queue::RedisConfig;
use crate::test_support::{skip_without_redis, url};
use crate::RedisQueue;
use runlane_core::backend::QueueBackend;
use runlane_core::LaneName;

#[tokio::test]
async fn a_call_finding_the_library_gone_loads_it_again() {
    let config =
        RedisConfig::new(url()).with_prefix(format!("rl:test:fnlib:{}", std::process::id()));
    let Ok(queue) = RedisQueue::open(config).await else {
        skip_without_redis();
        return;
    };
    let queue = queue.delete_keys_on_drop();
    let client = redis::Client::open(url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    // Only this library: other versions' libraries on the shared server stay.
    let deleted: String = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(queue.library_name())
        .query_async(&mut conn)
        .await
        .expect("function delete");
    assert_eq!(deleted, "OK");
    assert!(queue
        .has_lane(&LaneName::default_lane())
        .await
        .expect("the call loads the library again"));
    let listed: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(queue.library_name())
        .query_async(&mut conn)
        .await
        .expect("function list");
    assert!(
        matches!(&listed, redis::Value::Array(libs) if !libs.is_empty()),
        "the library is loaded again: {listed:?}"
    );
}
