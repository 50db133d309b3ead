//! Opening the distributed shape when a server does not answer: the error names the server's
//! address, and a throwaway deployment (tests, `runlane bench`) leaves nothing behind, its
//! schema included, although PostgreSQL had answered and the schema had been made.
//! PostgreSQL (`RUNLANE_DATABASE_URL`) is required.

mod redis_support;

use sqlx::Connection;

async fn schema_exists(schema: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(&redis_support::database_url())
        .await
        .expect("postgresql is required for this test (RUNLANE_DATABASE_URL)");
    let found: Option<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = $1")
            .bind(schema)
            .fetch_optional(&mut conn)
            .await
            .expect("read the schemas");
    found.is_some()
}

#[tokio::test]
async fn a_throwaway_deployment_whose_redis_does_not_answer_leaves_no_schema() {
    // Nothing listens on port 1 of the loopback address.
    let config = redis_support::distributed_config("redis://127.0.0.1:1".into(), "open_no_redis");
    let schema = config.postgres.schema.clone();
    let err = match runlane::distributed_with(runlane::EngineBuilder::new(), config).await {
        Ok(_) => panic!("opened without redis"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("127.0.0.1:1"), "the error names redis: {err}");
    assert!(
        !schema_exists(&schema).await,
        "the throwaway schema {schema} was left behind"
    );

    // The same deployment kept (not throwaway) keeps its schema: the open made it.
    let mut kept = redis_support::distributed_config("redis://127.0.0.1:1".into(), "open_no_redis");
    kept.throwaway = false;
    let schema = kept.postgres.schema.clone();
    assert!(
        runlane::distributed_with(runlane::EngineBuilder::new(), kept)
            .await
            .is_err()
    );
    assert!(schema_exists(&schema).await, "{schema} was made");
    runlane_postgres_drop(&schema).await;
}

async fn runlane_postgres_drop(schema: &str) {
    let mut conn = sqlx::PgConnection::connect(&redis_support::database_url())
        .await
        .expect("connect");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await
        .expect("drop the kept schema");
}
