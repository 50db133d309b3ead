//! Batched completions: the attempts this process's workers complete are ended many at a time,
//! one store call (one transaction, one commit) and one queue call for the whole batch.
//!
//! A worker whose handler completed sends the attempt's end here and waits for its own answer,
//! which comes only once its terminal write is durable and the queue has let go of the run, so
//! nothing changes for the caller but the cost. One task owned by the engine takes whatever is
//! waiting (up to [`BATCH_MAX`]) while the previous batches were being written (at most
//! [`IN_FLIGHT`] at once): under load the
//! batches grow by themselves, an idle engine ends one attempt at a time without waiting for
//! company. The channel needs no bound of its own: each workloop lets at most its slot count
//! of runs wait for their end.
//!
//! Per batch, in order (the order of a single completion, SPEC §7): leases are checked (a
//! zombie's completion is dropped; one the queue cannot check, or does not check within
//! [`QUEUE_WAIT`], is written, fenced by the store's attempt check), the store writes every end
//! (the first terminal write wins), the queue finishes every run whose end is written or was
//! already written (an ack not answered within [`QUEUE_WAIT`] is left to the lease's lapse),
//! then the terminal statuses are published.

use std::sync::{Arc, Weak};
use std::time::Duration;

use runlane_core::backend::{AttemptEnd, ClaimRequest, Effects, Leased};
use runlane_core::{EnvName, FencingToken, QueueError, RunId, RunStatus, StoreError, Timestamp};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::engine::Inner;
use crate::error::EngineError;

/// At most this many attempts are ended in one batch.
pub(crate) const BATCH_MAX: usize = 1024;

/// At most this many batches are being ended at once: while one waits for its commit, the
/// next is already checked and written (a store with several writers commits them side by
/// side). A run is in one batch only, so each run's steps keep their order.
const IN_FLIGHT: usize = 2;

/// How long a batch waits for the queue backend's lease check, and for its ack, before going on
/// without the answer. A queue backend may hold a call instead of failing it: Redis's connection
/// manager keeps the calls issued while it reconnects and runs them once it is back (seen
/// holding calls for 3.4 s through a cut). A lease check not answered in time counts as "queue
/// unavailable" (the end is written, fenced by attempt, as during an outage); an ack not
/// answered in time is left to the lease's lapse, whose recovery finds the run ended in the
/// store. Without the bound, two held acks kept every later end waiting until their leases had
/// lapsed: those ends were refused as a lost lease's and the runs ran again.
const QUEUE_WAIT: Duration = Duration::from_millis(500);

/// `call`'s answer, or `Unavailable` when it takes longer than [`QUEUE_WAIT`]. A call that
/// answers at its first poll (an in-process queue) arms no timer and reads no clock.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, QueueError>>,
) -> Result<T, QueueError> {
    let mut call = std::pin::pin!(call);
    if let Some(answer) = futures_util::FutureExt::now_or_never(call.as_mut()) {
        return answer;
    }
    match tokio::time::timeout(QUEUE_WAIT, call).await {
        Ok(answer) => answer,
        Err(_) => Err(QueueError::Unavailable(format!(
            "the queue backend did not answer the {what} within {QUEUE_WAIT:?}"
        ))),
    }
}

/// One completed attempt waiting for its end to be written.
pub(crate) struct Ending {
    pub(crate) env: EnvName,
    pub(crate) token: FencingToken,
    pub(crate) end: AttemptEnd,
    pub(crate) reply: oneshot::Sender<Result<(), EngineError>>,
}

/// The sending side, held by the engine.
pub(crate) struct Completer {
    tx: mpsc::UnboundedSender<Ending>,
}

