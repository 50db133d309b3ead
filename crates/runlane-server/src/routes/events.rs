//! Server-Sent Events of one run and of one env.
//!
//! Every engine event is an SSE event whose `id` is `{boot}-{seq}` (`seq`: the engine's event
//! sequence number, increasing), `event` is `status` or `progress`, and `data` is JSON
//! (`{seq, run_id, env, at_ms, status, attempt}` or `{seq, run_id, env, at_ms, progress}`).
//!
//! **A new subscriber** of a run first gets `event: snapshot` (the run as `GET /v1/runs/{id}`
//! answers it, no id), then the run's latest progress, then every event as it happens; the
//! stream ends after the run's terminal status. A new subscriber of an env gets the env's
//! events from now on.
//!
//! `boot` marks this server process: engine sequence numbers start again at each start.
//!
//! **Resuming** (`Last-Event-ID`): the stream first replays the events after that id that the
//! server still holds (the last 1,024 of the env, kept while somebody follows the env and
//! for up to a minute after), then goes on live, never repeating an event at or before it.
//! When the server cannot tell that it holds every event after the id (too old, nothing
//! held, or an id of another server process), a run stream starts like a new subscriber's
//! (snapshot first) and an env stream sends `event: reset` first. A slow env subscriber that falls behind gets
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
use crate::util::JsonText;

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(run_events))
        .routes(routes!(env_events))
}

/// Where a `Last-Event-ID` points.
enum Resume {
    /// No header: a new subscriber.
    Fresh,
    /// After this sequence number of this server process.
    After(u64),
    /// An id of another server process (a restart): nothing of it can be resumed.
    Elsewhere,
}

/// Reads `Last-Event-ID` (`{boot}-{seq}`; 400 naming the header when it is not one).
fn resume(headers: &HeaderMap, boot: u64) -> Result<Resume, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(Resume::Fresh);
    };
    let parsed = value.to_str().ok().and_then(|v| {
        let (b, s) = v.trim().split_once('-')?;
        Some((b.parse::<u64>().ok()?, s.parse::<u64>().ok()?))
    });
    match parsed {
        Some((b, seq)) if b == boot => Ok(Resume::After(seq)),
        Some(_) => Ok(Resume::Elsewhere),
        None => Err(ApiError::invalid(
            "Last-Event-ID",
            "must be an event id of this API",
        )),
    }
}

/// The `data` of a progress event: the progress text as the handler sent it.
#[derive(serde::Serialize)]
struct ProgressData<'a> {
    seq: u64,
    run_id: String,
    env: &'a str,
    at_ms: u64,
    progress: JsonText,
}

/// One engine event as an SSE event (id `{boot}-{seq}`).
pub fn sse_event(e: &RunEvent, boot: u64) -> Event {
    let (kind, data) = match &e.kind {
        RunEventKind::Status { status, attempt } => (
            "status",
            json!({"seq": e.seq, "run_id": e.run.to_string(), "env": e.env.as_str(),
                "at_ms": e.at.as_millis(), "status": status.as_str(), "attempt": attempt})
            .to_string(),
        ),
        RunEventKind::Progress(p) => (
            "progress",
            serde_json::to_string(&ProgressData {
                seq: e.seq,
                run_id: e.run.to_string(),
                env: e.env.as_str(),
                at_ms: e.at.as_millis(),
                progress: JsonText::from_text(p),
            })
            .unwrap_or_default(),
        ),
    };
    let event = Event::default().event(kind).data(data);
    // Synthesized events (seq 0, a resync after lag) carry no id.
    if e.seq == 0 {
        event
    } else {
        event.id(format!("{boot}-{}", e.seq))
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
    let boot = state.events().boot();
    let resume = resume(&headers, boot)?;
    let record = visible_run(&state, &caller, &id).await?;
    let engine = state.engine();
    // Follow the env first (its buffer then holds what the subscription may race with),
    // subscribe second, read the buffer and the run last.
    let following = state.events().follow(engine, record.env.as_str())?;
    let sub = engine.subscribe(record.id).await?;
    let mut pending = VecDeque::new();
    let mut last = 0;
    let mut resumed = false;
    if let Resume::After(after) = resume {
        let (events, complete) = following.since(after);
        if complete {
            resumed = true;
            last = after;
            for e in events.iter().filter(|e| e.run == record.id) {
                pending.push_back(sse_event(e, boot));
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
    let stream = stream::unfold(init, move |mut s| async move {
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
                        return Some((Ok(sse_event(&e, boot)), s));
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
    let boot = state.events().boot();
    let resume = resume(&headers, boot)?;
    let engine = state.engine();
    engine.env_settings(&env).await?;
    let following = state.events().follow(engine, &env)?;
    let rx = following.receiver();
    let mut pending = VecDeque::new();
    let mut last = 0;
    let reset = || {
        Event::default()
            .event("reset")
            .data(json!({"reason": "events after Last-Event-ID are gone"}).to_string())
    };
    match resume {
        Resume::Fresh => {}
        Resume::Elsewhere => pending.push_back(reset()),
        Resume::After(after) => {
            let (events, complete) = following.since(after);
            if !complete {
                pending.push_back(reset());
            }
            last = after;
            for e in &events {
                pending.push_back(sse_event(e, boot));
                last = last.max(e.seq);
            }
        }
    }
    let init = EnvStream {
        pending,
        rx,
        last,
        closed: Box::pin(state.closed()),
        _following: following,
    };
    let stream = stream::unfold(init, move |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            tokio::select! {
                next = s.rx.recv() => match next {
                    Ok(e) if e.seq <= s.last => continue,
                    Ok(e) => {
                        s.last = e.seq;
                        return Some((Ok(sse_event(&e, boot)), s));
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
