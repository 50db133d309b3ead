//! The child process of `runlane worker --exec`: one `sh -c CMD` per run attempt.
//!
//! The payload goes to its standard input as JSON; its standard output is the run's output
//! (JSON when it parses, else a JSON string) and its standard error, trimmed and bounded, is the
//! error of a failed attempt. The child leads its own process group, so a stop reaches whatever
//! the shell started: SIGTERM first, SIGKILL after the grace period. When the shell exits, the
//! rest of its group is killed too, so an attempt leaves no process behind. The command does not
//! see the worker's `RUNLANE_KEY`.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The most standard error kept for a failed attempt's error (its tail).
pub const STDERR_MAX_BYTES: usize = 4096;

/// What to run for each attempt.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The shell command (`sh -c`).
    pub command: String,
    /// How long a stopped child has between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// A request to stop a running child, sent through a `watch` channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Keep running.
    No,
    /// SIGTERM now, SIGKILL after the grace period (a cancelled or lost run).
    Term,
    /// SIGKILL now (the worker's own shutdown ran out of grace).
    Kill,
}

/// Which of our signals ended the child, if one did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It exited after SIGTERM, within the grace period.
    ByTerm,
    /// It was killed with SIGKILL.
    ByKill,
}

/// A finished child.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote on standard output.
    pub stdout: Vec<u8>,
    /// The tail of its standard error (at most [`STDERR_MAX_BYTES`]).
    pub stderr: Vec<u8>,
    /// Set when we stopped it.
    pub stopped: Option<Stopped>,
}

impl Finished {
    /// The attempt's result: the output on a zero exit, else the error text.
    pub fn result(&self) -> Result<Value, String> {
        if self.status.success() && self.stopped.is_none() {
            Ok(output_value(&self.stdout))
        } else {
            Err(error_text(&self.status, &self.stderr))
        }
    }
}

/// Standard output as the run's output: empty is `null`, JSON is itself, anything else a
/// string (trailing whitespace trimmed).
pub fn output_value(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(text.trim_end().to_string()))
}

/// A failed attempt's error: its standard error trimmed, or the exit status when it wrote none.
pub fn error_text(status: &ExitStatus, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if !text.is_empty() {
        return text.to_string();
    }
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exited abnormally".to_string(),
    }
}