impl Completer {
    /// A completer and the receiver its task serves.
    pub(crate) fn new() -> (Completer, mpsc::UnboundedReceiver<Ending>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Completer { tx }, rx)
    }

    /// Ends one completed attempt in the caller's task, without batching (a store whose
    /// writes cost no commit: the hop to the completer's task would cost more than it saves).
    /// The steps and answers of a batch of one, without its channel, reply and vectors.
    ///
    /// With `next`, the slot's next claim is made in the same queue step as the ack
    /// ([`QueueBackend::finish_then_claim`](runlane_core::backend::QueueBackend::finish_then_claim))
    /// once the end is written, and its leases answered (`None`: no claim was made, the ack
    /// failed or the end was not written; a claim that failed answers no leases). Only for a
    /// queue that leases in process (it answers at once): the step is bounded as an ack is,
    /// and a claim held past that bound would leave its leases to lapse.
    ///
    /// When the store writes without waiting ([`RunStore::finishes_now`]) and the queue can
    /// take the whole end in one step ([`QueueBackend::end_fenced`]), the lease check, the
    /// write, the ack and the claim are that one step, with the same answers.
    ///
    /// [`RunStore::finishes_now`]: runlane_core::backend::RunStore::finishes_now
    /// [`QueueBackend::end_fenced`]: runlane_core::backend::QueueBackend::end_fenced
    pub(crate) async fn end_now(
        inner: &Inner,
        env: &EnvName,
        token: FencingToken,
        end: AttemptEnd,
        next: Option<&ClaimRequest>,
    ) -> Result<Option<Vec<Leased>>, EngineError> {
        let (run, status, attempt) = (end.run, end.status, end.attempt.number);
        let ended = match one_step(inner, token, end, next)? {
            Ok(ended) => ended,
            Err(end) => in_steps(inner, token, end, next).await?,
        };
        match ended.acked {
            Some(Ok(effects)) => inner.apply(effects, None).await,
            Some(Err(e)) => inner.warn_queue_finish(run, &e),
            None => {}
        }
        settle(inner, ended.written, run, env, status, attempt, ended.now)?;
        Ok(ended.claimed)
    }

    /// Ends a completed attempt in the next batch; returns once its end is written (or was
    /// refused, or the attempt's lease was lost: `StaleToken`).
    pub(crate) async fn end(
        &self,
        env: &EnvName,
        token: FencingToken,
        end: AttemptEnd,
    ) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        let ending = Ending {
            env: env.clone(),
            token,
            end,
            reply,
        };
        if self.tx.send(ending).is_err() {
            return Err(EngineError::ShutDown);
        }
        answer.await.unwrap_or(Err(EngineError::ShutDown))
    }
}

/// The completer's task: up to [`IN_FLIGHT`] batches at a time, until the engine is gone.
pub(crate) async fn serve(engine: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Ending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut batches = JoinSet::new();
    while let Some(first) = rx.recv().await {
        // Waiting for a free batch slot lets the batch grow meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(ending) => batch.push(ending),
                Err(_) => break,
            }
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        while batches.try_join_next().is_some() {}
        batches.spawn(async move {
            end_batch(&inner, batch).await;
            drop(slot);
        });
    }
    // The engine is gone: let the batches in flight answer their callers.
    while batches.join_next().await.is_some() {}
}

