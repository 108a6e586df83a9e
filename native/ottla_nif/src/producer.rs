//! The producer: a librdkafka producer polled on its own thread. `producer_send` enqueues a
//! whole call's messages at once; when librdkafka has reported on every one of them, one
//! message `{:ottla_produced, tag, failures}` goes to the calling process.
//!
//! Nothing here waits on Kafka on a BEAM scheduler. Enqueueing runs on a dirty CPU scheduler
//! (it only copies into librdkafka's queue); when the call needs something that waits (the
//! topic's partition count is not cached, or librdkafka's queue is full) the rest of the call
//! moves to a Rust thread. A caller that stops waiting abandons its batch
//! (`producer_abandon`): it gets the verdicts known so far, and no message arrives later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rustler::{Atom, Binary, Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::config::client_config;
use crate::context::{send_reliably, OttlaContext};
use crate::error::{Error, Result};
use crate::metadata::partition_count;
use crate::reply;

/// How long a topic's partition count is trusted before metadata is asked again.
const METADATA_TTL: Duration = Duration::from_secs(30);
/// A topic just created may not be known to every broker yet: how long an unknown topic is
/// asked about again before the call fails.
const UNKNOWN_TOPIC_GRACE: Duration = Duration::from_millis(1_500);

/// One `producer_send` call: who to tell, and what is known of each message so far.
pub struct Batch {
    pid: LocalPid,
    tag: u64,
    state: Mutex<BatchState>,
}

struct BatchState {
    /// Messages without a verdict, plus one held by the enqueuing side until it is done.
    remaining: usize,
    reported: Vec<bool>,
    failures: Vec<(usize, Error)>,
    /// The caller stopped waiting: nothing is sent any more.
    abandoned: bool,
    /// The final message was sent.
    sent: bool,
}

