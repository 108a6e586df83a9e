//! The librdkafka client context shared by every Ottla client, and the one way the NIF sends
//! messages to BEAM processes.
//!
//! librdkafka logs and client errors are forwarded to the process registered with
//! `log_set_process/1` (Ottla's log sink, which calls `Logger`). Messages can only be sent with
//! `OwnedEnv::send_and_clear` from threads the BEAM does not manage; librdkafka may call back on
//! the thread that called into it (a dirty scheduler during a NIF), so sends from a BEAM thread
//! go through one forwarding thread instead.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Mutex, OnceLock};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rustler::{Encoder, Env, LocalPid, OwnedEnv, Term};

use crate::atoms;

/// Builds the message term inside the environment that sends it.
pub type MessageBuilder = Box<dyn for<'a> FnOnce(Env<'a>) -> Term<'a> + Send>;

static LOG_PROCESS: Mutex<Option<LocalPid>> = Mutex::new(None);
static FORWARDER: OnceLock<SyncSender<(LocalPid, MessageBuilder)>> = OnceLock::new();

/// Sends a message to `pid` from any thread, dropping it if the forwarding queue is full
/// (for log lines: never blocks). Returns `false` when it could not be sent.
pub fn send_to(pid: &LocalPid, build: MessageBuilder) -> bool {
    send(pid, build, false)
}

/// Sends a message that must arrive (delivery reports, assignments). On a BEAM thread it
/// waits for room in the forwarding queue; it is only called from Rust threads and dirty
/// schedulers, where a short wait is allowed.
pub fn send_reliably(pid: &LocalPid, build: MessageBuilder) -> bool {
    send(pid, build, true)
}

fn send(pid: &LocalPid, build: MessageBuilder, wait: bool) -> bool {
    if rustler::thread::is_scheduler_thread() {
        let tx = FORWARDER.get_or_init(spawn_forwarder);
        if wait {
            tx.send((*pid, build)).is_ok()
        } else {
            tx.try_send((*pid, build)).is_ok()
        }
    } else {
        let mut env = OwnedEnv::new();
        env.send_and_clear(pid, build).is_ok()
    }
}

fn spawn_forwarder() -> SyncSender<(LocalPid, MessageBuilder)> {
    let (tx, rx) = sync_channel::<(LocalPid, MessageBuilder)>(10_000);
    let spawned = std::thread::Builder::new()
        .name("ottla-forward".into())
        .spawn(move || {
            let mut env = OwnedEnv::new();
            for (pid, build) in rx {
                let _ = env.send_and_clear(&pid, build);
            }
        });
    if spawned.is_err() {
        // Without the thread, sends from BEAM threads are dropped (try_send fails once the
        // channel is full); nothing else depends on it.
        eprintln!("ottla: could not start the message forwarding thread");
    }
    tx
}

/// Sets (or clears) the process that receives `{:ottla_log, level, facility, message}`.
pub fn set_log_process(pid: Option<LocalPid>) {
    if let Ok(mut slot) = LOG_PROCESS.lock() {
        *slot = pid;
    }
}

/// Forwards a log line to the log process, if one is set.
pub fn log(level: rustler::Atom, facility: &str, text: &str) {
    let pid = match LOG_PROCESS.lock() {
        Ok(slot) => *slot,
        Err(_) => None,
    };
    if let Some(pid) = pid {
        let facility = facility.to_string();
        let text = text.to_string();
        send_to(
            &pid,
            Box::new(move |env| (atoms::ottla_log(), level, facility, text).encode(env)),
        );
    }
}

/// The context of every client: routes librdkafka's logs and errors to Elixir's Logger.
#[derive(Clone, Default)]
pub struct OttlaContext;