async fn end_batch(inner: &Inner, batch: Vec<Ending>) {
    // A zombie never changes a run it lost: completions whose lease is gone are dropped (their
    // caller is answered `StaleToken`, as a single completion is).
    // All the batch's leases are checked in one call.
    let leases: Vec<(RunId, FencingToken)> = batch.iter().map(|e| (e.end.run, e.token)).collect();
    let checks = match bounded("lease check", inner.queue.check_leases(&leases)).await {
        Ok(checks) if checks.len() == batch.len() => checks,
        Ok(_) => {
            let e = QueueError::Unavailable("the queue answered a different count".into());
            vec![Err(e); batch.len()]
        }
        Err(e) => vec![Err(e); batch.len()],
    };
    let mut live: Vec<Ending> = Vec::with_capacity(batch.len());
    for (ending, check) in batch.into_iter().zip(checks) {
        match writes_on(check, ending.end.run) {
            Ok(()) => live.push(ending),
            Err(lost) => {
                let _ = ending.reply.send(Err(lost));
            }
        }
    }
    if live.is_empty() {
        return;
    }
    let now = inner.now();
    let ends: Vec<AttemptEnd> = live.iter().map(|e| e.end.clone()).collect();
    let written = match inner.store.finish_many(ends, now).await {
        Ok(answers) if answers.len() == live.len() => answers,
        Ok(_) => {
            let e = StoreError::Unavailable("the store answered a different count".into());
            answer_all(live, &e);
            return;
        }
        Err(e) => {
            answer_all(live, &e);
            return;
        }
    };
    // The queue lets go of every run whose terminal state is in the store (written now, or
    // by someone else first); a run whose end failed keeps its lease, which will lapse.
    let mut to_finish: Vec<(RunId, FencingToken)> = Vec::with_capacity(live.len());
    for (ending, answer) in live.iter().zip(&written) {
        if acks(answer) {
            to_finish.push((ending.end.run, ending.token));
        }
    }
    if !to_finish.is_empty() {
        match bounded("ack", inner.queue.finish_many(&to_finish, now)).await {
            Ok((answers, effects)) => {
                for ((run, _), answer) in to_finish.iter().zip(answers) {
                    if let Err(e) = answer {
                        inner.warn_queue_finish(*run, &e);
                    }
                }
                inner.apply(effects, None).await;
            }
            Err(e) => {
                for (run, _) in &to_finish {
                    inner.warn_queue_finish(*run, &e);
                }
            }
        }
    }
    for (ending, answer) in live.into_iter().zip(written) {
        let end = &ending.end;
        let reply = settle(
            inner,
            answer,
            end.run,
            &ending.env,
            end.status,
            end.attempt.number,
            now,
        );
        let _ = ending.reply.send(reply);
    }
}

/// Whether an end is written after its lease check. A lost lease drops it (a zombie never
/// changes a run it lost): its caller is answered the check's error (`StaleToken`), so the
/// attempt is not taken as settled and the lapse's recovery applies the retry policy (answered
/// `Ok`, the caller's process would take the attempt as ended and its own recovery of the lapse
/// would only clean the queue, leaving the run unfinished in the store). A queue that cannot be
/// reached cannot say: the end is written anyway, since the store fences terminal writes by
/// attempt (a run whose lease lapsed meanwhile has moved on to a later attempt and refuses it as
/// `StaleAttempt`), so a run that completed during a queue outage is not run again once its
/// lease lapses.
/// What the steps of one end did: the store's answer, the ack's (`None`: not acked), the
/// leases of the claim made with the ack, and the instant they were made at.
struct Ended {
    written: Result<(), StoreError>,
    acked: Option<Result<Effects, QueueError>>,
    claimed: Option<Vec<Leased>>,
    now: Timestamp,
}

/// The end in one step of an in-process queue, with a store that writes without waiting: the
/// lease check, the write and the ack (with the slot's next claim). `Ok(Err(end))`: not taken
/// (the store or the queue cannot, or the lease could not be checked), the end given back.
fn one_step(
    inner: &Inner,
    token: FencingToken,
    end: AttemptEnd,
    next: Option<&ClaimRequest>,
) -> Result<Result<Ended, AttemptEnd>, EngineError> {
    if !inner.store.finishes_now() {
        return Ok(Err(end));
    }
    let run = end.run;
    let now = inner.now();
    let mut end = Some(end);
    let mut written = None;
    let mut write = || {
        let Some(end) = end.take() else {
            return false;
        };
        let answer = inner.store.finish_now(end, now);
        let ack = acks(&answer);
        written = Some(answer);
        ack
    };
    let fenced = inner.queue.end_fenced(run, token, next, now, &mut write);
    match (fenced, written) {
        (Some(Ok(fenced)), Some(written)) => {
            let (acked, claimed) = match fenced.acked {
                Some(Ok((effects, leases))) => (Some(Ok(effects)), leases),
                Some(Err(e)) => (Some(Err(e)), None),
                None => (None, None),
            };
            Ok(Ok(Ended {
                written,
                acked,
                claimed,
                now,
            }))
        }
        (Some(Ok(_)), None) => Err(not_answered().into()),
        (Some(Err(e)), _) if !matches!(e, QueueError::Unavailable(_)) => Err(dropped(run, e)),
        _ => end.map(Err).ok_or_else(|| not_answered().into()),
    }
}

