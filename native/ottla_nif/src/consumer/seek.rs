//! The seek thread: carries out the partitions' `Effect::Seek`s and reports librdkafka's
//! answer to each, so that a seek counts as done only once librdkafka confirms it.
//!
//! Why a thread: librdkafka reports a seek's outcome only to a reply queue, and
//! `rd_kafka_seek_partitions` with a timeout waits for it. A seek made while a partition's
//! fetcher has not started yet (it waits for the group's committed offsets after an
//! assignment) is refused with `__STATE`; without a reply queue that refusal is silent, and
//! fetching then starts at `auto.offset.reset`. Waiting here keeps the poll thread (which
//! serves rebalances) free. A refused or failed seek is reported as `Event::SeekFailed` after a
//! short backoff, and the partition's state machine asks for it again if it still wants it.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ottla_core::partition::{Event, OFFSET_BEGINNING, OFFSET_END};
use rdkafka::bindings as rd;
use rdkafka::{Offset, TopicPartitionList};

use super::{Shared, Tp};
use crate::atoms;
use crate::context::log;

/// How long one seek may wait for librdkafka's answer.
const SEEK_WAIT: Duration = Duration::from_secs(5);
/// The first wait before a refused seek is reported (and so asked again); it doubles up to
/// `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_millis(500);
/// How often the thread looks at the stop flag while idle.
const IDLE: Duration = Duration::from_millis(100);

/// The client handle, used from the seek thread. librdkafka's API is thread-safe; the poll
/// thread joins this thread before it destroys the client.
pub struct Client(pub *mut rd::rd_kafka_t);

// SAFETY: see the type's doc: librdkafka's handle may be used from any thread, and it
// outlives the seek thread.
unsafe impl Send for Client {}

/// A seek for the partition `Tp` as held under a generation: its answer goes to that
/// assignment only (a partition revoked and assigned again meanwhile has seeks of its own).
pub struct Request {
    pub tp: Tp,
    pub generation: i32,
    pub offset: i64,
}

pub type Requests = Sender<Request>;

pub fn run(client: Client, shared: Arc<Shared>, requests: Receiver<Request>) {
    // Refused seeks waiting to be reported, and how long each partition waits next time.
    let mut refused: Vec<(Instant, Request)> = Vec::new();
    let mut waits: std::collections::HashMap<Tp, Duration> = Default::default();
    loop {
        if shared.stop.load(Ordering::SeqCst) && refused.is_empty() {
            return;
        }
        let now = Instant::now();
        let due: Vec<Request> = {
            let (due, later): (Vec<_>, Vec<_>) = refused.drain(..).partition(|r| r.0 <= now);
            refused = later;
            due.into_iter().map(|(_, r)| r).collect()
        };
        if !due.is_empty() {
            let mut st = shared.lock();
            for r in due {
                answer(&mut st, &r, Event::SeekFailed { offset: r.offset });
            }
            drop(st);
            // A seek asked for again goes through the poll thread.
            shared.wake.notify();
        }
        if shared.stop.load(Ordering::SeqCst) {
            // Stopping: nothing more is sought; the refusals above were handed over.
            return;
        }
        let next = refused
            .iter()
            .map(|r| r.0.saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE)
            .min(IDLE);
        let request = match requests.recv_timeout(next) {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let (tp, offset) = (&request.tp, request.offset);
        match seek(&client, tp, offset) {
            Ok(()) => {
                waits.remove(tp);
                answer(&mut shared.lock(), &request, Event::SeekDone { offset });
                shared.work.notify();
                shared.wake.notify();
            }
            Err(reason) => {
                let wait = waits.get(tp).copied().unwrap_or(FIRST_RETRY);
                waits.insert(tp.clone(), (wait * 2).min(MAX_RETRY));
                log(
                    atoms::debug(),
                    "SEEK",
                    &format!(
                        "seek of {}/{} to {offset} not done ({reason}); asked again in {} ms",
                        tp.0,
                        tp.1,
                        wait.as_millis()
                    ),
                );
                refused.push((Instant::now() + wait, request));
            }
        }
    }
}

/// Hands librdkafka's answer to the assignment that asked.
fn answer(st: &mut super::State, request: &Request, event: Event<super::Msg>) {
    let ours = st
        .partitions
        .get(&request.tp)
        .is_some_and(|s| s.part.generation() == request.generation);
    if ours {
        st.handle(&request.tp, event);
    }
}

/// Seeks one partition and waits for librdkafka's answer.
fn seek(client: &Client, tp: &Tp, offset: i64) -> Result<(), String> {
    let to = match offset {
        OFFSET_BEGINNING => Offset::Beginning,
        OFFSET_END => Offset::End,
        o => Offset::Offset(o),
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&tp.0, tp.1, to)
        .map_err(|e| e.to_string())?;
    // SAFETY: the client is live (see `Client`); `tpl` outlives the call, which writes each
    // element's error into it; a returned error object is ours to destroy.
    let error =
        unsafe { rd::rd_kafka_seek_partitions(client.0, tpl.ptr(), SEEK_WAIT.as_millis() as i32) };
    if !error.is_null() {
        // SAFETY: a non-null error returned by librdkafka, destroyed once.
        let text = unsafe {
            let text = std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error))
                .to_string_lossy()
                .into_owned();
            rd::rd_kafka_error_destroy(error);
            text
        };
        return Err(text);
    }
    match tpl.elements().first().map(|e| e.error()) {
        Some(Ok(())) => Ok(()),
        Some(Err(err)) => Err(err.to_string()),
        None => Err("no answer".into()),
    }
}