impl Batch {
    fn new(pid: LocalPid, tag: u64, count: usize) -> Arc<Self> {
        Arc::new(Batch {
            pid,
            tag,
            state: Mutex::new(BatchState {
                remaining: count + 1,
                reported: vec![false; count],
                failures: Vec::new(),
                abandoned: false,
                sent: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the verdict of message `index` (`None`: delivered).
    fn report(&self, index: usize, error: Option<Error>) {
        let mut st = self.lock();
        if let Some(flag) = st.reported.get_mut(index) {
            if *flag {
                return;
            }
            *flag = true;
        }
        if let Some(error) = error {
            st.failures.push((index, error));
        }
        self.complete_one(&mut st);
    }

    /// The enqueuing side is done.
    fn enqueued(&self) {
        let mut st = self.lock();
        self.complete_one(&mut st);
    }

    /// Every message of the call failed with `error` (the call could not be made).
    fn fail_unreported(&self, error: &Error) {
        let mut st = self.lock();
        for index in 0..st.reported.len() {
            if !st.reported[index] {
                st.reported[index] = true;
                st.failures.push((index, error.clone()));
                self.complete_one(&mut st);
            }
        }
    }

    fn complete_one(&self, st: &mut BatchState) {
        st.remaining = st.remaining.saturating_sub(1);
        if st.remaining == 0 && !st.abandoned && !st.sent {
            st.sent = true;
            let mut failures = std::mem::take(&mut st.failures);
            failures.sort_by_key(|(index, _)| *index);
            let tag = self.tag;
            send_reliably(
                &self.pid,
                Box::new(move |env| (atoms::ottla_produced(), tag, failures).encode(env)),
            );
        }
    }

    fn abandoned(&self) -> bool {
        self.lock().abandoned
    }
}

/// A batch handed back to Elixir, so that the caller can abandon it.
pub struct BatchResource(Arc<Batch>);

#[rustler::resource_impl]
impl rustler::Resource for BatchResource {}

/// Delivery opaque: the batch and the message's index in it.
type Delivery = Box<(Arc<Batch>, usize)>;

#[derive(Clone, Default)]
pub struct ProducerCtx(OttlaContext);

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason)
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        self.0.stats(statistics)
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Delivery;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Delivery) {
        let (batch, index) = *opaque;
        let error = match result {
            Ok(_) => None,
            Err((err, message)) => {
                // SAFETY: `message` is the live message librdkafka reports on.
                let status = unsafe { rd::rd_kafka_message_status(message.ptr()) };
                let possibly =
                    status != rd::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED;
                Some(
                    self.0
                        .explain(Error::from(err.clone()).possibly_persisted(possibly)),
                )
            }
        };
        batch.report(index, error);
    }
}

type Client = ThreadedProducer<ProducerCtx>;

pub struct ProducerResource {
    /// `None` once closed. Sends take the read lock; only `producer_close` writes.
    producer: RwLock<Option<Arc<Client>>>,
    partitions: Mutex<HashMap<String, (i32, Instant)>>,
}

#[rustler::resource_impl]
impl rustler::Resource for ProducerResource {}

impl Drop for ProducerResource {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}

fn closed() -> Error {
    Error::new("closed", "the producer is closed")
}

impl ProducerResource {
    fn client(&self) -> Result<Arc<Client>> {
        let guard = self.producer.read().map_err(|_| closed())?;
        guard.clone().ok_or_else(closed)
    }

    /// Takes the producer out and closes it on a plain thread: closing flushes and joins
    /// librdkafka's threads, which must never happen on a BEAM scheduler.
    fn close(&self, flush: Duration) {
        let taken = match self.producer.write() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        if let Some(producer) = taken {
            let _ = std::thread::Builder::new()
                .name("ottla-producer-close".into())
                .spawn(move || {
                    let _ = producer.flush(flush);
                    drop(producer);
                });
        }
    }

    fn cached_count(&self, topic: &str) -> Option<i32> {
        let cache = self.partitions.lock().ok()?;
        let (count, at) = cache.get(topic)?;
        (at.elapsed() < METADATA_TTL).then_some(*count)
    }

    /// The partition count of `topic`, from the cache or a metadata request (which waits: call
    /// it only on a Rust thread). An unknown topic is asked about again for a moment, since a
    /// topic just created may not be known to every broker yet.
    /// A cached count below `at_least` (a message for a partition beyond it: the topic may
    /// have grown) is asked for again.
    fn partition_count(&self, topic: &str, at_least: i32, deadline: Instant) -> Result<i32> {
        if let Some(count) = self.cached_count(topic).filter(|c| *c >= at_least) {
            return Ok(count);
        }
        let client = self.client()?;
        let grace = Instant::now() + UNKNOWN_TOPIC_GRACE;
        let count = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match partition_count(client.client(), topic, left.max(Duration::from_millis(1))) {
                Err(err)
                    if err.code == "unknown_topic_or_partition"
                        && Instant::now() < grace.min(deadline) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        if let Ok(mut cache) = self.partitions.lock() {
            cache.insert(topic.to_string(), (count, Instant::now()));
        }
        Ok(count)
    }
}

/// A message to produce, borrowed from the caller's terms or owned by a thread.
struct Out<'b> {
    key: Option<&'b [u8]>,
    value: Option<&'b [u8]>,
    headers: Vec<(&'b [u8], Option<&'b [u8]>)>,
    timestamp: Option<i64>,
    partition: i32,
}

/// The owned form, for the part of a call that moves to a thread.
struct OwnedOut {
    index: usize,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    timestamp: Option<i64>,
    partition: i32,
}

impl OwnedOut {
    fn new(index: usize, m: &Out<'_>) -> Self {
        OwnedOut {
            index,
            key: m.key.map(<[u8]>::to_vec),
            value: m.value.map(<[u8]>::to_vec),
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect(),
            timestamp: m.timestamp,
            partition: m.partition,
        }
    }

    fn borrow(&self) -> Out<'_> {
        Out {
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
                .collect(),
            timestamp: self.timestamp,
            partition: self.partition,
        }
    }
}

enum Enqueue {
    Done,
    /// librdkafka's queue is full: try again once it drains.
    Full,
}

/// Hands one message to librdkafka; its verdict comes through the delivery report (or is
/// recorded here when it cannot be enqueued).
fn enqueue(
    producer: &Client,
    topic: &str,
    count: i32,
    batch: &Arc<Batch>,
    index: usize,
    m: &Out<'_>,
) -> Enqueue {
    if m.partition >= count {
        let error = Error::from_code(
            RDKafkaErrorCode::UnknownPartition,
            format!(
                "partition {} does not exist: topic {topic:?} has {count}",
                m.partition
            ),
        );
        batch.report(index, Some(error));
        return Enqueue::Done;
    }
    let mut record: BaseRecord<'_, [u8], [u8], Delivery> =
        BaseRecord::with_opaque_to(topic, Box::new((batch.clone(), index)));
    if let Some(key) = m.key {
        record = record.key(key);
    }
    if let Some(value) = m.value {
        record = record.payload(value);
    }
    if m.partition >= 0 {
        record = record.partition(m.partition);
    }
    if let Some(ts) = m.timestamp {
        record = record.timestamp(ts);
    }
    if !m.headers.is_empty() {
        let mut owned = OwnedHeaders::new_with_capacity(m.headers.len());
        for (name, value) in &m.headers {
            let name = String::from_utf8_lossy(name);
            owned = owned.insert(Header {
                key: &name,
                value: *value,
            });
        }
        record = record.headers(owned);
    }
    match producer.send(record) {
        Ok(()) => Enqueue::Done,
        // `_back` owns this message's delivery opaque; dropping it releases the batch
        // without a report.
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _back)) => Enqueue::Full,
        Err((err, _back)) => {
            batch.report(index, Some(Error::from(err)));
            Enqueue::Done
        }
    }
}

