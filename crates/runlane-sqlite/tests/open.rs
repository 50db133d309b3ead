//! Opening a data path: a file that is not ours is refused with a clear error and left
//! byte-for-byte unchanged; a second store on one path gets "already in use"; a database of a
//! newer schema is refused untouched; bad settings are refused naming the field.

mod common;

use std::path::Path;

use runlane_core::backend::RunStore;
use runlane_sqlite::schema::{schema_version, APPLICATION_ID};
use runlane_sqlite::{SqliteConfig, SqliteError, SqliteStore};
use rusqlite::Connection;

fn open_err(path: &Path) -> SqliteError {
    SqliteStore::open(path, common::config()).expect_err("open must refuse")
}

#[test]
fn a_text_file_is_refused_and_unchanged() {
    let dir = common::tempdir();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "shopping list\n- milk\n- bread\n").expect("write");
    let before = std::fs::read(&path).expect("read");
    let err = open_err(&path);
    assert!(matches!(err, SqliteError::NotADatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("not a sqlite database"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[test]
fn a_file_with_a_sqlite_header_but_garbage_is_refused_and_unchanged() {
    let dir = common::tempdir();
    let path = dir.path().join("broken.db");
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend((0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&path, &bytes).expect("write");
    let err = open_err(&path);
    assert!(
        matches!(
            err,
            SqliteError::NotADatabase { .. } | SqliteError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
}

fn foreign_db(path: &Path, application_id: Option<i32>) -> Vec<u8> {
    let conn = Connection::open(path).expect("create foreign db");
    conn.execute_batch(
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);
         INSERT INTO invoices (total) VALUES (9.5), (12.0);",
    )
    .expect("foreign schema");
    if let Some(id) = application_id {
        conn.pragma_update(None, "application_id", id)
            .expect("application id");
    }
    drop(conn);
    std::fs::read(path).expect("read")
}

#[test]
fn another_applications_database_is_refused_and_unchanged() {
    let dir = common::tempdir();
    let path = dir.path().join("other.db");
    let before = foreign_db(&path, Some(0x1234));
    let err = open_err(&path);
    match &err {
        SqliteError::Foreign {
            application_id,
            expected,
            ..
        } => {
            assert_eq!(*application_id, 0x1234);
            assert_eq!(*expected, APPLICATION_ID);
        }
        other => panic!("expected Foreign, got {other:?}"),
    }
    assert!(err.to_string().contains("another application"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), before);
    // Its data is intact and it is still in its own journal mode.
    let conn = Connection::open(&path).expect("reopen");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM invoices", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 2);
}

#[test]
fn a_database_without_our_application_id_is_refused_and_unchanged() {
    let dir = common::tempdir();
    let path = dir.path().join("plain.db");
    let before = foreign_db(&path, None);
    let err = open_err(&path);
    assert!(
        matches!(
            err,
            SqliteError::Foreign {
                application_id: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[tokio::test]
async fn a_newer_schema_is_refused_untouched() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let store = common::open(&path);
    store
        .put_env(&common::env("prod"), Default::default())
        .await
        .expect("put_env");
    drop(store);
    // A later runlane migrated this file further.
    let conn = Connection::open(&path).expect("raw");
    conn.pragma_update(None, "user_version", schema_version() + 1)
        .expect("bump version");
    drop(conn);
    let before = std::fs::read(&path).expect("read");
    let err = open_err(&path);
    match &err {
        SqliteError::SchemaTooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, schema_version() + 1);
            assert_eq!(*supported, schema_version());
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[tokio::test]
async fn a_second_store_on_one_path_is_refused_until_the_first_is_dropped() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let first = common::open(&path);
    let err = open_err(&path);
    assert!(matches!(err, SqliteError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("already in use"), "{err}");
    // The refused open did not disturb the first store.
    let prod = common::env("prod");
    first
        .put_env(&prod, Default::default())
        .await
        .expect("first still writes");
    drop(first);
    let second = common::open(&path);
    assert_eq!(
        second.envs().await.expect("envs").len(),
        1,
        "the second store sees the first one's data"
    );
}

#[tokio::test]
async fn a_new_database_is_stamped_as_ours_in_wal_mode() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let store = common::open(&path);
    assert_eq!(store.path(), path);
    let conn = Connection::open(&path).expect("raw");
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .expect("application_id");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(app as u32, APPLICATION_ID);
    assert_eq!(version as u32, schema_version());
    assert_eq!(mode, "wal");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .expect("tables")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("names");
    assert_eq!(
        tables,
        [
            "attempts",
            "current_versions",
            "envs",
            "idempotency_keys",
            "queue_settings",
            "runs",
            "schedule_cursors",
            "versions"
        ]
    );
    // Reopening an up-to-date database changes nothing and keeps working.
    drop(conn);
    drop(store);
    let store = common::open(&path);
    assert_eq!(store.current_version(&common::env("prod")).await, Ok(0));
    assert_eq!(store.earliest_finished_at().await, Ok(None));
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    for (config, field) in [
        (
            SqliteConfig {
                write_queue: 0,
                ..SqliteConfig::default()
            },
            "write_queue",
        ),
        (
            SqliteConfig {
                write_batch_max: 0,
                ..SqliteConfig::default()
            },
            "write_batch_max",
        ),
        (
            SqliteConfig {
                read_connections: 0,
                ..SqliteConfig::default()
            },
            "read_connections",
        ),
    ] {
        match SqliteStore::open(&path, config) {
            Err(SqliteError::Config(e)) => assert_eq!(e.field, field),
            other => panic!("expected a config error for {field}, got {other:?}"),
        }
    }
    assert!(!path.exists(), "nothing was created");
}
