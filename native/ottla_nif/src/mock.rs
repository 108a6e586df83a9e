//! librdkafka's in-process mock cluster, for the quick start and for users' own tests.
//!
//! The cluster is created through librdkafka's C API (the `rdkafka` crate's `MockCluster`
//! hides the handle needed to set the group join delay, 3 s by default, to 0). It is neither
//! `Send` nor `Sync`, and destroying it blocks, so it lives on a thread of its own; the
//! resource holds the channel that sends that thread commands. The mock has no CreateTopics
//! handler, so topic creation is a command to that thread.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use std::ffi::{CStr, CString};

use rdkafka::bindings as rd;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rustler::{Atom, Encoder, Env, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::error::{Error, Result};

/// Bounds on what a mock cluster is asked for (`Ottla.Testing` and `Ottla.create_topic/3`
/// check the same ones).
const MAX_BROKERS: i32 = 32;
const MAX_PARTITIONS: i32 = 100_000;
const MAX_REPLICAS: i32 = 32_767;

enum Command {
    CreateTopic {
        topic: String,
        partitions: i32,
        replicas: i32,
        reply: Sender<Result<()>>,
    },
    /// The next `count` requests of Kafka API `api_key` to broker `broker` are answered
    /// after `rtt_ms` (librdkafka's mock error stack, with no error).
    DelayRequests {
        broker: i32,
        api_key: i16,
        count: u32,
        rtt_ms: i32,
        reply: Sender<Result<()>>,
    },
    /// A fault from `Ottla.Testing`.
    Fault {
        fault: Fault,
        reply: Sender<Result<()>>,
    },
}

/// What `Ottla.Testing` can do to a mock cluster.
enum Fault {
    /// The broker drops its connections and refuses new ones (its partitions keep their
    /// leader).
    Down(i32),
    Up(i32),
    /// Every answer of the broker is delayed by this many ms.
    Latency(i32, i32),
    /// The next requests of an API, whichever broker gets them, fail with these errors.
    Errors(i16, Vec<rd::rd_kafka_resp_err_t>),
    Leader(CString, i32, i32),
    /// The coordinator of a group (`"group"`) or a transactional id (`"transaction"`).
    Coordinator(CString, CString, i32),
}

pub struct MockClusterResource {
    /// `None` once stopped; dropping the sender ends the cluster thread.
    commands: Mutex<Option<Sender<Command>>>,
}

#[rustler::resource_impl]
impl rustler::Resource for MockClusterResource {}

impl MockClusterResource {
    fn stop(&self) {
        if let Ok(mut commands) = self.commands.lock() {
            commands.take();
        }
    }

    fn send(&self, command: Command) -> Result<()> {
        let guard = self
            .commands
            .lock()
            .map_err(|_| Error::new("closed", "the mock cluster is stopped"))?;
        match guard.as_ref() {
            Some(tx) => tx
                .send(command)
                .map_err(|_| Error::new("closed", "the mock cluster is stopped")),
            None => Err(Error::new("closed", "the mock cluster is stopped")),
        }
    }
}

/// A mock cluster and the client that hosts it; destroyed in that order.
struct RawMock {
    ptr: *mut rd::rd_kafka_mock_cluster_t,
    brokers: i32,
    _host: BaseProducer,
}

impl RawMock {
    fn new(brokers: i32) -> Result<Self> {
        // librdkafka aborts the process (not an error) when it cannot allocate or open what
        // absurd sizes need: the same bounds as Elixir's, kept here too.
        if !(1..=MAX_BROKERS).contains(&brokers) {
            return Err(Error::new(
                "invalid_arg",
                format!("a mock cluster has 1 to {MAX_BROKERS} brokers, not {brokers}"),
            ));
        }
        let host: BaseProducer = ClientConfig::new().create()?;
        // SAFETY: `host` is a live client; librdkafka returns null on failure.
        let ptr = unsafe { rd::rd_kafka_mock_cluster_new(host.client().native_ptr(), brokers) };
        if ptr.is_null() {
            return Err(Error::new(
                "mock_cluster",
                "librdkafka could not create a mock cluster",
            ));
        }
        // SAFETY: `ptr` is the live cluster created above. Groups join at once instead of
        // after the mock's default 3 s delay.
        unsafe { rd::rd_kafka_mock_group_initial_rebalance_delay_ms(ptr, 0) };
        Ok(RawMock {
            ptr,
            brokers,
            _host: host,
        })
    }

    fn bootstrap(&self) -> String {
        // SAFETY: the cluster is live; the string it returns lives as long as the cluster.
        unsafe { CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(self.ptr)) }
            .to_string_lossy()
            .into_owned()
    }

    fn create_topic(&self, topic: &str, partitions: i32, replicas: i32) -> Result<()> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) || !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(Error::new(
                "invalid_arg",
                format!(
                    "a mock topic has 1 to {MAX_PARTITIONS} partitions and 1 to {MAX_REPLICAS} \
                     replicas, not {partitions} and {replicas}"
                ),
            ));
        }
        let name = CString::new(topic)
            .map_err(|_| Error::new("invalid_topic", "the topic name contains a NUL byte"))?;
        // SAFETY: the cluster is live and `name` outlives the call.
        let err = unsafe {
            rd::rd_kafka_mock_topic_create(self.ptr, name.as_ptr(), partitions, replicas)
        };
        answered(err, |code| {
            format!("could not create topic {topic:?}: {code}")
        })
    }

    fn delay_requests(&self, broker: i32, api_key: i16, count: u32, rtt_ms: i32) -> Result<()> {
        if !(1..=MAX_BROKERS).contains(&broker) || !(0..=1_000).contains(&count) || rtt_ms < 0 {
            return Err(Error::new(
                "invalid_arg",
                format!("cannot delay {count} requests to broker {broker} by {rtt_ms} ms"),
            ));
        }
        for _ in 0..count {
            // SAFETY: the cluster is live; the variadic part is `count` (1) pairs of
            // (rd_kafka_resp_err_t, int rtt_ms), as librdkafka's prototype documents.
            let err = unsafe {
                rd::rd_kafka_mock_broker_push_request_error_rtts(
                    self.ptr,
                    broker,
                    api_key,
                    1,
                    rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                    rtt_ms as std::os::raw::c_int,
                )
            };
            answered(err, |code| format!("broker {broker}: {code}"))?;
        }
        Ok(())
    }

    fn fault(&self, fault: Fault) -> Result<()> {
        let check = |broker: i32| {
            if (1..=self.brokers).contains(&broker) {
                Ok(())
            } else {
                Err(Error::new(
                    "invalid_arg",
                    format!(
                        "no broker {broker}: the cluster's brokers are 1 to {}",
                        self.brokers
                    ),
                ))
            }
        };
        // SAFETY (every call below): the cluster is live on this, its own thread; strings
        // are NUL-terminated and outlive the call, which copies what it keeps.
        let err = match &fault {
            Fault::Down(b) => {
                check(*b)?;
                unsafe { rd::rd_kafka_mock_broker_set_down(self.ptr, *b) }
            }
            Fault::Up(b) => {
                check(*b)?;
                unsafe { rd::rd_kafka_mock_broker_set_up(self.ptr, *b) }
            }
            Fault::Latency(b, ms) => {
                check(*b)?;
                unsafe { rd::rd_kafka_mock_broker_set_rtt(self.ptr, *b, *ms) }
            }
            Fault::Errors(api, errors) => {
                unsafe {
                    rd::rd_kafka_mock_push_request_errors_array(
                        self.ptr,
                        *api,
                        errors.len(),
                        errors.as_ptr(),
                    )
                };
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            }
            Fault::Leader(topic, partition, b) => {
                check(*b)?;
                unsafe {
                    rd::rd_kafka_mock_partition_set_leader(self.ptr, topic.as_ptr(), *partition, *b)
                }
            }
            Fault::Coordinator(kind, key, b) => {
                check(*b)?;
                unsafe {
                    rd::rd_kafka_mock_coordinator_set(self.ptr, kind.as_ptr(), key.as_ptr(), *b)
                }
            }
        };
        answered(err, |code| format!("the mock cluster refused: {code}"))
    }
}

