//! Every assigned partition's messages go to one intake queue of the consumer's own, apart
//! from the consumer's main queue (rebalances, errors): each partition's librdkafka queue is
//! forwarded to it. librdkafka measures its prefetch limits (`queued.min.messages`,
//! `queued.max.messages.kbytes`) on the queue a partition's queue forwards to, so they bound
//! the whole consumer, however many partitions it holds. Messages are taken in batches
//! (`rd_kafka_consume_batch_queue`) and handed to their partitions; a partition whose share
//! of the byte budget (or `max_backlog`) is full is paused in librdkafka, which drops what it
//! prefetched for it. The poll thread sleeps on [`Wake`] until librdkafka puts something in
//! an empty queue, the dispatcher frees room, or periodic work is due.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rdkafka::bindings as rd;

use super::Tp;
use crate::atoms;
use crate::context::log;
use crate::message::{Chunk, Msg};

/// Wakes a thread that waits for work: the poll thread (librdkafka calls [`on_enqueue`] from
/// its own threads when a queue gets its first element; the dispatcher notifies after freeing
/// room) or the dispatcher (demand and acks from the NIFs). A notification given while nobody
/// waits is kept until the next wait; one already pending costs a single atomic swap.
#[derive(Default)]
pub struct Wake {
    pending: AtomicBool,
    /// Whether the waiter sleeps: only then does a notification make a system call.
    sleeping: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        // Taking the lock orders this with a waiter between its check and its wait.
        let sleeping = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
        if *sleeping {
            self.cv.notify_one();
        }
    }

    /// Waits for a notification (or `timeout`), and consumes it.
    pub fn wait(&self, timeout: Duration) {
        let mut sleeping = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
        if !self.pending.load(Ordering::Acquire) {
            *sleeping = true;
            sleeping = self
                .cv
                .wait_timeout(sleeping, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            *sleeping = false;
        }
        drop(sleeping);
        self.pending.swap(false, Ordering::AcqRel);
    }
}

