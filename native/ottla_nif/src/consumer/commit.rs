//! Asynchronous commits. Each commit is sent with a reply queue of its own
//! (`rd_kafka_commit_queue`), and its result is picked up later without blocking the poll
//! thread: intake and rebalances go on while the coordinator answers. An offset counts as
//! committed only when Kafka confirmed it. Revoke and shutdown wait for their commit, with a
//! bound.

use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::Tp;

/// One commit on its way: its reply queue and what it commits.
struct Pending {
    queue: *mut rd::rd_kafka_queue_t,
    offsets: Vec<(Tp, i64)>,
}

// SAFETY: librdkafka's queues are reference-counted and locked internally; a queue handle may
// be polled and destroyed from any thread. Only the poll thread uses it, under a mutex.
unsafe impl Send for Pending {}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: the queue was created by rd_kafka_queue_new and is destroyed once. A reply
        // that arrives later is dropped by librdkafka.
        unsafe { rd::rd_kafka_queue_destroy(self.queue) };
    }
}

/// The outcome of one partition's commit.
pub struct Outcome {
    pub tp: Tp,
    pub offset: i64,
    pub ok: bool,
    pub error: Option<String>,
}

/// The commits in flight. Must be dropped before the consumer they were sent with.
#[derive(Default)]
pub struct Commits {
    pending: Vec<Pending>,
}

impl Commits {
    /// Sends a commit of `offsets` (next offsets to read). On an immediate failure, returns
    /// its outcomes at once.
    pub fn start<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        offsets: Vec<(Tp, i64)>,
    ) -> Vec<Outcome> {
        if offsets.is_empty() {
            return Vec::new();
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is live while `consumer` is; the queue is owned by `Pending`.
        let queue = unsafe { rd::rd_kafka_queue_new(rk) };
        if queue.is_null() {
            return failed(offsets, "could not create a reply queue");
        }
        let pending = Pending { queue, offsets };
        // SAFETY: `tpl` and `queue` are valid; librdkafka copies the list. Without a callback
        // the result comes back as an event on `queue`.
        let err =
            unsafe { rd::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut()) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let offsets = pending.offsets.clone();
            return failed(offsets, &error_text(err));
        }
        self.pending.push(pending);
        Vec::new()
    }

    /// Which of `tps` have a commit still waiting for Kafka's answer.
    pub fn unconfirmed(&self, tps: &[Tp]) -> Vec<Tp> {
        let mut out: Vec<Tp> = self
            .pending
            .iter()
            .flat_map(|p| p.offsets.iter().map(|(tp, _)| tp))
            .filter(|tp| tps.contains(tp))
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Collects the results of finished commits, waiting up to `wait` for all of them.
    pub fn collect(&mut self, wait: Duration) -> Vec<Outcome> {
        // `wait` is one of this module's constants or zero.
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut still = Vec::new();
        for pending in self.pending.drain(..) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: the queue is live until `pending` drops.
            let event = unsafe { rd::rd_kafka_queue_poll(pending.queue, ms) };
            if event.is_null() {
                still.push(pending);
                continue;
            }
            read_event(event, &pending.offsets, &mut out);
            // SAFETY: the event came from rd_kafka_queue_poll and is destroyed once.
            unsafe { rd::rd_kafka_event_destroy(event) };
        }
        self.pending = still;
        out
    }
}

fn failed(offsets: Vec<(Tp, i64)>, why: &str) -> Vec<Outcome> {
    offsets
        .into_iter()
        .map(|(tp, offset)| Outcome {
            tp,
            offset,
            ok: false,
            error: Some(why.to_string()),
        })
        .collect()
}

fn error_text(err: rd::rd_kafka_resp_err_t) -> String {
    // SAFETY: rd_kafka_err2str returns a static NUL-terminated string for any code.
    unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(err)) }
        .to_string_lossy()
        .into_owned()
}

/// Reads a commit result event: the whole commit's error, then each partition's.
fn read_event(event: *mut rd::rd_kafka_event_t, sent: &[(Tp, i64)], out: &mut Vec<Outcome>) {
    // SAFETY: `event` is a live event.
    let err = unsafe { rd::rd_kafka_event_error(event) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        out.extend(failed(sent.to_vec(), &error_text(err)));
        return;
    }
    // SAFETY: owned by the event, valid until it is destroyed; null when absent.
    let list = unsafe { rd::rd_kafka_event_topic_partition_list(event) };
    if list.is_null() {
        out.extend(sent.iter().map(|(tp, offset)| Outcome {
            tp: tp.clone(),
            offset: *offset,
            ok: true,
            error: None,
        }));
        return;
    }
    // SAFETY: `list` is a valid list of `cnt` elements (`elems` may be null when it is empty,
    // which `from_raw_parts` must never be given).
    let elems = unsafe {
        let (ptr, cnt) = ((*list).elems, (*list).cnt);
        if ptr.is_null() || cnt <= 0 {
            &[]
        } else {
            std::slice::from_raw_parts(ptr, cnt as usize)
        }
    };
    for (tp, offset) in sent {
        let elem = elems.iter().find(|e| {
            // SAFETY: each element's topic is a NUL-terminated string owned by the list.
            e.partition == tp.1
                && !e.topic.is_null()
                && unsafe { std::ffi::CStr::from_ptr(e.topic) }.to_bytes() == tp.0.as_bytes()
        });
        let err = elem.map_or(rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, |e| {
            e.err
        });
        let ok = err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
        out.push(Outcome {
            tp: tp.clone(),
            offset: *offset,
            ok,
            error: (!ok).then(|| error_text(err)),
        });
    }
}