/// Runs `spec.command` with `payload` on standard input and `env` added to the environment,
/// until it exits or `stop` asks it to.
pub async fn run(
    spec: &Spec,
    payload: &[u8],
    env: &[(&str, String)],
    mut stop: watch::Receiver<Stop>,
) -> std::io::Result<Finished> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&spec.command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        // The worker's API key is not the command's to use.
        .env_remove("RUNLANE_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let signal = |sig: Signal| {
        if let Some(g) = group {
            // ESRCH: the group is already gone, which is what we wanted.
            let _ = killpg(g, sig);
        }
    };

    // Standard input is written by its own task so a child that does not read it (or reads it
    // late) cannot block us; a broken pipe is the child's choice, not an error.
    let stdin_task = child.stdin.take().map(|mut stdin| {
        let payload = payload.to_vec();
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        })
    });
    let stdout_task = child
        .stdout
        .take()
        .map(|r| tokio::spawn(read_all(r, usize::MAX)));
    let stderr_task = child
        .stderr
        .take()
        .map(|r| tokio::spawn(read_all(r, STDERR_MAX_BYTES)));

    let mut stopped = None;
    let status = loop {
        let asked = *stop.borrow_and_update();
        match (asked, stopped) {
            (Stop::Kill, Some(Stopped::ByKill)) | (Stop::Term, Some(_)) | (Stop::No, _) => {}
            (Stop::Term, None) => {
                signal(Signal::SIGTERM);
                stopped = Some(Stopped::ByTerm);
            }
            (Stop::Kill, _) => {
                signal(Signal::SIGKILL);
                stopped = Some(Stopped::ByKill);
            }
        }
        let grace = async {
            if stopped == Some(Stopped::ByTerm) {
                tokio::time::sleep(spec.grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            status = child.wait() => break status?,
            changed = stop.changed() => {
                if changed.is_err() {
                    // Nobody can stop it any more: wait for it to end on its own.
                    break child.wait().await?;
                }
            }
            () = grace => {
                signal(Signal::SIGKILL);
                stopped = Some(Stopped::ByKill);
                break child.wait().await?;
            }
        }
    };
    // Whatever the shell left running in its group goes too, so its pipes close.
    signal(Signal::SIGKILL);
    if let Some(t) = stdin_task {
        let _ = t.await;
    }
    let stdout = match stdout_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let stderr = match stderr_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(Finished {
        status,
        stdout,
        stderr,
        stopped,
    })
}

/// Reads to the end, keeping the last `max` bytes (on a character boundary when cut).
async fn read_all(mut r: impl AsyncRead + Unpin, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut cut = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > max {
                    let excess = kept.len() - max;
                    kept.drain(..excess);
                    cut = true;
                }
            }
        }
    }
    if cut {
        // Drop a partial UTF-8 character at the start.
        let start = kept
            .iter()
            .position(|b| (*b & 0xC0) != 0x80)
            .unwrap_or(kept.len());
        kept.drain(..start);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::process::ExitStatusExt;

    fn spec(command: &str) -> Spec {
        Spec {
            command: command.to_string(),
            grace: Duration::from_millis(200),
        }
    }

    async fn run_to_end(command: &str, payload: &[u8], env: &[(&str, String)]) -> Finished {
        let (_tx, rx) = watch::channel(Stop::No);
        tokio::time::timeout(
            Duration::from_secs(30),
            run(&spec(command), payload, env, rx),
        )
        .await
        .expect("the child ends")
        .expect("the child starts")
    }

    #[tokio::test]
    async fn the_payload_is_on_stdin_and_stdout_is_the_output() {
        let f = run_to_end("cat", br#"{"n":1}"#, &[]).await;
        assert_eq!(f.result(), Ok(json!({"n": 1})));
        assert_eq!(f.stopped, None);
    }

    #[tokio::test]
    async fn text_output_is_a_string_and_env_is_passed() {
        let env = [
            ("RUNLANE_TASK", "email".to_string()),
            ("RUNLANE_ATTEMPT", "2".to_string()),
        ];
        let f = run_to_end("echo \"$RUNLANE_TASK try $RUNLANE_ATTEMPT\"", b"", &env).await;
        assert_eq!(f.result(), Ok(json!("email try 2")));
        let f = run_to_end("true", b"ignored", &[]).await;
        assert_eq!(f.result(), Ok(Value::Null));
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_stderr() {
        let f = run_to_end(
            "echo partial; echo '  boom: no mail server  ' >&2; exit 3",
            b"",
            &[],
        )
        .await;
        assert_eq!(f.status.code(), Some(3));
        assert_eq!(f.result(), Err("boom: no mail server".to_string()));
        let f = run_to_end("exit 4", b"", &[]).await;
        assert_eq!(f.result(), Err("exit status 4".to_string()));
    }

    #[tokio::test]
    async fn stderr_keeps_its_tail_within_the_bound() {
        let f = run_to_end(
            "i=0; while [ $i -lt 2000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 1",
            b"",
            &[],
        )
        .await;
        assert!(f.stderr.len() <= STDERR_MAX_BYTES, "{}", f.stderr.len());
        let err = f.result().expect_err("failed");
        assert!(err.ends_with("line 1999"), "{err}");
    }

    /// A fifo the child writes to once it is ready; reading it waits for that moment.
    struct Ready(std::path::PathBuf);

    impl Ready {
        fn new(name: &str) -> Ready {
            let path = std::env::temp_dir()
                .join(format!("runlane-child-{}-{name}.fifo", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let ok = std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .expect("mkfifo runs");
            assert!(ok.success(), "mkfifo failed");
            Ready(path)
        }

        async fn wait(&self) {
            let path = self.0.clone();
            tokio::time::timeout(
                Duration::from_secs(30),
                tokio::task::spawn_blocking(move || std::fs::read(path)),
            )
            .await
            .expect("the child got ready in time")
            .expect("the reader ran")
            .expect("the fifo reads");
        }
    }

    impl Drop for Ready {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Starts `sleep 1000` (ignoring SIGTERM when `ignore_term`), sends `stop` once it runs,
    /// and answers how it finished (within 30 s).
    async fn stopped(name: &str, ignore_term: bool, grace: Duration, stop: Stop) -> Finished {
        let ready = Ready::new(name);
        // `trap '' TERM` is inherited through exec: the sleep ignores SIGTERM.
        let trap = if ignore_term { "trap '' TERM; " } else { "" };
        let command = format!("{trap}echo > '{}'; exec sleep 1000", ready.0.display());
        let (tx, rx) = watch::channel(Stop::No);
        let spec = Spec { command, grace };
        let task = tokio::spawn(async move { run(&spec, b"", &[], rx).await });
        ready.wait().await;
        tx.send(stop).expect("the runner listens");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the child ends")
            .expect("the task ran")
            .expect("the child started")
    }

    #[tokio::test]
    async fn a_stop_sends_sigterm_first() {
        // A long grace: SIGTERM alone must end it.
        let f = stopped("term", false, Duration::from_secs(600), Stop::Term).await;
        assert_eq!(f.stopped, Some(Stopped::ByTerm));
        assert_eq!(f.status.signal(), Some(Signal::SIGTERM as i32));
        assert!(f.result().is_err());
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_gets_sigkill_after_the_grace() {
        let f = stopped("kill", true, Duration::from_millis(100), Stop::Term).await;
        assert_eq!(f.stopped, Some(Stopped::ByKill));
        assert_eq!(f.status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[tokio::test]
    async fn kill_does_not_wait_for_the_grace() {
        // The grace (600 s) is far beyond the 30 s the helper waits: only an immediate kill ends
        // the child in time.
        let f = stopped("now", true, Duration::from_secs(600), Stop::Kill).await;
        assert_eq!(f.stopped, Some(Stopped::ByKill));
    }

    #[test]
    fn output_parsing() {
        assert_eq!(output_value(b"  \n"), Value::Null);
        assert_eq!(output_value(b"42\n"), json!(42));
        assert_eq!(output_value(b"\"quoted\""), json!("quoted"));
        assert_eq!(output_value(b"hello world\n"), json!("hello world"));
        assert_eq!(output_value(b"{broken"), json!("{broken"));
    }
}
