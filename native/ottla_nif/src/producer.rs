//! The producer: a librdkafka producer polled on its own thread. `producer_send` enqueues a
//! whole batch at once; when librdkafka has reported on every message of the batch, one
//! message `{:ottla_produced, tag, failures}` goes to the calling process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rustler::{Binary, Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::config::client_config;
use crate::context::{send_reliably, OttlaContext};
use crate::error::{Error, Result};
use crate::metadata::partition_count;

/// How long a topic's partition count is trusted before metadata is asked again.
const METADATA_TTL: Duration = Duration::from_secs(30);

/// One `producer_send` call: who to tell, and which messages failed so far.
pub struct Batch {
    pid: LocalPid,
    tag: u64,
    /// Messages not yet reported, plus one held by `producer_send` until it has enqueued all.
    remaining: AtomicUsize,
    failures: Mutex<Vec<(usize, Error)>>,
}

impl Batch {
    fn fail(&self, index: usize, error: Error) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.push((index, error));
        }
    }

    /// Marks one message (or the enqueueing guard) done; true when it was the last.
    fn complete_one(&self) -> bool {
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }

    fn take_failures(&self) -> Vec<(usize, Error)> {
        match self.failures.lock() {
            Ok(mut failures) => {
                let mut out = std::mem::take(&mut *failures);
                out.sort_by_key(|(index, _)| *index);
                out
            }
            Err(_) => Vec::new(),
        }
    }
}

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
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Delivery;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Delivery) {
        let (batch, index) = *opaque;
        if let Err((err, _)) = result {
            batch.fail(index, Error::from(err.clone()));
        }
        if batch.complete_one() {
            let failures = batch.take_failures();
            let tag = batch.tag;
            send_reliably(
                &batch.pid,
                Box::new(move |env| (atoms::ottla_produced(), tag, failures).encode(env)),
            );
        }
    }
}

pub struct ProducerResource {
    /// `None` once closed. Sends take the read lock; only `producer_close` writes.
    producer: RwLock<Option<ThreadedProducer<ProducerCtx>>>,
    partitions: Mutex<HashMap<String, (i32, Instant)>>,
}

#[rustler::resource_impl]
impl rustler::Resource for ProducerResource {}

impl Drop for ProducerResource {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}

impl ProducerResource {
    fn with_producer<T>(
        &self,
        f: impl FnOnce(&ThreadedProducer<ProducerCtx>) -> Result<T>,
    ) -> Result<T> {
        let guard = self
            .producer
            .read()
            .map_err(|_| Error::new("closed", "the producer is closed"))?;
        match guard.as_ref() {
            Some(producer) => f(producer),
            None => Err(Error::new("closed", "the producer is closed")),
        }
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

    /// The partition count of `topic`, from a short-lived cache or a metadata request.
    fn partition_count(&self, topic: &str, timeout: Duration) -> Result<i32> {
        if let Ok(cache) = self.partitions.lock() {
            if let Some((count, at)) = cache.get(topic) {
                if at.elapsed() < METADATA_TTL {
                    return Ok(*count);
                }
            }
        }
        let count = self.with_producer(|p| partition_count(p.client(), topic, timeout))?;
        if let Ok(mut cache) = self.partitions.lock() {
            cache.insert(topic.to_string(), (count, Instant::now()));
        }
        Ok(count)
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
    let producer: ThreadedProducer<ProducerCtx> = client_config(&bootstrap, &props)
        .create_with_context(ProducerCtx::default())
        .map_err(Error::from)?;
    let resource = ResourceArc::new(ProducerResource {
        producer: RwLock::new(Some(producer)),
        partitions: Mutex::new(HashMap::new()),
    });
    Ok((atoms::ok(), resource).encode(env))
}

/// The partition count of a topic (cached for a few seconds), for Elixir-side partitioners.
#[rustler::nif(schedule = "DirtyIo")]
fn producer_partition_count(
    resource: ResourceArc<ProducerResource>,
    topic: String,
    timeout_ms: u64,
) -> NifResult<(rustler::Atom, i32)> {
    let count = resource.partition_count(&topic, Duration::from_millis(timeout_ms))?;
    Ok((atoms::ok(), count))
}

/// Enqueues every message. Returns `{:done, failures}` when every message already has its
/// verdict (all failed to enqueue), or `:pending` when `{:ottla_produced, tag, failures}` will
/// follow. `failures` is `[{index, %Ottla.Error{}}]`.
#[rustler::nif(schedule = "DirtyIo")]
fn producer_send<'a>(
    env: Env<'a>,
    resource: ResourceArc<ProducerResource>,
    pid: LocalPid,
    tag: u64,
    topic: String,
    messages: Vec<InMessage<'a>>,
    timeout_ms: u64,
) -> NifResult<Term<'a>> {
    let timeout = Duration::from_millis(timeout_ms);
    let deadline = Instant::now() + timeout;
    let count = resource.partition_count(&topic, timeout)?;
    let guard = resource
        .producer
        .read()
        .map_err(|_| Error::new("closed", "the producer is closed"))?;
    let producer = guard
        .as_ref()
        .ok_or_else(|| Error::new("closed", "the producer is closed"))?;

