//! The per-run record the dispatch script keeps, and the script's answers, as MessagePack.
//!
//! A record is a 23-element MessagePack array (see `dispatch.lua` for the field numbers): the
//! dispatch facts with names as strings, the place (`d`elayed, `q`ueued in a key's zset, `Q`
//! queued in a key's list, `r`eady, `l`eased), the ready sequence and the lease fields. Absent
//! values are `false`. A list-resident run (format 3) has no stored record: `live`, `snapshot`
//! and `tick` answer its list entry decoded into the same array (place `Q`). The script and this
//! module are the only readers and writers.

use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use runlane_core::backend::{Dispatch, LeaseInfo, LiveRun};
use runlane_core::{
    EnvName, FencingToken, LaneName, QueueError, QueueName, RunId, RunStatus, Timestamp, WorkerId,
};

/// Number of fields of a record.
const FIELDS: usize = 23;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Packs the dispatch facts of a run not yet placed (the script fills in the rest).
pub(crate) fn pack_new(d: &Dispatch) -> Vec<u8> {
    let opt = |v: Option<u64>| v.map_or(Value::Boolean(false), Value::from);
    let mut fields: Vec<Value> = vec![
        Value::from(d.env.as_str()),
        Value::from(d.queue.as_str()),
        Value::from(&*d.key),
        Value::from(d.lane.as_str()),
        Value::from(ms(d.priority)),
        Value::from(d.run_after.as_millis()),
        opt(d.ttl_deadline.map(|t| t.as_millis())),
        Value::from(d.attempt),
        opt(d.locked_version.map(u64::from)),
        Value::Boolean(d.ever_leased),
        opt(d.max_duration.map(ms)),
    ];
    fields.resize(FIELDS, Value::Boolean(false));
    let mut out = Vec::with_capacity(96);
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &Value::Array(fields));
    out
}

/// A malformed answer from the script: a bug or a foreign key space, never silently misread.
pub(crate) fn malformed(what: &str) -> QueueError {
    QueueError::Unavailable(format!("malformed answer from the dispatch script: {what}"))
}

/// Decodes MessagePack bytes.
pub(crate) fn decode(bytes: &[u8]) -> Result<Value, QueueError> {
    let mut cursor = bytes;
    rmpv::decode::read_value(&mut cursor).map_err(|e| malformed(&e.to_string()))
}

/// Value helpers.
pub(crate) trait ValueExt {
    /// The bytes of a string or binary value.
    fn bytes(&self) -> Result<&[u8], QueueError>;
    /// The text of a string value.
    fn text(&self) -> Result<&str, QueueError>;
    /// An integer (integral floats accepted).
    fn int(&self) -> Result<i64, QueueError>;
    /// An integer or `None` for `false`/nil.
    fn opt_int(&self) -> Result<Option<i64>, QueueError>;
    /// The elements of an array (an empty map counts as empty).
    fn list(&self) -> Result<&[Value], QueueError>;
    /// Whether a value is truthy in Lua terms.
    fn truthy(&self) -> bool;
}

impl ValueExt for Value {
    fn bytes(&self) -> Result<&[u8], QueueError> {
        match self {
            Value::String(s) => Ok(s.as_bytes()),
            Value::Binary(b) => Ok(b),
            _ => Err(malformed("expected a string")),
        }
    }

    fn text(&self) -> Result<&str, QueueError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| malformed("expected utf-8 text"))
    }

    fn int(&self) -> Result<i64, QueueError> {
        match self {
            Value::Integer(i) => i
                .as_i64()
                .or_else(|| i.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
                .ok_or_else(|| malformed("integer out of range")),
            Value::F64(f) if f.fract() == 0.0 => Ok(*f as i64),
            Value::F32(f) if f.fract() == 0.0 => Ok(*f as i64),
            _ => Err(malformed("expected an integer")),
        }
    }

    fn opt_int(&self) -> Result<Option<i64>, QueueError> {
        match self {
            Value::Boolean(false) | Value::Nil => Ok(None),
            v => v.int().map(Some),
        }
    }

    fn list(&self) -> Result<&[Value], QueueError> {
        match self {
            Value::Array(a) => Ok(a),
            Value::Map(m) if m.is_empty() => Ok(&[]),
            _ => Err(malformed("expected an array")),
        }
    }

    fn truthy(&self) -> bool {
        !matches!(self, Value::Boolean(false) | Value::Nil)
    }
}