/// `Ok` for librdkafka's "no error", otherwise the error, described by `what`.
fn answered(
    err: rd::rd_kafka_resp_err_t,
    what: impl FnOnce(rdkafka::error::RDKafkaErrorCode) -> String,
) -> Result<()> {
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Ok(());
    }
    let code = rdkafka::error::RDKafkaErrorCode::from(err);
    Err(Error::from_code(code, what(code)))
}

impl Drop for RawMock {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new and destroyed once, before its host.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.ptr) };
    }
}

fn run(cluster: RawMock, commands: std::sync::mpsc::Receiver<Command>) {
    // Runs until the resource stops it or is garbage-collected (the sender is dropped).
    for command in commands {
        match command {
            Command::CreateTopic {
                topic,
                partitions,
                replicas,
                reply,
            } => {
                let _ = reply.send(cluster.create_topic(&topic, partitions, replicas));
            }
            Command::DelayRequests {
                broker,
                api_key,
                count,
                rtt_ms,
                reply,
            } => {
                let _ = reply.send(cluster.delay_requests(broker, api_key, count, rtt_ms));
            }
            Command::Fault { fault, reply } => {
                let _ = reply.send(cluster.fault(fault));
            }
        }
    }
    drop(cluster);
}

/// Starts a mock cluster with `brokers` brokers; `{:ok, resource, "host:port,..."}`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_start(env: Env<'_>, brokers: i32) -> NifResult<Term<'_>> {
    let (ready_tx, ready_rx) = channel::<Result<String>>();
    let (tx, rx) = channel::<Command>();
    std::thread::Builder::new()
        .name("ottla-mock-cluster".into())
        .spawn(move || match RawMock::new(brokers) {
            Ok(cluster) => {
                let _ = ready_tx.send(Ok(cluster.bootstrap()));
                run(cluster, rx);
            }
            Err(err) => {
                let _ = ready_tx.send(Err(err));
            }
        })
        .map_err(|e| Error::new("thread_spawn", e.to_string()))?;
    let bootstrap = ready_rx
        .recv()
        .map_err(|_| Error::new("mock_cluster", "the mock cluster thread ended early"))??;
    let resource = ResourceArc::new(MockClusterResource {
        commands: Mutex::new(Some(tx)),
    });
    Ok((atoms::ok(), resource, bootstrap).encode(env))
}