/// The rest of a call, on a thread: learns the partition count if needed, then enqueues,
/// waiting for room in librdkafka's queue until the deadline.
fn send_on_thread(
    resource: ResourceArc<ProducerResource>,
    topic: String,
    batch: Arc<Batch>,
    messages: Vec<OwnedOut>,
    deadline: Instant,
) {
    let guard = batch.clone();
    let run = move || {
        let needed = messages.iter().map(|m| m.partition + 1).max().unwrap_or(0);
        let count = match resource.partition_count(&topic, needed, deadline) {
            Ok(count) => count,
            Err(error) => {
                let error = match resource.client() {
                    Ok(p) => p.context().0.explain(error),
                    Err(_) => error,
                };
                batch.fail_unreported(&error);
                batch.enqueued();
                return;
            }
        };
        let producer = match resource.client() {
            Ok(p) => p,
            Err(error) => {
                batch.fail_unreported(&error);
                batch.enqueued();
                return;
            }
        };
        for m in &messages {
            let out = m.borrow();
            loop {
                if batch.abandoned() {
                    break;
                }
                match enqueue(&producer, &topic, count, &batch, m.index, &out) {
                    Enqueue::Done => break,
                    Enqueue::Full if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Enqueue::Full => {
                        let error = Error::from_code(
                            RDKafkaErrorCode::QueueFull,
                            "librdkafka's queue stayed full until the timeout",
                        );
                        batch.report(m.index, Some(error));
                        break;
                    }
                }
            }
        }
        batch.enqueued();
    };
    // A panic on this thread (the rdkafka crate panics on some malformed metadata from a
    // broker) must not leave the caller waiting for verdicts until its timeout: every
    // message without one fails.
    let spawned = std::thread::Builder::new()
        .name("ottla-produce".into())
        .spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                guard.fail_unreported(&Error::new("internal", "the produce failed inside the NIF"));
                guard.enqueued();
            }
        });
    if let Err(err) = spawned {
        // The closure (and the batch's last reference held by it) is gone: nothing will
        // answer, and the caller's wait ends at its timeout.
        crate::context::log(
            atoms::error(),
            "PRODUCE",
            &format!("could not start a produce thread: {err}"),
        );
    }
}

/// `{key | nil, value | nil, [{name, value | nil}], timestamp_ms | nil, partition}`; a
/// partition of -1 lets librdkafka's partitioner choose.
type InMessage<'a> = (
    Option<Binary<'a>>,
    Option<Binary<'a>>,
    Vec<(Binary<'a>, Option<Binary<'a>>)>,
    Option<i64>,
    i32,
);

#[rustler::nif(schedule = "DirtyIo")]
fn producer_new<'a>(
    env: Env<'a>,
    bootstrap: String,
    props: Vec<(String, String)>,
) -> NifResult<Term<'a>> {
    let producer: Client = client_config(&bootstrap, &props)
        .create_with_context(ProducerCtx::default())
        .map_err(Error::from)?;
    let resource = ResourceArc::new(ProducerResource {
        producer: RwLock::new(Some(Arc::new(producer))),
        partitions: Mutex::new(HashMap::new()),
    });
    Ok((atoms::ok(), resource).encode(env))
}

/// Answers `{:ok, partition_count}` of a topic (cached for a while), for Elixir-side
/// partitioners.
#[rustler::nif]
fn producer_partition_count(
    pid: LocalPid,
    tag: u64,
    resource: ResourceArc<ProducerResource>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    reply::spawn("ottla-metadata", pid, tag, move |env| {
        let deadline = reply::deadline_after(Duration::from_millis(timeout_ms));
        let result = resource
            .partition_count(&topic, 0, deadline)
            .map(|count| (atoms::ok(), count));
        reply::answer(env, result)
    })
}

fn decode_message(term: Term<'_>) -> Option<InMessage<'_>> {
    if let Ok(value) = term.decode::<Binary<'_>>() {
        return Some((None, Some(value), Vec::new(), None, -1));
    }
    if let Ok((key, value)) = term.decode::<(Option<Binary<'_>>, Option<Binary<'_>>)>() {
        return Some((key, value, Vec::new(), None, -1));
    }
    term.decode::<InMessage<'_>>().ok()
}

