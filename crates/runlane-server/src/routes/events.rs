//! Server-Sent Events of one run and of one env.
//!
//! Every engine event is an SSE event whose `id` is the engine's event sequence number
//! (increasing, per server process), `event` is `status` or `progress`, and `data` is JSON
//! (`{seq, run_id, env, at_ms, status, attempt}` or `{seq, run_id, env, at_ms, progress}`).
//!
//! **A new subscriber** of a run first gets `event: snapshot` (the run as `GET /v1/runs/{id}`
//! answers it, no id), then the run's latest progress, then every event as it happens; the
//! stream ends after the run's terminal status. A new subscriber of an env gets the env's
//! events from now on.
//!
//! **Resuming** (`Last-Event-ID: n`): the stream first replays the events after `n` that the
//! server still holds (the last 1,024 of the env, kept while somebody follows the env and
//! for up to a minute after), then goes on live, never repeating an event at or before `n`.
//! When the server no longer holds every event after `n` (too old, or the server
//! restarted), a run stream starts like a new subscriber's (snapshot first) and an env
//! stream sends `event: reset` first. A slow env subscriber that falls behind gets
//! `event: lagged` (`{lost}`) and may reconnect with its last id.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use runlane::{RunEvent, RunEventKind, RunEvents};
use serde_json::json;
use tokio::sync::broadcast;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::events::Following;
use crate::routes::runs::{visible_run, Run};
use crate::state::AppState;

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(run_events))
        .routes(routes!(env_events))
}

/// `Last-Event-ID` as a number (400 naming the header when it is not one).
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be an event id of this API"))
}

/// One engine event as an SSE event.
pub fn sse_event(e: &RunEvent) -> Event {
    let (kind, data) = match &e.kind {
        RunEventKind::Status { status, attempt } => (
            "status",
            json!({"seq": e.seq, "run_id": e.run.to_string(), "env": e.env.as_str(),
                "at_ms": e.at.as_millis(), "status": status.as_str(), "attempt": attempt}),
        ),
        RunEventKind::Progress(p) => (
            "progress",
            json!({"seq": e.seq, "run_id": e.run.to_string(), "env": e.env.as_str(),
                "at_ms": e.at.as_millis(),
                "progress": serde_json::from_str::<serde_json::Value>(p)
                    .unwrap_or_else(|_| serde_json::Value::String(p.to_string()))}),
        ),
    };
    let event = Event::default().event(kind).data(data.to_string());
    // Synthesized events (seq 0, a resync after lag) carry no id.
    if e.seq == 0 {
        event
    } else {
        event.id(e.seq.to_string())
    }
}

fn keep_alive() -> KeepAlive {
    KeepAlive::new().interval(Duration::from_secs(15))
}

struct RunStream {
    pending: VecDeque<Event>,
    sub: RunEvents,
    last: u64,
    done: bool,
    closed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    _following: Following,
}

/// A run's events (admin, or an env key of the run's env); see the module doc for resume.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "events",
    params(("id" = String, Path, description = "The run's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", body = String),
        (status = "4XX", body = ErrorBody)))]
async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = last_event_id(&headers)?;
    let record = visible_run(&state, &caller, &id).await?;
    let engine = state.engine();
    // Follow the env first (its buffer then holds what the subscription may race with),
    // subscribe second, read the buffer and the run last.
    let following = state.events().follow(engine, record.env.as_str())?;
    let sub = engine.subscribe(record.id).await?;
    let mut pending = VecDeque::new();
    let mut last = 0;
    let mut resumed = false;
    if let Some(after) = after {
        let (events, complete) = following.since(after);
        if complete {
            resumed = true;
            last = after;
            for e in events.iter().filter(|e| e.run == record.id) {
                pending.push_back(sse_event(e));
                last = last.max(e.seq);
            }
        }
    }
    if !resumed {
        let now = engine.get(record.id).await?;
        let data = serde_json::to_string(&Run::from(now)).unwrap_or_default();
        pending.push_back(Event::default().event("snapshot").data(data));
    }
    let init = RunStream {
        pending,
        sub,
        last,
        done: false,
        closed: Box::pin(state.closed()),
        _following: following,
    };
    let stream = stream::unfold(init, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            tokio::select! {
                next = s.sub.next() => match next {
                    Some(e) if e.seq != 0 && e.seq <= s.last => continue,
                    Some(e) => {
                        s.last = s.last.max(e.seq);
                        s.done = e.is_terminal();
                        return Some((Ok(sse_event(&e)), s));
                    }
                    None => return None,
                },
                () = &mut s.closed => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(keep_alive()))
}

struct EnvStream {
    pending: VecDeque<Event>,
    rx: broadcast::Receiver<RunEvent>,
    last: u64,
    closed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    _following: Following,
}

/// Every run event of an env (admin, or an env key of `env`); see the module doc for resume.
#[utoipa::path(get, path = "/v1/envs/{env}/events", tag = "events",
    params(("env" = String, Path, description = "The env"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", body = String),
        (status = "4XX", body = ErrorBody)))]
async fn env_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require_env(&env)?;
    let after = last_event_id(&headers)?;
    let engine = state.engine();
    engine.env_settings(&env).await?;
    let following = state.events().follow(engine, &env)?;
    let rx = following.receiver();
    let mut pending = VecDeque::new();
    let mut last = 0;
    if let Some(after) = after {
        let (events, complete) = following.since(after);
        if !complete {
            pending.push_back(
                Event::default()
                    .event("reset")
                    .data(json!({"reason": "events after Last-Event-ID are gone"}).to_string()),
            );
        }
        last = after;
        for e in &events {
            pending.push_back(sse_event(e));
            last = last.max(e.seq);
        }
    }
    let init = EnvStream {
        pending,
        rx,
        last,
        closed: Box::pin(state.closed()),
        _following: following,
    };
    let stream = stream::unfold(init, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            tokio::select! {
                next = s.rx.recv() => match next {
                    Ok(e) if e.seq <= s.last => continue,
                    Ok(e) => {
                        s.last = e.seq;
                        return Some((Ok(sse_event(&e)), s));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let data = json!({"lost": n}).to_string();
                        return Some((Ok(Event::default().event("lagged").data(data)), s));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = &mut s.closed => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(keep_alive()))
}