#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_create_topic(
    resource: ResourceArc<MockClusterResource>,
    topic: String,
    partitions: i32,
    replicas: i32,
) -> NifResult<Atom> {
    call(&resource, |reply| Command::CreateTopic {
        topic,
        partitions,
        replicas,
        reply,
    })
}

/// Sends the cluster's thread a command and waits for its answer.
fn call(
    resource: &MockClusterResource,
    command: impl FnOnce(Sender<Result<()>>) -> Command,
) -> NifResult<Atom> {
    let (reply, answer) = channel();
    resource.send(command(reply))?;
    answer
        .recv()
        .map_err(|_| Error::new("closed", "the mock cluster is stopped"))??;
    Ok(atoms::ok())
}

/// Test-only (hidden as `Ottla.Native.mock_cluster_delay_requests/5`): the next `count`
/// requests of API `api_key` to `broker` are answered after `rtt_ms`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_delay_requests(
    resource: ResourceArc<MockClusterResource>,
    broker: i32,
    api_key: i16,
    count: u32,
    rtt_ms: i32,
) -> NifResult<Atom> {
    call(&resource, |reply| Command::DelayRequests {
        broker,
        api_key,
        count,
        rtt_ms,
        reply,
    })
}

/// Kafka's (broker-side) error `name`, e.g. `"not_leader_for_partition"`.
fn broker_error(name: &str) -> Option<rd::rd_kafka_resp_err_t> {
    (1..=200).find_map(|n| {
        let err = rd::rd_kafka_resp_err_t::try_from(n).ok()?;
        (crate::error::code_name(rdkafka::error::RDKafkaErrorCode::from(err)) == name)
            .then_some(err)
    })
}

fn fault(resource: &MockClusterResource, fault: Fault) -> NifResult<Atom> {
    call(resource, |reply| Command::Fault { fault, reply })
}

fn c_string(text: String, what: &str) -> NifResult<CString> {
    CString::new(text)
        .map_err(|_| Error::new("invalid_arg", format!("{what} holds a NUL byte")).into())
}

/// `Ottla.Testing.broker_down/2`, `broker_up/2`: `down` true takes the broker down.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_broker_set(
    resource: ResourceArc<MockClusterResource>,
    broker: i32,
    down: bool,
) -> NifResult<Atom> {
    fault(
        &resource,
        if down {
            Fault::Down(broker)
        } else {
            Fault::Up(broker)
        },
    )
}

/// `Ottla.Testing.set_latency/3`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_set_latency(
    resource: ResourceArc<MockClusterResource>,
    broker: i32,
    ms: i32,
) -> NifResult<Atom> {
    fault(&resource, Fault::Latency(broker, ms.max(0)))
}

/// `Ottla.Testing.fail_requests/4`: `{:error, :unknown_error}` for a name that is no Kafka
/// error.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_fail_requests(
    resource: ResourceArc<MockClusterResource>,
    api_key: i16,
    error: String,
    count: u32,
) -> NifResult<Atom> {
    let Some(err) = broker_error(&error) else {
        return Err(Error::new(
            "unknown_error",
            format!("no Kafka error is named {error:?}"),
        )
        .into());
    };
    fault(
        &resource,
        Fault::Errors(api_key, vec![err; count.min(10_000) as usize]),
    )
}

/// `Ottla.Testing.move_leader/4`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_set_leader(
    resource: ResourceArc<MockClusterResource>,
    topic: String,
    partition: i32,
    broker: i32,
) -> NifResult<Atom> {
    let topic = c_string(topic, "the topic")?;
    fault(&resource, Fault::Leader(topic, partition, broker))
}

/// `Ottla.Testing.move_coordinator/3`: `kind` is `"group"` or `"transaction"`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_set_coordinator(
    resource: ResourceArc<MockClusterResource>,
    kind: String,
    key: String,
    broker: i32,
) -> NifResult<Atom> {
    let kind = c_string(kind, "the kind")?;
    let key = c_string(key, "the key")?;
    fault(&resource, Fault::Coordinator(kind, key, broker))
}

#[rustler::nif]
fn mock_cluster_stop(resource: ResourceArc<MockClusterResource>) -> Atom {
    resource.stop();
    atoms::ok()
}