/// Enqueues every message of a call and returns `{:pending, batch}`
/// `{:ottla_produced, tag, failures}` follows once every message has its verdict, where
/// `failures` is `[{index, %Ottla.Error{}}]`. Runs on a dirty CPU scheduler: it only
/// copies into librdkafka's queue, and hands anything that would wait to a thread.
#[rustler::nif(schedule = "DirtyCpu")]
fn producer_send<'a>(
    env: Env<'a>,
    resource: ResourceArc<ProducerResource>,
    pid: LocalPid,
    tag: u64,
    topic: String,
    messages: Vec<Term<'a>>,
    timeout_ms: u64,
) -> Term<'a> {
    // One pass over the caller's terms, borrowing their binaries: a message is a value
    // binary, `{key, value}` (binaries or nil) or the encoded 5-tuple; anything else is
    // encoded by the caller first.
    let Some(messages) = messages
        .iter()
        .map(|t| decode_message(*t))
        .collect::<Option<Vec<InMessage<'a>>>>()
    else {
        return atoms::needs_encoding().encode(env);
    };
    // Waits on the thread end a little before the caller's: a message that could not be
    // handed to librdkafka then has its own verdict when the caller stops waiting.
    let margin = (timeout_ms / 10).min(500);
    let deadline = reply::deadline_after(Duration::from_millis(timeout_ms - margin));
    let batch = Batch::new(pid, tag, messages.len());
    let outs: Vec<Out<'_>> = messages
        .iter()
        .map(|(key, value, headers, timestamp, partition)| Out {
            key: key.as_ref().map(|b| b.as_slice()),
            value: value.as_ref().map(|b| b.as_slice()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_ref().map(|b| b.as_slice())))
                .collect(),
            timestamp: *timestamp,
            partition: *partition,
        })
        .collect();

    let mut rest_from = 0;
    // A partition beyond the cached count may be one the topic has just grown: asked again.
    let needed = outs.iter().map(|o| o.partition + 1).max().unwrap_or(0);
    let cached = resource.cached_count(&topic).filter(|c| *c >= needed);
    match (resource.client(), cached) {
        (Err(error), _) => {
            batch.fail_unreported(&error);
            rest_from = outs.len();
        }
        (Ok(producer), Some(count)) => {
            while rest_from < outs.len() {
                match enqueue(
                    &producer,
                    &topic,
                    count,
                    &batch,
                    rest_from,
                    &outs[rest_from],
                ) {
                    Enqueue::Done => rest_from += 1,
                    Enqueue::Full => break,
                }
            }
        }
        // Unknown partition count: the metadata request waits, so all of it goes to a thread.
        (Ok(_), None) => {}
    }

    if rest_from < outs.len() {
        let rest: Vec<OwnedOut> = outs[rest_from..]
            .iter()
            .enumerate()
            .map(|(i, m)| OwnedOut::new(rest_from + i, m))
            .collect();
        send_on_thread(resource, topic, batch.clone(), rest, deadline);
    } else {
        batch.enqueued();
    }

    // Every verdict may already be in (the message then is on its way): either way the
    // caller waits for {:ottla_produced, tag, failures}.
    (atoms::pending(), ResourceArc::new(BatchResource(batch))).encode(env)
}

/// The caller stopped waiting for `batch`. Returns `{:abandoned, failures, unreported}` (the
/// failures known so far and the indexes of messages without a verdict: still queued, so
/// they may yet be delivered), after which nothing is sent for it; or `:sent` when the final
/// message is already on its way to the caller.
#[rustler::nif]
fn producer_abandon<'a>(env: Env<'a>, batch: ResourceArc<BatchResource>) -> Term<'a> {
    let mut st = batch.0.lock();
    if st.sent {
        return atoms::sent().encode(env);
    }
    st.abandoned = true;
    let mut failures = std::mem::take(&mut st.failures);
    failures.sort_by_key(|(index, _)| *index);
    let unreported: Vec<usize> = st
        .reported
        .iter()
        .enumerate()
        .filter(|(_, reported)| !**reported)
        .map(|(index, _)| index)
        .collect();
    (atoms::abandoned(), failures, unreported).encode(env)
}

/// Answers `:ok` once everything enqueued was delivered, or an error at the timeout.
#[rustler::nif]
fn producer_flush(
    pid: LocalPid,
    tag: u64,
    resource: ResourceArc<ProducerResource>,
    timeout_ms: u64,
) -> Atom {
    reply::spawn("ottla-flush", pid, tag, move |env| {
        let result = resource.client().and_then(|p| {
            p.flush(Duration::from_millis(timeout_ms))?;
            Ok(atoms::ok())
        });
        reply::answer(env, result)
    })
}

/// Closes the producer now (flushing up to `timeout_ms` on a background thread) instead of
/// when the resource is garbage-collected.
#[rustler::nif]
fn producer_close(resource: ResourceArc<ProducerResource>, timeout_ms: u64) -> Atom {
    resource.close(Duration::from_millis(timeout_ms));
    atoms::ok()
}