/// The end's steps one by one: the lease check (bounded), the store's write, then the ack
/// (bounded; with the slot's next claim when `next` is given) when the end is in the store.
async fn in_steps(
    inner: &Inner,
    token: FencingToken,
    end: AttemptEnd,
    next: Option<&ClaimRequest>,
) -> Result<Ended, EngineError> {
    let run = end.run;
    writes_on(
        bounded("lease check", inner.queue.check_lease(run, token)).await,
        run,
    )?;
    let now = inner.now();
    let written = match inner.store.finish_many(vec![end], now).await {
        Ok(answers) => match <[_; 1]>::try_from(answers) {
            Ok([answer]) => answer,
            Err(_) => {
                let e = StoreError::Unavailable("the store answered a different count".into());
                return Err(e.into());
            }
        },
        Err(e) => return Err(e.into()),
    };
    let mut claimed = None;
    let acked = if acks(&written) {
        Some(match next {
            Some(next) => {
                let call = inner.queue.finish_then_claim(run, token, next, now);
                bounded("ack", call).await.map(|(effects, leases)| {
                    claimed = Some(leases.unwrap_or_else(|e| {
                        // The slot goes back to its workloop, which claims with its backoff
                        // (as a failed claim of the slot's own does).
                        tracing::debug!(%run, error = %e, "the claim made with an ack failed");
                        Vec::new()
                    }));
                    effects
                })
            }
            None => bounded("ack", inner.queue.finish(run, token, now)).await,
        })
    } else {
        None
    };
    Ok(Ended {
        written,
        acked,
        claimed,
        now,
    })
}

fn writes_on(check: Result<(), QueueError>, run: RunId) -> Result<(), EngineError> {
    match check {
        Ok(()) => Ok(()),
        Err(QueueError::Unavailable(e)) => {
            tracing::debug!(%run, error = %e, "lease not checked (queue unavailable); the store fences the end");
            Ok(())
        }
        Err(e) => Err(dropped(run, e)),
    }
}

/// A completion refused by its lease check (the lease was lost): dropped, its error answered.
fn dropped(run: RunId, e: QueueError) -> EngineError {
    tracing::debug!(%run, error = %e, "completion after the lease was lost; dropped");
    e.into()
}

/// Whether a written end is acked in the queue: it was written, or the store had it already.
fn acks(written: &Result<(), StoreError>) -> bool {
    matches!(written, Ok(()) | Err(StoreError::AlreadyFinished { .. }))
}

/// A backend broke the one-step end's contract (said it wrote without calling the write, or
/// called the write and declined the step).
fn not_answered() -> StoreError {
    StoreError::Unavailable("the one-step end did not make its write".into())
}

/// The caller's answer for one written end: the run's terminal event is published when this
/// end was the one written. An end the store already had (a retried call) or one of an attempt
/// the run has moved past (its lease lapsed after the check: a zombie's end, the later
/// attempt's holder ends the run) is dropped without an error.
fn settle(
    inner: &Inner,
    written: Result<(), StoreError>,
    run: RunId,
    env: &EnvName,
    status: RunStatus,
    attempt: u32,
    now: Timestamp,
) -> Result<(), EngineError> {
    match written {
        Ok(()) => {
            inner.publish_finished(run, env, status, attempt, now);
            Ok(())
        }
        Err(StoreError::AlreadyFinished { .. }) => Ok(()),
        Err(StoreError::StaleAttempt { run, attempt, .. }) => {
            tracing::debug!(%run, attempt, "completion of a stale attempt; dropped");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn answer_all(live: Vec<Ending>, e: &StoreError) {
    for ending in live {
        let _ = ending.reply.send(Err(e.clone().into()));
    }
}
