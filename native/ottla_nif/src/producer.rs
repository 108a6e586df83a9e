//! The producer: a librdkafka producer polled on its own thread. `producer_send` enqueues a
//! whole call's messages at once; when librdkafka has reported on every one of them, one
//! message `{:ottla_produced, tag, failures}` goes to the calling process.
//!
//! Nothing here waits on Kafka on a BEAM scheduler. A call of up to 1 MiB is copied on the
//! caller's normal scheduler and enqueued by the producer's enqueue thread; a larger one is
//! enqueued in place on a dirty CPU scheduler. When a call needs something that waits (the
//! topic's partition count is not cached, or librdkafka's queue is full) the rest of it waits
//! on a Rust thread. Delivery reports cost two atomic operations a message; only failures
//! take a lock. A caller that stops waiting abandons its batch
//! (`producer_abandon`): it gets the verdicts known so far, and no message arrives later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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
use crate::transaction::Txn;

/// How long a topic's partition count is trusted before metadata is asked again.
const METADATA_TTL: Duration = Duration::from_secs(30);
/// A topic just created may not be known to every broker yet: how long an unknown topic is
/// asked about again before the call fails.
const UNKNOWN_TOPIC_GRACE: Duration = Duration::from_millis(1_500);

/// One `producer_send` call: who to tell, and what is known of each message so far. Each
/// delivery report costs two atomic operations; only failures take a lock.
pub struct Batch {
    pid: LocalPid,
    tag: u64,
    /// Messages without a verdict, plus one held by the enqueuing side until it is done.
    remaining: AtomicUsize,
    reported: Box<[AtomicBool]>,
    failures: Mutex<Vec<(usize, Error)>>,
    /// [`OPEN`], then [`SENT`] (the final message went) or [`ABANDONED`] (the caller stopped
    /// waiting: nothing is sent any more).
    state: AtomicU8,
    /// The transaction the messages belong to (0: none).
    txn: u64,
}

const OPEN: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

