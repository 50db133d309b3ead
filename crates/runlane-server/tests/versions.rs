//! Versions over HTTP: register (and the `/v1/versions` alias), list, show, promote; which
//! version a trigger takes with and without `version` (lock_to_version); who may do what; and
//! the precedence of task-defined queue limits over runtime admin changes.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_error, Shape, TestServer, ADMIN};

/// Triggers `task` in `prod` (optionally locked to `version`); answers the run as stored.
async fn trigger(s: &TestServer, task: &str, version: Option<u32>) -> Value {
    let mut body = json!({"task": task, "delay_ms": 3_600_000});
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    let (st, t) = s.post("/v1/envs/prod/runs", ADMIN, body).await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    run(s, t["run_id"].as_str().expect("run_id")).await
}

async fn run(s: &TestServer, id: &str) -> Value {
    let (st, run) = s.get(&format!("/v1/runs/{id}"), ADMIN).await;
    assert_eq!(st, StatusCode::OK, "{run}");
    run
}

/// (version, queue) of a run.
fn placed(run: &Value) -> (u64, String) {
    (
        run["version"].as_u64().expect("version"),
        run["queue"].as_str().expect("queue").to_string(),
    )
}

async fn list(s: &TestServer, key: &str) -> Value {
    let (st, body) = s.get("/v1/envs/prod/versions", key).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body
}

