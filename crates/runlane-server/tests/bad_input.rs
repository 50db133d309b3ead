//! The bad-input list of issue 6 (the server's part; the worker protocol's cases live with
//! it): each is a 4xx in the one error shape, never a 5xx, and changes nothing (runs, queues,
//! envs, keys and lanes read the same before and after).

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Shape, TestServer, ADMIN};

/// Everything a bad call could have changed.
async fn snapshot(s: &TestServer) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/v1/envs/prod/runs?limit=1000",
        "/v1/envs/strict/runs?limit=1000",
        "/v1/envs/prod/queues",
        "/v1/envs/prod/versions",
        "/v1/envs",
        "/v1/keys",
        "/v1/lanes",
    ] {
        let (st, body) = s.get(path, ADMIN).await;
        assert_eq!(st, StatusCode::OK, "{path}: {body}");
        out.insert(path.to_string(), body);
    }
    Value::Object(out)
}

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: &'static str,
    body: String,
    status: StatusCode,
    code: &'static str,
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    body: impl Into<String>,
    status: StatusCode,
    code: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        content_type: "application/json",
        body: body.into(),
        status,
        code,
        field,
    }
}

async fn bad_input(shape: Shape) {
    let s = TestServer::start_with(shape, |c| {
        c.max_body_bytes = 64 * 1024;
        c.max_batch = 3;
    })
    .await;
    s.env("prod").await;
    let (st, body) = s
        .post(
            "/v1/envs",
            ADMIN,
            json!({"name": "strict", "strict_tasks": true}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (_, delayed) = s
        .post(
            "/v1/envs/prod/runs",
            ADMIN,
            json!({"task": "t", "delay_ms": 3600000}),
        )
        .await;
    let delayed = delayed["run_id"].as_str().expect("id").to_string();
    let (_, finished) = s
        .post(
            "/v1/envs/prod/runs",
            ADMIN,
            json!({"task": "t", "delay_ms": 3600000}),
        )
        .await;
    let finished = finished["run_id"].as_str().expect("id").to_string();
    let (st, _) = s
        .call(
            Method::POST,
            &format!("/v1/runs/{finished}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    let trig = "/v1/envs/prod/runs";
    let big = format!(
        "{{\"task\":\"t\",\"payload\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let batch =
        json!({"runs": [{"task": "t"}, {"task": "t"}, {"task": "t"}, {"task": "t"}]}).to_string();
    use StatusCode as S;
    let mut cases = vec![
        case(
            "malformed JSON",
            Method::POST,
            trig,
            "{\"task\": ",
            S::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        case(
            "wrong JSON shape",
            Method::POST,
            trig,
            "[1, 2]",
            S::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        case(
            "missing field",
            Method::POST,
            trig,
            "{}",
            S::BAD_REQUEST,
            "malformed_json",
            Some("task"),
        ),
        case(
            "unknown task in a strict env",
            Method::POST,
            "/v1/envs/strict/runs",
            "{\"task\":\"nope\"}",
            S::BAD_REQUEST,
            "unknown_task",
            Some("task"),
        ),
        case(
            "unknown lane",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"lane\":\"nope\"}",
            S::BAD_REQUEST,
            "unknown_lane",
            Some("lane"),
        ),
        case(
            "ttl 0",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"ttl_ms\":0}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("ttl_ms"),
        ),
        case(
            "ttl negative",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"ttl_ms\":-5}",
            S::BAD_REQUEST,
            "malformed_json",
            Some("ttl_ms"),
        ),
        case(
            "priority out of range",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"priority_ms\":99999999999}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("priority_ms"),
        ),
        case(
            "bad task name",
            Method::POST,
            trig,
            "{\"task\":\"no spaces allowed\"}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("task"),
        ),
        case(
            "body over the limit",
            Method::POST,
            trig,
            big,
            S::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            None,
        ),
        case(
            "batch over the limit",
            Method::POST,
            "/v1/envs/prod/runs/batch",
            batch,
            S::BAD_REQUEST,
            "batch_too_large",
            Some("runs"),
        ),
        case(
            "bad batch item",
            Method::POST,
            "/v1/envs/prod/runs/batch",
            "{\"runs\":[{\"task\":\"t\"},{\"task\":\"t\",\"ttl_ms\":0}]}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("runs[1].ttl_ms"),
        ),
        case(
            "unknown run id",
            Method::GET,
            "/v1/runs/run_0000000000000000000000000000ffff",
            "",
            S::NOT_FOUND,
            "not_found",
            None,
        ),
        case(
            "malformed run id",
            Method::POST,
            "/v1/runs/nope/cancel",
            "",
            S::NOT_FOUND,
            "not_found",
            None,
        ),
        case(
            "cancel of a finished run",
            Method::POST,
            format!("/v1/runs/{finished}/cancel"),
            "",
            S::CONFLICT,
            "already_finished",
            None,
        ),
        case(
            "reschedule of a finished run",
            Method::POST,
            format!("/v1/runs/{finished}/reschedule"),
            "{\"delay_ms\":5}",
            S::CONFLICT,
            "already_finished",
            None,
        ),
        case(
            "retry of an unfinished run",
            Method::POST,
            format!("/v1/runs/{delayed}/retry"),
            "",
            S::CONFLICT,
            "wrong_state",
            None,
        ),
        case(
            "unknown filter value",
            Method::GET,
            "/v1/envs/prod/runs?status=sideways",
            "",
            S::BAD_REQUEST,
            "invalid_input",
            Some("status"),
        ),
        case(
            "unknown filter",
            Method::GET,
            "/v1/envs/prod/runs?colour=red",
            "",
            S::BAD_REQUEST,
            "unknown_field",
            Some("colour"),
        ),
        case(
            "limit over 1000",
            Method::GET,
            "/v1/envs/prod/runs?limit=1001",
            "",
            S::BAD_REQUEST,
            "invalid_input",
            Some("limit"),
        ),
        case(
            "unknown JSON field",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"colour\":\"red\"}",
            S::BAD_REQUEST,
            "unknown_field",
            Some("colour"),
        ),
        case(
            "unknown field in retry",
            Method::POST,
            trig,
            "{\"task\":\"t\",\"retry\":{\"max_attempts\":2,\"x\":1}}",
            S::BAD_REQUEST,
            "unknown_field",
            Some("retry.x"),
        ),
        case(
            "unknown env",
            Method::POST,
            "/v1/envs/ghost/runs",
            "{\"task\":\"t\"}",
            S::NOT_FOUND,
            "not_found",
            None,
        ),
        case(
            "env settings out of range",
            Method::PATCH,
            "/v1/envs/prod",
            "{\"burst\":11}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("burst"),
        ),
        case(
            "env that exists",
            Method::POST,
            "/v1/envs",
            "{\"name\":\"prod\"}",
            S::CONFLICT,
            "conflict",
            Some("name"),
        ),
        case(
            "key for an unknown env",
            Method::POST,
            "/v1/keys",
            "{\"role\":\"env\",\"envs\":[\"ghost\"]}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("envs"),
        ),
        case(
            "unknown role",
            Method::POST,
            "/v1/keys",
            "{\"role\":\"root\",\"envs\":[]}",
            S::BAD_REQUEST,
            "malformed_json",
            Some("role"),
        ),
        case(
            "unknown key id",
            Method::POST,
            "/v1/keys/key_nope/revoke",
            "",
            S::NOT_FOUND,
            "not_found",
            None,
        ),
        case(
            "queue max_queued 0",
            Method::PATCH,
            "/v1/envs/prod/queues/q",
            "{\"max_queued\":0}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("max_queued"),
        ),
        case(
            "wait timeout over the cap",
            Method::POST,
            "/v1/envs/prod/runs/wait",
            "{\"task\":\"t\",\"timeout_ms\":300001}",
            S::BAD_REQUEST,
            "invalid_input",
            Some("timeout_ms"),
        ),
    ];
    cases.push(case(
        "bad env name",
        Method::POST,
        "/v1/envs",
        "{\"name\":\"no spaces\"}",
        S::BAD_REQUEST,
        "invalid_input",
        Some("name"),
    ));
    cases.push(case(
        "bad lane name",
        Method::POST,
        "/v1/lanes",
        "{\"name\":\"no spaces\"}",
        S::BAD_REQUEST,
        "invalid_input",
        Some("name"),
    ));
    let reg = "/v1/envs/prod/versions";
    for (name, path, body, status, code, field) in [
        (
            "version: duplicate task name",
            reg,
            r#"{"tasks":[{"name":"a"},{"name":"a"}]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "tasks",
        ),
        (
            "version: unknown task option",
            reg,
            r#"{"tasks":[{"name":"a","colour":"red"}]}"#,
            S::BAD_REQUEST,
            "unknown_field",
            "tasks[0].colour",
        ),
        (
            "version: unknown retry option",
            reg,
            r#"{"tasks":[{"name":"a","retry":{"tries":2}}]}"#,
            S::BAD_REQUEST,
            "unknown_field",
            "tasks[0].retry.tries",
        ),
        (
            "version: unknown body field",
            reg,
            r#"{"tasks":[],"colour":"red"}"#,
            S::BAD_REQUEST,
            "unknown_field",
            "colour",
        ),
        (
            "version: retry min over max",
            reg,
            r#"{"tasks":[{"name":"a"},{"name":"b","retry":{"min":5000,"max":10}}]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "tasks[1].retry.min",
        ),
        (
            "version: queue limit out of range",
            reg,
            r#"{"tasks":[{"name":"a","queue_limit":1000001}]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "tasks[0].queue_limit",
        ),
        (
            "version: key_total_limit out of range",
            reg,
            r#"{"tasks":[{"name":"a","key_total_limit":1000001}]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "tasks[0].key_total_limit",
        ),
        (
            "version: negative limit",
            reg,
            r#"{"tasks":[{"name":"a","queue_limit":-1}]}"#,
            S::BAD_REQUEST,
            "malformed_json",
            "tasks[0].queue_limit",
        ),
        (
            "version: zero ttl",
            reg,
            r#"{"tasks":[{"name":"a","ttl":0}]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "tasks[0].ttl",
        ),
        (
            "version: bad task name",
            reg,
            r#"{"tasks":[{"name":"no spaces"}]}"#,
            S::BAD_REQUEST,
            "malformed_json",
            "tasks[0].name",
        ),
        (
            "version: bad queue name",
            reg,
            r#"{"tasks":[{"name":"a","queue":"no spaces"}]}"#,
            S::BAD_REQUEST,
            "malformed_json",
            "tasks[0].queue",
        ),
        (
            "version: missing tasks",
            reg,
            r#"{"promote":true}"#,
            S::BAD_REQUEST,
            "malformed_json",
            "tasks",
        ),
        (
            "version: missing env (alias)",
            "/v1/versions",
            r#"{"tasks":[]}"#,
            S::BAD_REQUEST,
            "malformed_json",
            "env",
        ),
        (
            "version: bad env name (alias)",
            "/v1/versions",
            r#"{"env":"no spaces","tasks":[]}"#,
            S::BAD_REQUEST,
            "invalid_input",
            "env",
        ),
        (
            "version: promote a version number that is not one",
            "/v1/envs/prod/versions/first/promote",
            "",
            S::BAD_REQUEST,
            "invalid_input",
            "version",
        ),
    ] {
        cases.push(case(
            name,
            Method::POST,
            path,
            body,
            status,
            code,
            Some(field),
        ));
    }
    for (name, method, path, body) in [
        (
            "version: unknown env",
            Method::POST,
            reg.replace("prod", "ghost"),
            r#"{"tasks":[{"name":"a"}]}"#,
        ),
        (
            "version: unknown env (alias)",
            Method::POST,
            "/v1/versions".to_string(),
            r#"{"env":"ghost","tasks":[{"name":"a"}]}"#,
        ),
        (
            "version: list of an unknown env",
            Method::GET,
            "/v1/envs/ghost/versions".to_string(),
            "",
        ),
        (
            "version: unknown version",
            Method::GET,
            "/v1/envs/prod/versions/7".to_string(),
            "",
        ),
        (
            "version: promote of an unknown version",
            Method::POST,
            "/v1/envs/prod/versions/7/promote".to_string(),
            "",
        ),
    ] {
        cases.push(case(
            name,
            method,
            path,
            body,
            S::NOT_FOUND,
            "not_found",
            None,
        ));
    }
    let mut wrong_type = case(
        "wrong content type",
        Method::POST,
        trig,
        "{\"task\":\"t\"}",
        S::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    wrong_type.content_type = "text/plain";
    cases.push(wrong_type);

    let before = snapshot(&s).await;
    for c in &cases {
        let mut req = s
            .client
            .request(c.method.clone(), format!("{}{}", s.base, c.path))
            .bearer_auth(ADMIN);
        if !c.body.is_empty() {
            req = req
                .header("content-type", c.content_type)
                .body(c.body.clone());
        }
        let resp = req.send().await.expect("sent");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{}: not JSON: {text}", c.name));
        assert!(status.is_client_error(), "{}: {status} {body}", c.name);
        assert_eq!(status, c.status, "{}: {body}", c.name);
        assert_eq!(body["error"]["code"], c.code, "{}: {body}", c.name);
        assert!(body["error"]["message"].is_string(), "{}: {body}", c.name);
        if let Some(field) = c.field {
            assert_eq!(body["error"]["field"], field, "{}: {body}", c.name);
        }
    }
    let after = snapshot(&s).await;
    assert_eq!(before, after, "a refused call changed something");
    println!(
        "bad input ({shape:?}): {} cases, each a 4xx, nothing changed",
        cases.len()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_memory() {
    bad_input(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_embedded() {
    bad_input(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    bad_input(Shape::Distributed).await;
}
