//! Opening the store: bad input is refused with a clear error (unreachable server named by
//! address, a schema from a newer runlane, bad settings), and migrations are safe to run from
//! several openers at once.

mod common;

use runlane_core::backend::RunStore;
use runlane_core::{EnvName, QueueName, QueueSettings, Timestamp};
use runlane_postgres::{schema, PostgresConfig, PostgresError, PostgresStore};

#[tokio::test]
async fn an_unreachable_server_is_named_by_address() {
    // A loopback port nobody listens on (privileged: no test or service binds it).
    let port = 1;
    let mut config = PostgresConfig::new(format!("postgres://postgres@127.0.0.1:{port}/test"));
    config.acquire_timeout = std::time::Duration::from_secs(2);
    let err = PostgresStore::open(config)
        .await
        .expect_err("nothing listens there");
    let text = err.to_string();
    assert!(
        matches!(&err, PostgresError::Unreachable { address, .. } if address == &format!("127.0.0.1:{port}")),
        "{err:?}"
    );
    assert!(
        text.starts_with(&format!("cannot connect to postgresql at 127.0.0.1:{port}")),
        "{text}"
    );
}

#[tokio::test]
async fn bad_settings_name_the_field() {
    let mut config = common::config();
    config.schema = "Robert'); DROP TABLE runs;--".into();
    let err = PostgresStore::open(config).await.expect_err("bad schema");
    assert!(
        matches!(&err, PostgresError::Config(e) if e.field == "schema"),
        "{err:?}"
    );
    let err = PostgresStore::open(PostgresConfig::new("mysql://nope"))
        .await
        .expect_err("bad url");
    assert!(
        matches!(&err, PostgresError::Config(e) if e.field == "url"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_schema_from_a_newer_version_is_refused_naming_both_versions() {
    let config = common::config();
    let store = common::open(config.clone()).await;
    let url = common::url();
    // Stamp the schema as a future runlane would.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let newer = schema::schema_version() + 1;
    sqlx::query(&format!(
        "UPDATE \"{}\".runlane_schema SET version = $1",
        config.schema
    ))
    .bind(newer as i32)
    .execute(&mut conn)
    .await
    .expect("stamp");
    let err = PostgresStore::open(config.clone())
        .await
        .expect_err("a newer schema must be refused");
    match &err {
        PostgresError::SchemaTooNew {
            schema,
            found,
            supported,
        } => {
            assert_eq!(schema, &config.schema);
            assert_eq!(*found, newer);
            assert_eq!(*supported, schema::schema_version());
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&newer.to_string()) && text.contains(&schema::schema_version().to_string()),
        "{text}"
    );
    // Nothing was changed: the stamp is still the newer one.
    let still: i32 = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}\".runlane_schema",
        config.schema
    ))
    .fetch_one(&mut conn)
    .await
    .expect("read stamp");
    assert_eq!(still as u32, newer);
    common::finish(store).await;
}

#[tokio::test]
async fn concurrent_migrations_from_several_openers_all_succeed_once() {
    let config = common::config();
    common::sweep_dead().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let config = config.clone();
        tasks.push(tokio::spawn(
            async move { PostgresStore::open(config).await },
        ));
    }
    let mut stores = Vec::new();
    for t in tasks {
        let store = t
            .await
            .expect("open task")
            .expect("every concurrent open succeeds");
        stores.push(store);
    }
    // One schema stamp row, at the current version, and every opener sees the same tables.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&common::url())
        .await
        .expect("connect");
    let stamps: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}\".runlane_schema",
        config.schema
    ))
    .fetch_all(&mut conn)
    .await
    .expect("stamps");
    assert_eq!(stamps, vec![schema::schema_version() as i32]);
    let r = common::record(7);
    stores[0]
        .insert(vec![(r.clone(), None)], Timestamp(1))
        .await
        .expect("insert");
    for s in &stores {
        assert_eq!(s.get(r.id).await.expect("get"), Some(r.clone()));
    }
    let mut stores = stores.into_iter();
    let first = stores.next().expect("a store");
    drop(stores);
    common::finish(first).await;
}

/// Queue settings are upserted per (env, queue) and outlive the store: a reopen on the same
/// schema lists them, sorted by env then queue.
#[tokio::test]
async fn queue_settings_are_upserted_and_kept_across_a_reopen() {
    let config = common::config();
    let store = common::open(config.clone()).await;
    assert_eq!(store.queue_settings_all().await, Ok(Vec::new()));
    let (prod, dev) = (
        EnvName::new("prod").expect("env"),
        EnvName::new("dev").expect("env"),
    );
    let mail = QueueName::new("mail").expect("queue");
    let paused = QueueSettings {
        limit: Some(2),
        key_total_limit: Some(9),
        max_queued: Some(40),
        paused: true,
    };
    let puts = [
        (&prod, QueueSettings::default()),
        (&dev, QueueSettings::default()),
        (&prod, paused),
    ];
    for (env, settings) in puts {
        store
            .put_queue_settings(env, &mail, &settings)
            .await
            .expect("put");
    }
    drop(store);
    let store = common::open(config).await;
    assert_eq!(
        store.queue_settings_all().await,
        Ok(vec![
            (dev, mail.clone(), QueueSettings::default()),
            (prod, mail, paused),
        ])
    );
    common::finish(store).await;
}