async fn workflow(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;

    let (st, v1) = s
        .post(
            "/v1/envs/prod/versions",
            ADMIN,
            json!({"tasks": [{"name": "email", "queue": "mail", "ttl": 60000}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v1}");
    assert_eq!(v1, json!({"version": 1, "promoted": false}));
    let (st, v2) = s
        .post(
            "/v1/versions",
            ADMIN,
            json!({"env": "prod", "promote": true,
                "tasks": [{"name": "email", "queue": "mail2", "retry": {"attempts_max": 7}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v2}");
    assert_eq!(v2, json!({"version": 2, "promoted": true}));

    // The list: by number, the current one marked, every default filled in.
    let listed = list(&s, ADMIN).await;
    assert_eq!(listed["current"], 2, "{listed}");
    let versions = listed["versions"].as_array().expect("versions");
    let numbers: Vec<u64> = versions
        .iter()
        .map(|v| v["version"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(
        versions
            .iter()
            .map(|v| v["current"].as_bool().expect("current"))
            .collect::<Vec<_>>(),
        [false, true]
    );
    let created: Vec<u64> = versions
        .iter()
        .map(|v| v["created_at_ms"].as_u64().expect("created_at_ms"))
        .collect();
    assert!(created[0] > 0 && created[0] <= created[1], "{created:?}");
    let email_v1 = &versions[0]["tasks"][0];
    assert_eq!(email_v1["name"], "email");
    assert_eq!(email_v1["queue"], "mail");
    assert_eq!(email_v1["ttl"], 60000);
    assert_eq!(email_v1["retry"]["attempts_max"], 3, "the default policy");
    assert_eq!(versions[1]["tasks"][0]["retry"]["attempts_max"], 7);

    // Show answers what the list holds; 0 is the implicit empty version.
    let (st, one) = s.get("/v1/envs/prod/versions/1", ADMIN).await;
    assert_eq!(st, StatusCode::OK, "{one}");
    assert_eq!(one, versions[0]);
    let (st, zero) = s.get("/v1/envs/prod/versions/0", ADMIN).await;
    assert_eq!(st, StatusCode::OK, "{zero}");
    assert_eq!(
        zero,
        json!({"version": 0, "created_at_ms": null, "current": false, "tasks": []})
    );
    let (st, body) = s.get("/v1/envs/prod/versions/3", ADMIN).await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");

    // A shown definition registers back to the same definition.
    let (st, v3) = s
        .post(
            "/v1/envs/prod/versions",
            ADMIN,
            json!({"tasks": one["tasks"].clone()}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v3}");
    let (_, three) = s.get("/v1/envs/prod/versions/3", ADMIN).await;
    assert_eq!(three["tasks"], one["tasks"]);

    // Triggers: unlocked take the current version, locked keep theirs.
    let unlocked_v2 = trigger(&s, "email", None).await;
    assert_eq!(placed(&unlocked_v2), (2, "mail2".into()));
    assert_eq!(unlocked_v2["locked"], false, "{unlocked_v2}");
    let locked_v1 = trigger(&s, "email", Some(1)).await;
    assert_eq!(placed(&locked_v1), (1, "mail".into()));
    assert_eq!(locked_v1["locked"], true, "{locked_v1}");
    assert_eq!(locked_v1["ttl_ms"], 60000, "v1's ttl");

    let (st, promoted) = s
        .call(
            Method::POST,
            "/v1/envs/prod/versions/1/promote",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{promoted}");
    assert_eq!(promoted, json!({"current": 1}));
    assert_eq!(list(&s, ADMIN).await["current"], 1);
    let unlocked_v1 = trigger(&s, "email", None).await;
    assert_eq!(placed(&unlocked_v1), (1, "mail".into()));
    let locked_v2 = trigger(&s, "email", Some(2)).await;
    assert_eq!(placed(&locked_v2), (2, "mail2".into()));
    // Runs triggered before the promotion keep the version they took.
    let id = unlocked_v2["id"].as_str().expect("id");
    assert_eq!(placed(&run(&s, id).await), (2, "mail2".into()));
    let (st, body) = s
        .call(
            Method::POST,
            "/v1/envs/prod/versions/9/promote",
            Some(ADMIN),
            None,
        )
        .await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(list(&s, ADMIN).await["current"], 1, "a refused promotion");

    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_show_promote_and_trigger_memory() {
    workflow(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_show_promote_and_trigger_embedded() {
    workflow(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_show_promote_and_trigger_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    workflow(Shape::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_but_only_admins_promote() {
    let s = TestServer::start(Shape::Memory).await;
    s.env("prod").await;
    let (_, worker) = s.key("worker", &["prod"]).await;
    let (_, env_key) = s.key("env", &["prod"]).await;
    let def = json!({"tasks": [{"name": "t"}]});

    let (st, body) = s.post("/v1/envs/prod/versions", &worker, def.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body, json!({"version": 1, "promoted": false}));
    let (st, body) = s
        .post(
            "/v1/envs/prod/versions",
            &worker,
            json!({"tasks": [{"name": "t"}], "promote": true}),
        )
        .await;
    assert_error(st, &body, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(body["error"]["field"], "promote");
    let (st, body) = s
        .call(
            Method::POST,
            "/v1/envs/prod/versions/1/promote",
            Some(&worker),
            None,
        )
        .await;
    assert_error(st, &body, StatusCode::FORBIDDEN, "forbidden");
    let (st, body) = s.post("/v1/envs/prod/versions", &env_key, def).await;
    assert_error(st, &body, StatusCode::FORBIDDEN, "forbidden");

    // Both read; nothing refused was stored or promoted.
    for key in [worker.as_str(), env_key.as_str()] {
        let listed = list(&s, key).await;
        assert_eq!(listed["current"], 0, "{listed}");
        assert_eq!(listed["versions"].as_array().expect("versions").len(), 1);
    }
    s.stop().await;
}

/// Settings of queue `q` in `prod`.
async fn queue(s: &TestServer, name: &str) -> Value {
    let (st, body) = s.get("/v1/envs/prod/queues", ADMIN).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no queue {name}: {body}"))
}

/// Registers and promotes `sync` in queue `sq` with these task settings.
async fn deploy(s: &TestServer, extra: Value) {
    let mut task = json!({"name": "sync", "queue": "sq"});
    for (k, v) in extra.as_object().expect("object") {
        task[k] = v.clone();
    }
    let (st, body) = s
        .post(
            "/v1/envs/prod/versions",
            ADMIN,
            json!({"tasks": [task], "promote": true}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

fn limits(q: &Value) -> (Value, Value, Value) {
    (
        q["limit"].clone(),
        q["key_total_limit"].clone(),
        q["max_queued"].clone(),
    )
}

async fn precedence(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    deploy(&s, json!({"queue_limit": 5})).await;
    assert_eq!(
        limits(&queue(&s, "sq").await),
        (json!(5), Value::Null, Value::Null)
    );

    // A runtime admin change.
    let (st, body) = s
        .patch(
            "/v1/envs/prod/queues/sq",
            ADMIN,
            json!({"limit": 2, "key_total_limit": 9, "max_queued": 50}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // A version that sets only key_total_limit replaces only that.
    deploy(&s, json!({"key_total_limit": 3})).await;
    assert_eq!(
        limits(&queue(&s, "sq").await),
        (json!(2), json!(3), json!(50))
    );
    // A version that sets nothing leaves everything.
    deploy(&s, json!({})).await;
    assert_eq!(
        limits(&queue(&s, "sq").await),
        (json!(2), json!(3), json!(50))
    );
    // A version that sets the limit takes it back from the admin.
    deploy(&s, json!({"queue_limit": 7})).await;
    assert_eq!(
        limits(&queue(&s, "sq").await),
        (json!(7), json!(3), json!(50))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_holds_until_a_version_sets_that_setting_memory() {
    precedence(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_holds_until_a_version_sets_that_setting_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    precedence(Shape::Distributed).await;
}