/// Called by librdkafka, on one of its threads, when a queue with the callback enabled gets
/// an element while empty. Touches only the Rust condvar: no librdkafka call.
unsafe extern "C" fn on_enqueue(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` is the `Wake` of the consumer's `Shared`, which outlives every
        // queue whose callback points at it (callbacks are disabled before queues go).
        unsafe { (*(opaque as *const Wake)).notify() };
    }
}

/// A queue handle. librdkafka's queues are reference-counted and locked internally.
struct Queue(*mut rd::rd_kafka_queue_t);

// SAFETY: see above; the handle is only used under the `Queues` mutex.
unsafe impl Send for Queue {}

impl Queue {
    fn disable_and_destroy(self) {
        // SAFETY: the handle is live; the callback is disabled before the handle goes.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.0, None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.0);
        }
    }
}

/// A queue handle (none for null) that wakes `wake` when it gets an element while empty.
fn watched(q: *mut rd::rd_kafka_queue_t, wake: &Wake) -> Option<Queue> {
    if q.is_null() {
        return None;
    }
    // SAFETY: `q` is live; `wake` outlives it (see `on_enqueue`).
    unsafe {
        rd::rd_kafka_queue_cb_event_enable(q, Some(on_enqueue), wake as *const Wake as *mut c_void)
    };
    Some(Queue(q))
}

/// The consumer's intake queue, the partitions' queues forwarded to it, and the main
/// queue's wake-up. Must be cleared ([`Queues::clear`]) before the consumer is destroyed.
#[derive(Default)]
pub struct Queues {
    main: Option<Queue>,
    intake: Option<Queue>,
    by_tp: HashMap<Tp, Queue>,
}

impl Queues {
    /// Wakes `wake` when the consumer's main queue (rebalances, errors, messages of partitions
    /// not split) gets an element.
    pub fn watch_main(&mut self, rk: *mut rd::rd_kafka_t, wake: &Wake) {
        // SAFETY: `rk` is a live consumer; the returned handle is owned here.
        self.main = watched(unsafe { rd::rd_kafka_queue_get_consumer(rk) }, wake);
    }

    /// Creates the intake queue, which wakes `wake` when it gets an element while empty.
    pub fn open_intake(&mut self, rk: *mut rd::rd_kafka_t, wake: &Wake) {
        // SAFETY: `rk` is a live consumer; the returned handle is owned here.
        self.intake = watched(unsafe { rd::rd_kafka_queue_new(rk) }, wake);
    }

    /// Sends a newly assigned partition's messages to the intake queue. On failure they keep
    /// coming through the main queue.
    pub fn split(&mut self, rk: *mut rd::rd_kafka_t, tp: &Tp, _wake: &Wake) {
        let Some(intake) = self.intake.as_ref().map(|q| q.0) else {
            return;
        };
        let Ok(topic) = CString::new(tp.0.as_str()) else {
            return;
        };
        // SAFETY: `rk` is a live consumer and `topic` a C string.
        let q = unsafe { rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), tp.1) };
        if q.is_null() {
            log(
                atoms::warning(),
                "CONSUMER",
                &format!(
                    "no queue of its own for {}/{}: it is paused when full instead",
                    tp.0, tp.1
                ),
            );
            return;
        }
        // SAFETY: both queues are live; what the partition's queue holds moves to the intake.
        unsafe { rd::rd_kafka_queue_forward(q, intake) };
        if let Some(old) = self.by_tp.insert(tp.clone(), Queue(q)) {
            old.disable_and_destroy();
        }
    }

    /// Forgets a revoked partition's queue (and what is still in it).
    pub fn remove(&mut self, tp: &Tp) {
        if let Some(q) = self.by_tp.remove(tp) {
            q.disable_and_destroy();
        }
    }

    pub fn clear(&mut self) {
        for (_, q) in self.by_tp.drain() {
            q.disable_and_destroy();
        }
        if let Some(q) = self.intake.take() {
            q.disable_and_destroy();
        }
        if let Some(q) = self.main.take() {
            q.disable_and_destroy();
        }
    }

    /// Takes up to `max` messages from the intake queue without waiting; appends them to
    /// `out`, grouped by partition (consecutive messages of one partition share a chunk).
    /// Returns how many it took. `buf` is scratch space, kept by the caller between calls.
    pub fn take(
        &self,
        max: usize,
        buf: &mut Vec<*mut rd::rd_kafka_message_t>,
        out: &mut Vec<(Tp, Vec<Msg>)>,
    ) -> usize {
        let Some(q) = self.intake.as_ref() else {
            return 0;
        };
        if max == 0 {
            return 0;
        }
        buf.clear();
        buf.resize(max, std::ptr::null_mut());
        // SAFETY: `q` is live and `buf` has room for `max` pointers.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(q.0, 0, buf.as_mut_ptr(), max) };
        if n <= 0 {
            return 0;
        }
        // librdkafka returns at most `max`; the bound keeps the slice in range regardless.
        let n = (n as usize).min(max);
        let mut i = 0;
        while i < n {
            // A run of messages of one partition.
            // SAFETY: librdkafka returned `n` live messages.
            let (rkt, partition) = unsafe { ((*buf[i]).rkt, (*buf[i]).partition) };
            let mut end = i + 1;
            // SAFETY: as above.
            while end < n && unsafe { (*buf[end]).rkt == rkt && (*buf[end]).partition == partition }
            {
                end += 1;
            }
            // SAFETY: a live message's topic handle names its topic (a C string librdkafka
            // owns while the message lives); Elixir checked topic names are UTF-8. An error
            // without a topic names none (its messages go to no partition).
            let topic = if rkt.is_null() {
                String::new()
            } else {
                unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_topic_name(rkt)) }
                    .to_string_lossy()
                    .into_owned()
            };
            let tp = (topic, partition);
            let mut chunk = Chunk::with_capacity(end - i);
            for &m in &buf[i..end] {
                // SAFETY: each of the `n` live messages is read, then destroyed once.
                unsafe {
                    let err = (*m).err;
                    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                        chunk.push_raw(m);
                    } else if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF {
                        let text =
                            std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(err)).to_string_lossy();
                        log(
                            atoms::warning(),
                            "CONSUME",
                            &format!("{}/{}: {text}", tp.0, tp.1),
                        );
                    }
                    rd::rd_kafka_message_destroy(m);
                }
            }
            if !chunk.is_empty() {
                let mut msgs = Vec::new();
                chunk.into_messages(&mut msgs);
                out.push((tp, msgs));
            }
            i = end;
        }
        n
    }
}