    let batch = Arc::new(Batch {
        pid,
        tag,
        remaining: AtomicUsize::new(messages.len() + 1),
        failures: Mutex::new(Vec::new()),
    });

    for (index, (key, value, headers, timestamp, partition)) in messages.iter().enumerate() {
        if *partition >= count {
            batch.fail(
                index,
                Error::from_code(
                    RDKafkaErrorCode::UnknownPartition,
                    format!("partition {partition} does not exist: topic {topic:?} has {count}"),
                ),
            );
            batch.complete_one();
            continue;
        }
        let mut record: BaseRecord<'_, [u8], [u8], Delivery> =
            BaseRecord::with_opaque_to(&topic, Box::new((batch.clone(), index)));
        if let Some(key) = key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = value {
            record = record.payload(value.as_slice());
        }
        if *partition >= 0 {
            record = record.partition(*partition);
        }
        if let Some(ts) = timestamp {
            record = record.timestamp(*ts);
        }
        if !headers.is_empty() {
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (name, value) in headers {
                let name = String::from_utf8_lossy(name.as_slice());
                owned = owned.insert(Header {
                    key: &name,
                    value: value.as_ref().map(|v| v.as_slice()),
                });
            }
            record = record.headers(owned);
        }
        // A full local queue drains as librdkafka sends; wait for room until the deadline.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((err, _back)) => {
                    // `_back` still owns this message's delivery opaque; dropping it releases
                    // its reference to the batch without a delivery report.
                    batch.fail(index, Error::from(err));
                    batch.complete_one();
                    break;
                }
            }
        }
    }

    if batch.complete_one() {
        Ok((atoms::done(), batch.take_failures()).encode(env))
    } else {
        Ok(atoms::pending().encode(env))
    }
}

/// Waits up to `timeout_ms` for everything enqueued to be delivered.
#[rustler::nif(schedule = "DirtyIo")]
fn producer_flush(
    resource: ResourceArc<ProducerResource>,
    timeout_ms: u64,
) -> NifResult<rustler::Atom> {
    resource.with_producer(|p| Ok(p.flush(Duration::from_millis(timeout_ms))?))?;
    Ok(atoms::ok())
}

/// Closes the producer now (flushing up to `timeout_ms` on a background thread) instead of
/// when the resource is garbage-collected. Dirty: it may wait for a send holding the lock.
#[rustler::nif(schedule = "DirtyIo")]
fn producer_close(resource: ResourceArc<ProducerResource>, timeout_ms: u64) -> rustler::Atom {
    resource.close(Duration::from_millis(timeout_ms));
    atoms::ok()
}
