//! The librdkafka client context shared by every Ottla client, and the one way the NIF sends
//! messages to BEAM processes.
//!
//! librdkafka logs and client errors are forwarded to the process registered with
//! `log_set_process/1` (Ottla's log sink, which calls `Logger`). Messages can only be sent with
//! `OwnedEnv::send_and_clear` from threads the BEAM does not manage; librdkafka may call back on
//! the thread that called into it (a dirty scheduler during a NIF), so sends from a BEAM thread
//! go through one forwarding thread instead.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rustler::{Encoder, Env, LocalPid, OwnedEnv, Term};

use crate::atoms;
use crate::error::Error;

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

/// The context of every client: routes librdkafka's logs and errors to Elixir's Logger, and
/// remembers why brokers refused the client (authentication, TLS, a wrong security
/// protocol), so that a call failing for want of a broker can say why.
#[derive(Clone, Default)]
pub struct OttlaContext {
    refused: Arc<Mutex<Option<Error>>>,
}

impl OttlaContext {
    /// `err`, with the reason brokers last refused this client when there is one: a call that
    /// timed out or found no broker then fails with that cause (e.g. `:authentication`,
    /// `:ssl`), which retrying does not cure.
    pub fn explain(&self, err: Error) -> Error {
        let cause = self.refused.lock().ok().and_then(|g| g.clone());
        match cause {
            Some(cause) if err.code != cause.code => Error {
                code: cause.code.clone(),
                message: format!("{} ({})", cause.message, err.message),
                retriable: false,
                possibly_persisted: err.possibly_persisted,
            },
            _ => err,
        }
    }

    /// A call succeeded: the last refusal no longer explains the next failure.
    pub fn forget_refusal(&self) {
        if let Ok(mut slot) = self.refused.lock() {
            *slot = None;
        }
    }

    /// Called with librdkafka's log lines and client errors. A client that never polls its
    /// main queue (admin, fetch) gets no error callbacks, only log lines: both are read.
    fn remember_refusal(&self, error: Option<&KafkaError>, reason: &str) {
        // librdkafka reports most refusals as a transport failure; the reason says which.
        let code = match error.and_then(KafkaError::rdkafka_error_code) {
            Some(RDKafkaErrorCode::Authentication) => Some("authentication"),
            Some(RDKafkaErrorCode::SSL) => Some("ssl"),
            _ if reason.contains("SASL authentication error")
                || reason.contains("Authentication failed") =>
            {
                Some("authentication")
            }
            _ if reason.contains("SSL handshake failed")
                || reason.contains("certificate verify failed") =>
            {
                Some("ssl")
            }
            _ if reason.contains("security.protocol") => Some("broker_transport_failure"),
            _ => None,
        };
        if let Some(code) = code {
            if let Ok(mut slot) = self.refused.lock() {
                *slot = Some(Error::new(code, redact_reason(reason)));
            }
        }
    }
}

/// Hands the log lines and errors waiting in a client's main queue to its context. Admin and
/// fetch clients poll nothing else, so without this their log lines (and why a broker refused
/// them) would wait there (`clients.rs` serves them twice a second and before explaining an
/// error).
pub fn serve_main_queue(rk: *mut rdkafka::bindings::rd_kafka_t, ctx: &OttlaContext) {
    use rdkafka::bindings as rd;
    use std::ffi::CStr;
    // SAFETY: `rk` is a live client; the queue handle and each event are released here.
    unsafe {
        // A consumer's main queue is forwarded to its consumer queue: events wait there.
        let consumer = rd::rd_kafka_queue_get_consumer(rk);
        let queue = if consumer.is_null() {
            rd::rd_kafka_queue_get_main(rk)
        } else {
            consumer
        };
        if queue.is_null() {
            return;
        }
        loop {
            let event = rd::rd_kafka_queue_poll(queue, 0);
            if event.is_null() {
                break;
            }
            match rd::rd_kafka_event_type(event) {
                rd::RD_KAFKA_EVENT_LOG => {
                    let (mut fac, mut text, mut level) = (std::ptr::null(), std::ptr::null(), 0);
                    if rd::rd_kafka_event_log(event, &mut fac, &mut text, &mut level) == 0
                        && !fac.is_null()
                        && !text.is_null()
                    {
                        let level = match level {
                            0 => RDKafkaLogLevel::Emerg,
                            1 => RDKafkaLogLevel::Alert,
                            2 => RDKafkaLogLevel::Critical,
                            3 => RDKafkaLogLevel::Error,
                            4 => RDKafkaLogLevel::Warning,
                            5 => RDKafkaLogLevel::Notice,
                            6 => RDKafkaLogLevel::Info,
                            _ => RDKafkaLogLevel::Debug,
                        };
                        let fac = CStr::from_ptr(fac).to_string_lossy();
                        let text = CStr::from_ptr(text).to_string_lossy();
                        ctx.log(level, &fac, &text);
                    }
                }
                rd::RD_KAFKA_EVENT_ERROR => {
                    let code = rd::rd_kafka_event_error(event);
                    let text = rd::rd_kafka_event_error_string(event);
                    if !text.is_null() {
                        let text = CStr::from_ptr(text).to_string_lossy();
                        ctx.error(KafkaError::Global(code.into()), &text);
                    }
                }
                _ => {}
            }
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
    }
}

/// What librdkafka may quote from a secret in a refusal: the part of an
/// `sasl.oauthbearer.config` it could not parse, or a PEM block. Cut before it reaches an
/// error (the log sink redacts log lines the same way).
fn redact_reason(reason: &str) -> String {
    let mut text = reason.to_string();
    for marker in ["beginning at:", "-----BEGIN"] {
        if let Some(at) = text.find(marker) {
            let keep = if marker == "-----BEGIN" {
                at
            } else {
                at + marker.len()
            };
            text.truncate(keep);
            text.push_str(" [REDACTED]");
        }
    }
    text
}

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
        if level == atoms::error() || level == atoms::warning() {
            self.remember_refusal(None, log_message);
        }
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.remember_refusal(Some(&error), reason);
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
