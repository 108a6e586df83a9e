//! `ottla-baseline`: the workloads of Ottla's benchmarks (`bench/`) run on rdkafka directly, so
//! that each benchmark can report Ottla's figures as a ratio of raw librdkafka's on the same
//! machine in the same run.
//!
//! ```text
//! ottla-baseline produce BOOTSTRAP TOPIC MESSAGES THREADS BATCH [VALUE_BYTES [PLACEMENT]]
//!     THREADS threads each send their share in calls of BATCH keyed messages (16-byte key,
//!     VALUE_BYTES-byte value, 100 unless given) and wait for every delivery report of a call
//!     before the next, with the producer settings Ottla uses (idempotent, acks=all,
//!     linger.ms 0), after one warm-up message. BATCH = MESSAGES with one thread is "all
//!     queued at once": every message handed to librdkafka (waiting 1 ms whenever its queue
//!     is full), then every report awaited. PLACEMENT `keyed` (the default) lets the
//!     partitioner place each message by its key; `by-thread` sends thread t's messages to
//!     partition t.
//! ottla-baseline consume BOOTSTRAP TOPIC GROUP MESSAGES
//!     a group member as a user of the rdkafka crate writes one: a `BaseConsumer` polling its
//!     one queue with librdkafka's default fetch settings (but `fetch.queue.backoff.ms` 10,
//!     as Ottla), keeping the next offset of each partition and committing them
//!     asynchronously once a second, until MESSAGES have arrived.
//! ```
//!
//! Each prints one line: `RESULT messages=N seconds=S cpu_seconds=C bytes=B`, where the time
//! and CPU run from the first message (consume) or the first send (produce) to the last.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["produce", bootstrap, topic, messages, threads, batch, rest @ ..] if rest.len() <= 2 => {
            let value = rest.first().map_or(VALUE_BYTES, |v| number(v));
            match rest.get(1).copied().unwrap_or("keyed") {
                "keyed" => produce(bootstrap, topic, number(messages), number(threads), number(batch), value, false),
                "by-thread" => produce(bootstrap, topic, number(messages), number(threads), number(batch), value, true),
                other => Err(format!("placement {other:?}: expected keyed or by-thread")),
            }
        }
        ["consume", bootstrap, topic, group, messages] => {
            consume(bootstrap, topic, group, number(messages))
        }
        _ => Err(
            "usage: ottla-baseline produce BOOTSTRAP TOPIC MESSAGES THREADS BATCH [VALUE_BYTES [keyed|by-thread]]\n       \
             ottla-baseline consume BOOTSTRAP TOPIC GROUP MESSAGES"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ottla-baseline: {message}");
            ExitCode::FAILURE
        }
    }
}

fn number(text: &str) -> usize {
    text.parse().unwrap_or_else(|_| {
        eprintln!("ottla-baseline: {text:?} is not a number");
        std::process::exit(2)
    })
}

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn report(messages: usize, started: Instant, cpu_at_start: f64, bytes: usize) {
    println!(
        "RESULT messages={messages} seconds={:.6} cpu_seconds={:.6} bytes={bytes}",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu_at_start
    );
}

/// Counts the delivery reports of one call.
#[derive(Default)]
struct Call {
    left: Mutex<usize>,
    done: Condvar,
    failed: AtomicUsize,
}

struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Arc<Call>;

    fn delivery(&self, result: &DeliveryResult<'_>, call: Arc<Call>) {
        if result.is_err() {
            call.failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut left = call.left.lock().unwrap_or_else(|e| e.into_inner());
        *left -= 1;
        if *left == 0 {
            call.done.notify_one();
        }
    }
}

