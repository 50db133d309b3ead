//! Schema administration outside a running store: listing and dropping runlane schemas (test
//! isolation, tooling). Each call opens one short-lived connection.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::config::validate_schema;
use crate::error::PostgresError;

async fn connect(url: &str) -> Result<(sqlx::PgConnection, String), PostgresError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| runlane_core::InvalidInput::new("url", e.to_string()))?
        .disable_statement_logging();
    let address = format!("{}:{}", options.get_host(), options.get_port());
    match options.connect().await {
        Ok(conn) => Ok((conn, address)),
        Err(e) => Err(PostgresError::Unreachable {
            address,
            reason: e.to_string(),
        }),
    }
}

/// Schemas whose name starts with `prefix` and that hold a runlane schema stamp.
pub async fn schemas(url: &str, prefix: &str) -> Result<Vec<String>, PostgresError> {
    let listing: Boxed<'_, Vec<String>> = Box::pin(schemas_inner(url, prefix));
    listing.await
}

/// A boxed `Send` future (sqlx's executor bounds defeat `Send` proofs of callers otherwise).
type Boxed<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, PostgresError>> + Send + 'a>>;

async fn schemas_inner(url: &str, prefix: &str) -> Result<Vec<String>, PostgresError> {
    let (mut conn, address) = connect(url).await?;
    let names: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT table_schema::text FROM information_schema.tables \
         WHERE table_name = 'runlane_schema' AND starts_with(table_schema::text, $1) \
         ORDER BY 1",
    )
    .bind(prefix)
    .fetch_all(&mut conn)
    .await;
    let _ = conn.close().await;
    names.map_err(|source| PostgresError::Postgres {
        address,
        schema: format!("{prefix}*"),
        source,
    })
}

/// Drops a schema and everything in it (`DROP SCHEMA ... CASCADE`); a missing one is fine.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), PostgresError> {
    let dropping: Boxed<'_, ()> = Box::pin(drop_schema_inner(url, schema));
    dropping.await
}

async fn drop_schema_inner(url: &str, schema: &str) -> Result<(), PostgresError> {
    validate_schema(schema)?;
    let (mut conn, address) = connect(url).await?;
    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let dropped = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
    let _ = conn.close().await;
    dropped
        .map(|_| ())
        .map_err(|source| PostgresError::Postgres {
            address,
            schema: schema.to_string(),
            source,
        })
}