impl Batch {
    fn new(pid: LocalPid, tag: u64, count: usize, txn: u64) -> Arc<Self> {
        Arc::new(Batch {
            pid,
            tag,
            txn,
            remaining: AtomicUsize::new(count + 1),
            reported: (0..count).map(|_| AtomicBool::new(false)).collect(),
            failures: Mutex::new(Vec::new()),
            state: AtomicU8::new(OPEN),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Error)>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the verdict of message `index` (`None`: delivered), once. A failure is recorded
    /// under the failures' lock, with its flag: `producer_abandon` never sees a failed
    /// message as reported without its failure.
    fn report(&self, index: usize, error: Option<Error>) {
        let Some(flag) = self.reported.get(index) else {
            return;
        };
        match error {
            None => {
                if flag.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
            Some(error) => {
                let mut failures = self.failures();
                if flag.swap(true, Ordering::AcqRel) {
                    return;
                }
                failures.push((index, error));
            }
        }
        self.complete_one();
    }

    /// The enqueuing side is done.
    fn enqueued(&self) {
        self.complete_one();
    }

    /// Every message of the call without a verdict failed with `error` (the call could not be
    /// made).
    fn fail_unreported(&self, error: &Error) {
        for index in 0..self.reported.len() {
            self.report(index, Some(error.clone()));
        }
    }

    fn complete_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if self
            .state
            .compare_exchange(OPEN, SENT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let mut failures = std::mem::take(&mut *self.failures());
            failures.sort_by_key(|(index, _)| *index);
            let tag = self.tag;
            send_reliably(
                &self.pid,
                Box::new(move |env| (atoms::ottla_produced(), tag, failures).encode(env)),
            );
        }
    }

    fn abandoned(&self) -> bool {
        self.state.load(Ordering::Acquire) == ABANDONED
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

pub(crate) type Client = ThreadedProducer<ProducerCtx>;

/// What the NIFs and the producer's threads share.
pub struct Shared {
    /// `None` once closed. Sends take the read lock; only `producer_close` writes.
    producer: RwLock<Option<Arc<Client>>>,
    partitions: Mutex<HashMap<String, (i32, Instant)>>,
    /// A transactional producer's transactions.
    txn: OnceLock<Arc<Txn>>,
}

pub struct ProducerResource {
    shared: Arc<Shared>,
    /// To the enqueue thread (`enqueue_thread`); it ends when this resource goes.
    jobs: Sender<Job>,
}

impl std::ops::Deref for ProducerResource {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
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

impl Shared {
    pub(crate) fn client(&self) -> Result<Arc<Client>> {
        let guard = self.producer.read().map_err(|_| closed())?;
        guard.clone().ok_or_else(closed)
    }

    /// Takes the producer out and closes it on a plain thread: closing flushes and joins
    /// librdkafka's threads, which must never happen on a BEAM scheduler.
    /// A transactional producer's open transaction is aborted first (or the commit being
    /// retried gets a last chance), within [`crate::transaction::CLEANUP`]: left open, it
    /// would hold back what `read_committed` readers see until the broker times it out.
    fn close(&self, flush: Duration) {
        let taken = match self.producer.write() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        if let Some(producer) = taken {
            let txn = self.txn().cloned();
            let _ = std::thread::Builder::new()
                .name("ottla-producer-close".into())
                .spawn(move || {
                    if let Some(txn) = txn {
                        txn.stop();
                    }
                    let _ = producer.flush(flush);
                    drop(producer);
                });
        }
    }

    pub(crate) fn txn(&self) -> Option<&Arc<Txn>> {
        self.txn.get()
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

/// A call's messages (or the part of them left to enqueue) copied out of the caller's terms,
/// for a thread: every key, value and header in one buffer, each message as ranges into it
/// (one allocation for the bytes, one for the messages).
struct Copied {
    buf: Vec<u8>,
    messages: Vec<CopiedOut>,
}

type Span = std::ops::Range<usize>;

struct CopiedOut {
    index: usize,
    key: Option<Span>,
    value: Option<Span>,
    headers: Vec<(Span, Option<Span>)>,
    timestamp: Option<i64>,
    partition: i32,
}

impl Copied {
    /// Copies `outs`, numbering them from `first`.
    fn new(outs: &[Out<'_>], first: usize) -> Self {
        let bytes = outs.iter().map(Out::bytes).sum();
        let mut buf = Vec::with_capacity(bytes);
        let mut put = |bytes: &[u8]| {
            let start = buf.len();
            buf.extend_from_slice(bytes);
            start..buf.len()
        };
        let messages = outs
            .iter()
            .enumerate()
            .map(|(i, m)| CopiedOut {
                index: first + i,
                key: m.key.map(&mut put),
                value: m.value.map(&mut put),
                headers: m
                    .headers
                    .iter()
                    .map(|(k, v)| (put(k), v.map(&mut put)))
                    .collect(),
                timestamp: m.timestamp,
                partition: m.partition,
            })
            .collect();
        Copied { buf, messages }
    }

    fn out(&self, m: &CopiedOut) -> Out<'_> {
        let at = |span: &Span| &self.buf[span.clone()];
        Out {
            key: m.key.as_ref().map(at),
            value: m.value.as_ref().map(at),
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (at(k), v.as_ref().map(at)))
                .collect(),
            timestamp: m.timestamp,
            partition: m.partition,
        }
    }

    /// The partition count a topic needs for every explicit partition here to exist.
    fn needed_count(&self) -> i32 {
        self.messages
            .iter()
            .map(|m| m.partition + 1)
            .max()
            .unwrap_or(0)
    }
}

impl Out<'_> {
    fn bytes(&self) -> usize {
        self.key.map_or(0, <[u8]>::len)
            + self.value.map_or(0, <[u8]>::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
                .sum::<usize>()
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
    shared: &Shared,
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
    // A transactional producer takes only the open transaction's messages, and that
    // transaction cannot end while one is being handed over.
    let _admitted = match (shared.txn(), batch.txn) {
        (None, 0) => None,
        (Some(txn), id) => match txn.admit(id, &batch.pid) {
            Ok(admitted) => Some(admitted),
            Err(error) => {
                batch.report(index, Some(error));
                return Enqueue::Done;
            }
        },
        (None, _) => {
            let error = Error::new("not_transactional", "the producer has no transactional id");
            batch.report(index, Some(error));
            return Enqueue::Done;
        }
    };
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

/// Enqueues `messages`, waiting for room in librdkafka's queue until the deadline; a message
/// that finds none by then fails with `queue_full`.
fn enqueue_all(
    shared: &Shared,
    producer: &Client,
    topic: &str,
    count: i32,
    batch: &Arc<Batch>,
    messages: &Copied,
    deadline: Instant,
) {
    for m in &messages.messages {
        let out = messages.out(m);
        loop {
            if batch.abandoned() {
                return;
            }
            match enqueue(shared, producer, topic, count, batch, m.index, &out) {
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
}

/// One call handed to the enqueue thread.
pub struct Job {
    topic: String,
    batch: Arc<Batch>,
    messages: Copied,
    deadline: Instant,
}

/// The producer's enqueue thread: hands each call's messages to librdkafka, so that
/// `producer_send` returns from a normal scheduler after a copy. A call whose topic's
/// partition count is not cached (the metadata request waits) goes to a thread of its own,
/// so that it holds up no other call. Ends when the producer resource goes.
fn enqueue_thread(shared: Arc<Shared>, queue: Receiver<Job>) {
    for job in queue {
        let needed = job.messages.needed_count();
        let count = shared.cached_count(&job.topic).filter(|c| *c >= needed);
        let (Some(count), Ok(producer)) = (count, shared.client()) else {
            send_on_thread(
                shared.clone(),
                job.topic,
                job.batch,
                job.messages,
                job.deadline,
            );
            continue;
        };
        let batch = job.batch.clone();
        let run = || {
            enqueue_all(
                &shared,
                &producer,
                &job.topic,
                count,
                &job.batch,
                &job.messages,
                job.deadline,
            )
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
            batch.fail_unreported(&Error::new("internal", "the produce failed inside the NIF"));
        }
        batch.enqueued();
    }
}

/// The rest of a call, on a thread: learns the partition count if needed, then enqueues,
/// waiting for room in librdkafka's queue until the deadline.
fn send_on_thread(
    resource: Arc<Shared>,
    topic: String,
    batch: Arc<Batch>,
    messages: Copied,
    deadline: Instant,
) {
    let guard = batch.clone();
    let run = move || {
        let needed = messages.needed_count();
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
        enqueue_all(
            &resource, &producer, &topic, count, &batch, &messages, deadline,
        );
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
    let shared = Arc::new(Shared {
        producer: RwLock::new(Some(Arc::new(producer))),
        partitions: Mutex::new(HashMap::new()),
        txn: OnceLock::new(),
    });
    // A transactional producer initialises at once (fencing any older one with its id), on
    // its transaction thread; a fatal error is told to the process creating it.
    // As `Ottla.Connection` decides it: the last value given, when it is not empty.
    let transactional = props
        .iter()
        .rev()
        .find(|(k, _)| k == "transactional.id")
        .is_some_and(|(_, id)| !id.is_empty());
    if transactional {
        let txn = Txn::start(&shared, env.pid(), transaction_timeout(&props))?;
        let _ = shared.txn.set(txn);
    }
    let (jobs, queue) = channel::<Job>();
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("ottla-enqueue".into())
        .spawn(move || enqueue_thread(thread_shared, queue))
        .map_err(|e| Error::new("thread_spawn", format!("could not start a thread: {e}")))?;
    let resource = ResourceArc::new(ProducerResource { shared, jobs });
    Ok((atoms::ok(), resource).encode(env))
}

/// librdkafka's `transaction.timeout.ms` for these properties (60 s unless set).
fn transaction_timeout(props: &[(String, String)]) -> Duration {
    let ms = props
        .iter()
        .rev()
        .find(|(k, _)| k == "transaction.timeout.ms")
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(60_000);
    Duration::from_millis(ms)
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

/// A message's own partition, or the call's (`partition`, -1 for none) where it has none.
fn decode_message(term: Term<'_>, partition: i32) -> Option<InMessage<'_>> {
    if let Ok(value) = term.decode::<Binary<'_>>() {
        return Some((None, Some(value), Vec::new(), None, partition));
    }
    if let Ok((key, value)) = term.decode::<(Option<Binary<'_>>, Option<Binary<'_>>)>() {
        return Some((key, value, Vec::new(), None, partition));
    }
    let mut message = term.decode::<InMessage<'_>>().ok()?;
    if message.4 < 0 {
        message.4 = partition;
    }
    Some(message)
}

/// The most bytes `producer_send` copies on a normal scheduler (about 0.1 ms of copying);
/// a larger call is `:large`, for `producer_send_dirty`.
const INLINE_BYTES: usize = 1 << 20;

/// Decodes a call's terms in one pass, borrowing their binaries: a message is a value binary,
/// `{key, value}` (binaries or nil) or the encoded 5-tuple; `None` if any is something else
/// (the caller encodes those first). A message without a partition of its own gets the call's
/// `partition` (-1: the partitioner chooses).
fn decode_all<'a>(messages: &[Term<'a>], partition: i32) -> Option<Vec<InMessage<'a>>> {
    messages
        .iter()
        .map(|t| decode_message(*t, partition))
        .collect()
}

fn outs_of<'b>(messages: &'b [InMessage<'_>]) -> Vec<Out<'b>> {
    messages
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
        .collect()
}

/// When the call's waits on Rust threads end: a little before the caller's, so that a
/// message that could not be handed to librdkafka has its own verdict when the caller stops
/// waiting.
fn deadline_for(timeout_ms: u64) -> Instant {
    let margin = (timeout_ms / 10).min(500);
    reply::deadline_after(Duration::from_millis(timeout_ms - margin))
}

/// `{:pending, batch}`: every verdict may already be in (the message then is on its way);
/// either way the caller waits for `{:ottla_produced, tag, failures}`.
fn pending<'a>(env: Env<'a>, batch: Arc<Batch>) -> Term<'a> {
    (atoms::pending(), ResourceArc::new(BatchResource(batch))).encode(env)
}

/// Copies a call's messages (at most [`INLINE_BYTES`]) and hands them to the producer's
/// enqueue thread (`partition`: the partition of every message that names none, -1 to let the
/// partitioner choose); returns `{:pending, batch}` on a normal scheduler without waiting for
/// anything. `{:ottla_produced, tag, failures}` follows once every message has its verdict,
/// where `failures` is `[{index, %Ottla.Error{}}]`. `:large` for a bigger call,
/// `:needs_encoding` for terms of another shape.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn producer_send<'a>(
    env: Env<'a>,
    resource: ResourceArc<ProducerResource>,
    pid: LocalPid,
    tag: u64,
    topic: String,
    messages: Vec<Term<'a>>,
    partition: i32,
    txn: u64,
    timeout_ms: u64,
) -> Term<'a> {
    let Some(decoded) = decode_all(&messages, partition) else {
        return atoms::needs_encoding().encode(env);
    };
    let outs = outs_of(&decoded);
    if outs.iter().map(Out::bytes).sum::<usize>() > INLINE_BYTES {
        return atoms::large().encode(env);
    }
    let batch = Batch::new(pid, tag, outs.len(), txn);
    let job = Job {
        topic,
        batch: batch.clone(),
        messages: Copied::new(&outs, 0),
        deadline: deadline_for(timeout_ms),
    };
    if resource.jobs.send(job).is_err() {
        batch.fail_unreported(&closed());
        batch.enqueued();
    }
    pending(env, batch)
}

/// `producer_send` for calls of any size, on a dirty CPU scheduler: enqueues in place,
/// borrowing the caller's binaries, and hands anything that would wait (an unknown partition
/// count, a full queue) to a thread.
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn producer_send_dirty<'a>(
    env: Env<'a>,
    resource: ResourceArc<ProducerResource>,
    pid: LocalPid,
    tag: u64,
    topic: String,
    messages: Vec<Term<'a>>,
    partition: i32,
    txn: u64,
    timeout_ms: u64,
) -> Term<'a> {
    let Some(decoded) = decode_all(&messages, partition) else {
        return atoms::needs_encoding().encode(env);
    };
    let outs = outs_of(&decoded);
    let deadline = deadline_for(timeout_ms);
    let batch = Batch::new(pid, tag, outs.len(), txn);

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
                    &resource,
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
        let rest = Copied::new(&outs[rest_from..], rest_from);
        send_on_thread(
            resource.shared.clone(),
            topic,
            batch.clone(),
            rest,
            deadline,
        );
    } else {
        batch.enqueued();
    }
    pending(env, batch)
}

/// The caller stopped waiting for `batch`. Returns `{:abandoned, failures, unreported}` (the
/// failures known so far and the indexes of messages without a verdict: still queued, so
/// they may yet be delivered), after which nothing is sent for it; or `:sent` when the final
/// message is already on its way to the caller.
#[rustler::nif]
fn producer_abandon<'a>(env: Env<'a>, batch: ResourceArc<BatchResource>) -> Term<'a> {
    let batch = &batch.0;
    if batch
        .state
        .compare_exchange(OPEN, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return atoms::sent().encode(env);
    }
    // Under the failures' lock no failure is half recorded; a delivery being recorded right
    // now may show as unreported (still queued, possibly persisted): never as delivered
    // when it failed.
    let (mut failures, unreported) = {
        let mut guard = batch.failures();
        let unreported: Vec<usize> = (0..batch.reported.len())
            .filter(|i| !batch.reported[*i].load(Ordering::Acquire))
            .collect();
        (std::mem::take(&mut *guard), unreported)
    };
    failures.sort_by_key(|(index, _)| *index);
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

/// Test-only (hidden as `Ottla.Native.producer_test_fatal/1`): raises a fatal error in the
/// producer as librdkafka would for a broken idempotent sequence, so that the tests see what
/// a fatal error other than fencing does.
#[rustler::nif]
fn producer_test_fatal(resource: ResourceArc<ProducerResource>) -> NifResult<Atom> {
    let client = resource.client()?;
    let reason = c"test-only fatal error (producer_test_fatal)";
    // SAFETY: the client is live while `client` is held; the call only records the error.
    unsafe {
        rd::rd_kafka_test_fatal_error(
            client.client().native_ptr(),
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    Ok(atoms::ok())
}