/// Reads a 16-byte run id.
pub(crate) fn run_id(v: &Value) -> Result<RunId, QueueError> {
    let b = v.bytes()?;
    let arr: [u8; 16] = b
        .try_into()
        .map_err(|_| malformed("run id is not 16 bytes"))?;
    Ok(RunId::from_bytes(arr))
}

fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

/// A decoded record.
pub(crate) struct Record {
    pub(crate) dispatch: Dispatch,
    pub(crate) place: u8,
    pub(crate) token: Option<u64>,
    pub(crate) worker: Option<u64>,
    pub(crate) lease_deadline: Option<Timestamp>,
    pub(crate) attempt_deadline: Option<Timestamp>,
    pub(crate) cancel_requested_at: Option<Timestamp>,
    pub(crate) lapsed: bool,
}

/// Decodes a packed record of run `id`.
pub(crate) fn unpack(id: RunId, bytes: &[u8]) -> Result<Record, QueueError> {
    let v = decode(bytes)?;
    let mut f = v.list()?.to_vec();
    if f.len() < 12 {
        return Err(malformed("short record"));
    }
    // Trailing absent fields are not stored.
    f.resize(FIELDS.max(f.len()), Value::Boolean(false));
    let name_err = |_| malformed("bad name in record");
    let dispatch = Dispatch {
        run_id: id,
        env: EnvName::new(f[0].text()?).map_err(name_err)?,
        queue: QueueName::new(f[1].text()?).map_err(name_err)?,
        key: Arc::from(f[2].text()?),
        lane: LaneName::new(f[3].text()?).map_err(name_err)?,
        priority: Duration::from_millis(u64::try_from(f[4].int()?).unwrap_or(0)),
        run_after: ts(f[5].int()?),
        ttl_deadline: f[6].opt_int()?.map(ts),
        attempt: u32::try_from(f[7].int()?).map_err(|_| malformed("attempt"))?,
        locked_version: f[8]
            .opt_int()?
            .map(|v| u32::try_from(v).map_err(|_| malformed("version")))
            .transpose()?,
        ever_leased: f[9].truthy(),
        max_duration: f[10]
            .opt_int()?
            .map(|v| Duration::from_millis(u64::try_from(v).unwrap_or(0))),
    };
    let place = f[11]
        .bytes()
        .ok()
        .and_then(|b| b.first().copied())
        .unwrap_or(b'q');
    let worker = match &f[16] {
        Value::Boolean(false) | Value::Nil => None,
        v => Some(
            v.text()?
                .parse::<u64>()
                .map_err(|_| malformed("worker id"))?,
        ),
    };
    Ok(Record {
        dispatch,
        place,
        token: f[15].opt_int()?.map(|t| u64::try_from(t).unwrap_or(0)),
        worker,
        lease_deadline: f[18].opt_int()?.map(ts),
        attempt_deadline: f[19].opt_int()?.map(ts),
        cancel_requested_at: f[20].opt_int()?.map(ts),
        lapsed: f[22].truthy(),
    })
}

impl Record {
    /// The status its place means.
    pub(crate) fn status(&self) -> RunStatus {
        match self.place {
            b'd' => RunStatus::Delayed,
            b'r' => RunStatus::Ready,
            b'l' => RunStatus::Executing,
            _ => RunStatus::Queued,
        }
    }

    /// The run as `live`/`snapshot` report it.
    pub(crate) fn live(self) -> LiveRun {
        let status = self.status();
        let lease = match (self.place, self.token, self.lease_deadline) {
            (b'l', Some(token), Some(deadline)) => Some(LeaseInfo {
                token: FencingToken(token),
                worker: WorkerId(self.worker.unwrap_or(0)),
                deadline,
                cancel_requested_at: self.cancel_requested_at,
                lapsed: self.lapsed,
            }),
            _ => None,
        };
        LiveRun {
            dispatch: self.dispatch,
            status,
            lease,
        }
    }
}

/// Parses a status name the script uses.
pub(crate) fn status(v: &Value) -> Result<RunStatus, QueueError> {
    Ok(match v.text()? {
        "delayed" => RunStatus::Delayed,
        "queued" => RunStatus::Queued,
        "ready" => RunStatus::Ready,
        "executing" => RunStatus::Executing,
        other => return Err(malformed(&format!("unknown status {other}"))),
    })
}