fn produce(
    bootstrap: &str,
    topic: &str,
    messages: usize,
    threads: usize,
    batch: usize,
    value_bytes: usize,
    by_thread: bool,
) -> Result<(), String> {
    let producer: ThreadedProducer<Reports> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("request.required.acks", "all")
        .set("partitioner", "murmur2_random")
        .set(
            "linger.ms",
            std::env::var("BASELINE_LINGER_MS").unwrap_or("0".into()),
        )
        .set("message.timeout.ms", "30000")
        .set(
            "message.max.bytes",
            (value_bytes + 100_000).max(1_000_000).to_string(),
        )
        .create_with_context(Reports)
        .map_err(|e| format!("producer: {e}"))?;
    let producer = Arc::new(producer);
    let value = vec![b'x'; value_bytes];
    let threads = threads.max(1);
    let batch = batch.max(1);
    let failed = Arc::new(AtomicUsize::new(0));
    // One message first, its report awaited: the topic's metadata is known before the clock
    // starts (Ottla's benchmark warms its producer the same way).
    let warm = Arc::new(Call {
        left: Mutex::new(1),
        ..Call::default()
    });
    producer
        .send(
            BaseRecord::with_opaque_to(topic, warm.clone())
                .key("warm-up")
                .payload(value.as_slice()),
        )
        .map_err(|(e, _)| format!("warm-up send: {e}"))?;
    {
        let mut left = warm.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 {
            left = warm.done.wait(left).unwrap_or_else(|e| e.into_inner());
        }
    }
    let cpu = cpu_seconds();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let share = messages / threads + usize::from(t < messages % threads);
            let (producer, value, failed) = (&producer, &value, &failed);
            scope.spawn(move || {
                let mut sent = 0;
                while sent < share {
                    let n = batch.min(share - sent);
                    let call = Arc::new(Call {
                        left: Mutex::new(n),
                        ..Call::default()
                    });
                    for i in 0..n {
                        let key = format!("{:0width$}", t * share + sent + i, width = KEY_BYTES);
                        let mut record = BaseRecord::with_opaque_to(topic, call.clone())
                            .key(key.as_bytes())
                            .payload(value.as_slice());
                        if by_thread {
                            record = record.partition(t as i32);
                        }
                        loop {
                            match producer.send(record) {
                                Ok(()) => break,
                                Err((_, back)) => {
                                    record = back;
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        }
                    }
                    let mut left = call.left.lock().unwrap_or_else(|e| e.into_inner());
                    while *left > 0 {
                        left = call.done.wait(left).unwrap_or_else(|e| e.into_inner());
                    }
                    failed.fetch_add(call.failed.load(Ordering::Relaxed), Ordering::Relaxed);
                    sent += n;
                }
            });
        }
    });
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(format!(
            "{failed} of {messages} messages were not delivered"
        ));
    }
    report(messages, started, cpu, messages * (KEY_BYTES + value_bytes));
    Ok(())
}

fn consume(bootstrap: &str, topic: &str, group: &str, messages: usize) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // librdkafka's 1 s default backs the fetcher off whenever its queue is full, which
        // halves this loop's throughput; Ottla sets the same.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| format!("subscribe: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut count, mut bytes) = (0usize, 0usize);
    let mut started: Option<(Instant, f64)> = None;
    // The next offset of each partition, committed asynchronously once a second.
    let mut next: std::collections::HashMap<i32, i64> = Default::default();
    let mut last_commit = Instant::now();
    while count < messages {
        if Instant::now() > deadline {
            return Err(format!("consumed {count} of {messages} in 600 s"));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("ottla-baseline: consume error: {e}"),
            Some(Ok(message)) => {
                if started.is_none() {
                    started = Some((Instant::now(), cpu_seconds()));
                }
                count += 1;
                bytes += message.payload_len() + message.key().map_or(0, <[u8]>::len);
                next.insert(message.partition(), message.offset() + 1);
            }
        }
        if last_commit.elapsed() >= Duration::from_secs(1) && !next.is_empty() {
            commit(&consumer, topic, &next);
            last_commit = Instant::now();
        }
    }
    commit(&consumer, topic, &next);
    let (at, cpu) = started.unwrap_or((Instant::now(), cpu_seconds()));
    report(count, at, cpu, bytes);
    Ok(())
}

fn commit(consumer: &BaseConsumer, topic: &str, next: &std::collections::HashMap<i32, i64>) {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (&partition, &offset) in next {
        let _ = tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset));
    }
    if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        eprintln!("ottla-baseline: commit: {e}");
    }
}