impl ClientContext for OttlaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let level = match level {
            RDKafkaLogLevel::Emerg => atoms::emergency(),
            RDKafkaLogLevel::Alert => atoms::alert(),
            RDKafkaLogLevel::Critical => atoms::critical(),
            RDKafkaLogLevel::Error => atoms::error(),
            RDKafkaLogLevel::Warning => atoms::warning(),
            RDKafkaLogLevel::Notice => atoms::notice(),
            RDKafkaLogLevel::Info => atoms::info(),
            RDKafkaLogLevel::Debug => atoms::debug(),
        };
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log(atoms::error(), "ERROR", &format!("{error}: {reason}"));
    }

    fn stats(&self, statistics: Statistics) {
        report_statistics(&StatsSummary::from(&statistics));
    }
}

impl ConsumerContext for OttlaContext {}

/// What operators graph from librdkafka's statistics (`statistics.interval.ms`).
#[derive(Clone)]
pub struct StatsSummary {
    pub client: String,
    pub name: String,
    pub rx_bytes: i64,
    pub tx_bytes: i64,
    pub replyq: i64,
    pub msg_cnt: u64,
    /// `{name, rtt_avg_us, rtt_p99_us}` per broker.
    pub brokers: Vec<(String, i64, i64)>,
    /// `{topic, partition, consumer_lag}` for assigned partitions.
    pub partitions: Vec<(String, i32, i64)>,
}

impl From<&Statistics> for StatsSummary {
    fn from(s: &Statistics) -> Self {
        let mut brokers: Vec<(String, i64, i64)> = s
            .brokers
            .values()
            .map(|b| {
                let (avg, p99) = b.rtt.as_ref().map_or((0, 0), |w| (w.avg, w.p99));
                (b.name.clone(), avg, p99)
            })
            .collect();
        brokers.sort();
        let mut partitions: Vec<(String, i32, i64)> = s
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                    .map(move |p| (topic.clone(), p.partition, p.consumer_lag))
            })
            .collect();
        partitions.sort();
        StatsSummary {
            client: s.client_type.clone(),
            name: s.name.clone(),
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
            replyq: s.replyq,
            msg_cnt: s.msg_cnt,
            brokers,
            partitions,
        }
    }
}

impl Encoder for StatsSummary {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let brokers: Vec<Term<'a>> = self
            .brokers
            .iter()
            .map(|(name, avg, p99)| {
                let pairs = [
                    (atoms::name().encode(env), name.encode(env)),
                    (atoms::rtt_avg_us().encode(env), avg.encode(env)),
                    (atoms::rtt_p99_us().encode(env), p99.encode(env)),
                ];
                Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::nil().encode(env))
            })
            .collect();
        let partitions: Vec<Term<'a>> = self
            .partitions
            .iter()
            .map(|(topic, partition, lag)| {
                let pairs = [
                    (atoms::topic().encode(env), topic.encode(env)),
                    (atoms::partition().encode(env), partition.encode(env)),
                    (atoms::consumer_lag().encode(env), lag.encode(env)),
                ];
                Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::nil().encode(env))
            })
            .collect();
        let pairs = [
            (atoms::client().encode(env), self.client.encode(env)),
            (atoms::name().encode(env), self.name.encode(env)),
            (atoms::rx_bytes().encode(env), self.rx_bytes.encode(env)),
            (atoms::tx_bytes().encode(env), self.tx_bytes.encode(env)),
            (atoms::replyq().encode(env), self.replyq.encode(env)),
            (atoms::msg_cnt().encode(env), self.msg_cnt.encode(env)),
            (atoms::brokers().encode(env), brokers.encode(env)),
            (atoms::partitions().encode(env), partitions.encode(env)),
        ];
        Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::nil().encode(env))
    }
}

/// Sends `{:ottla_statistics, summary}` to the log process (which emits it as telemetry).
pub fn report_statistics(summary: &StatsSummary) {
    let pid = match LOG_PROCESS.lock() {
        Ok(slot) => *slot,
        Err(_) => None,
    };
    if let Some(pid) = pid {
        let summary = summary.clone();
        send_to(
            &pid,
            Box::new(move |env| (atoms::ottla_statistics(), summary).encode(env)),
        );
    }
}

#[rustler::nif]
fn log_set_process(pid: Option<LocalPid>) -> rustler::Atom {
    set_log_process(pid);
    atoms::ok()
}
