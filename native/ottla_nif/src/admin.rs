//! Topic administration and cluster metadata, each call on a Rust thread of its own that
//! answers by message (`reply.rs`), with the admin client of its connection or of its
//! endpoints (`clients.rs`). Create waits until every
//! partition's leader answers for the topic, and delete until the metadata no longer shows
//! it, so a produce or fetch right after `create_topic` finds the topic.

use std::time::{Duration, Instant};

use futures_executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use std::ffi::CString;

use rdkafka::bindings as rd;
use rustler::{Atom, LocalPid, ResourceArc};
use std::sync::Arc;

use crate::atoms;
use crate::clients::{forget_everywhere, Clients, ClientsResource, FreshAdmin};
use crate::context::OttlaContext;
use crate::error::{Error, Result};
use crate::reply;

/// An admin client of its own for a call that changes topics. Such a call waits until every
/// partition's leader serves the change, which a long-lived client cannot always see: its
/// cached view of a topic it looked at while the topic was being created may show no
/// partitions until its next periodic refresh (seen on the 3-broker cluster: 30 s of
/// `_UNKNOWN_PARTITION`). Log lines and refusals go to the clients' context.
fn own_admin(clients: &Clients) -> Result<FreshAdmin> {
    clients.fresh_admin()
}

fn options(timeout: Duration) -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout))
}

fn metadata(
    client: &AdminClient<OttlaContext>,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Metadata> {
    Ok(client.inner().fetch_metadata(topic, timeout)?)
}

/// Partition count and whether every partition has a leader; `None` if the topic is absent.
fn topic_state(md: &Metadata, topic: &str) -> Option<(usize, bool)> {
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| {
            let parts = t.partitions();
            (
                parts.len(),
                parts.iter().all(|p| p.leader() >= 0 && p.error().is_none()),
            )
        })
}

/// Polls metadata until `done` holds or the deadline passes.
fn wait_for_metadata(
    client: &AdminClient<OttlaContext>,
    topic: &str,
    deadline: Instant,
    done: impl Fn(Option<(usize, bool)>) -> bool,
) -> Result<()> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(md) = metadata(
            client,
            Some(topic),
            remaining.max(Duration::from_millis(100)),
        ) {
            if done(topic_state(&md, topic)) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!("topic {topic:?}: the change did not show in the cluster metadata in time"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs an admin call on a Rust thread with the given clients, and answers its result; a
/// failure is explained by why a broker refused them, if one did.
fn answer_call<T, F>(pid: LocalPid, tag: u64, clients: Arc<Clients>, call: F) -> Atom
where
    T: rustler::Encoder,
    F: FnOnce(&Clients) -> Result<T> + Send + 'static,
{
    reply::spawn("ottla-admin", pid, tag, move |env| {
        let result = match call(&clients) {
            Ok(value) => {
                clients.succeeded();
                Ok(value)
            }
            Err(err) => Err(clients.explain(err)),
        };
        reply::answer(env, result)
    })
}

/// Whether the leader of every partition of `topic` answers for it (a ListOffsets request
/// goes to the partition's leader): metadata alone can show a topic before its leaders serve it.
fn leaders_serve(client: &AdminClient<OttlaContext>, topic: &str, partitions: i32) -> bool {
    let Ok(name) = CString::new(topic) else {
        return false;
    };
    (0..partitions).all(|p| {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client is live; the out-parameters are valid.
        let err = unsafe {
            rd::rd_kafka_query_watermark_offsets(
                client.inner().native_ptr(),
                name.as_ptr(),
                p,
                &mut low,
                &mut high,
                2_000,
            )
        };
        err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    })
}

#[allow(clippy::too_many_arguments)]
fn create_topic(
    clients: &Clients,
    topic: &str,
    partitions: i32,
    replicas: i32,
    topic_config: &[(String, String)],
    timeout: Duration,
) -> Result<Atom> {
    let deadline = reply::deadline_after(timeout);
    let client = own_admin(clients)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    for (key, value) in topic_config {
        new_topic = new_topic.set(key, value);
    }
    let results = block_on(client.create_topics([&new_topic], &options(timeout)));
    // Whatever the outcome, what any client knew of a topic of that name may be stale now.
    forget_everywhere(topic);
    for result in results? {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not create topic {name:?}: {code}"),
            ));
        }
    }
    let expected = partitions as usize;
    wait_for_metadata(
        &client,
        topic,
        deadline,
        |state| matches!(state, Some((n, true)) if n == expected),
    )?;
    while !leaders_serve(&client, topic, partitions) {
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!(
                    "topic {topic:?} was created, but not every partition's leader serves it yet"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(atoms::ok())
}

/// Creates a topic; answers `:ok` once every partition's leader serves it.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn admin_create_topic(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    partitions: i32,
    replicas: i32,
    topic_config: Vec<(String, String)>,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        create_topic(
            clients,
            &topic,
            partitions,
            replicas,
            &topic_config,
            timeout,
        )
    })
}

/// Grows `topic` to `partitions` partitions; waits until the metadata shows them all with a
/// leader that serves them, so producers and consumers refreshing their metadata find them.
fn create_partitions(
    clients: &Clients,
    topic: &str,
    partitions: usize,
    timeout: Duration,
) -> Result<Atom> {
    let deadline = reply::deadline_after(timeout);
    let client = own_admin(clients)?;
    let results = block_on(
        client.create_partitions([&NewPartitions::new(topic, partitions)], &options(timeout)),
    );
    forget_everywhere(topic);
    for result in results? {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not grow topic {name:?} to {partitions} partitions: {code}"),
            ));
        }
    }
    wait_for_metadata(
        &client,
        topic,
        deadline,
        |state| matches!(state, Some((n, true)) if n == partitions),
    )?;
    while !leaders_serve(&client, topic, partitions as i32) {
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!("topic {topic:?} grew, but not every partition's leader serves it yet"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(atoms::ok())
}

/// Grows a topic to `partitions` partitions; answers `:ok` once every partition's leader
/// serves it.
#[rustler::nif]
fn admin_create_partitions(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    partitions: usize,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        create_partitions(clients, &topic, partitions, timeout)
    })
}

fn delete_topic(clients: &Clients, topic: &str, timeout: Duration) -> Result<Atom> {
    let deadline = reply::deadline_after(timeout);
    let client = own_admin(clients)?;
    let results = block_on(client.delete_topics(&[topic], &options(timeout)));
    forget_everywhere(topic);
    for result in results? {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not delete topic {name:?}: {code}"),
            ));
        }
    }
    wait_for_metadata(&client, topic, deadline, |state| state.is_none())?;
    Ok(atoms::ok())
}

/// Deletes a topic; answers `:ok` once the metadata no longer shows it.
#[rustler::nif]
fn admin_delete_topic(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        delete_topic(clients, &topic, timeout)
    })
}

fn list_topics(clients: &Clients, timeout: Duration) -> Result<(Atom, Vec<(String, usize)>)> {
    let client = clients.admin()?;
    let md = metadata(&client, None, timeout)?;
    let mut topics: Vec<(String, usize)> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    topics.sort();
    Ok((atoms::ok(), topics))
}

/// Answers `{:ok, [{topic, partition_count}]}`, internal topics (`__*`) left out, sorted.
/// Always asks the cluster (the answer is never a cached one).
#[rustler::nif]
fn admin_list_topics(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        list_topics(clients, timeout)
    })
}

/// Answers `{:ok, partition_count}` of `topic` (learnt less than `METADATA_TTL` ago, or
/// asked for), or the error saying why it is not available.
#[rustler::nif]
fn admin_partition_count(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        Ok((atoms::ok(), clients.partition_count(&topic, 0, timeout)?))
    })
}

/// Answers `{:ok, [{partition, leader_broker_id}]}` for `topic`, sorted by partition
/// (`-1` for a partition without a leader), from a metadata request.
#[rustler::nif]
fn admin_partition_leaders(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        let client = clients.admin()?;
        crate::metadata::partition_count(client.inner(), &topic, timeout)?;
        let md = metadata(&client, Some(&topic), timeout)?;
        let mut leaders: Vec<(i32, i32)> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| (p.id(), p.leader())))
            .collect();
        leaders.sort();
        Ok((atoms::ok(), leaders))
    })
}

/// A partition and what its group committed, if anything.
type Committed = (i32, Option<i64>);

fn committed_offsets(
    clients: &Clients,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<(Atom, Vec<Committed>)> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};

    let count = clients.partition_count(topic, 0, timeout)?;
    let consumer = clients.group_consumer(group)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out: Vec<Committed> = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => (e.partition(), Some(o)),
            _ => (e.partition(), None),
        })
        .collect();
    out.sort();
    Ok((atoms::ok(), out))
}

/// Answers `{:ok, [{partition, committed_offset | nil}]}`: what consumer group `group`
/// committed for each partition of `topic` (Kafka's convention: the next offset to read).
#[rustler::nif]
fn admin_committed_offsets(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    group: String,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, clients.0.clone(), move |clients| {
        committed_offsets(clients, &group, &topic, timeout)
    })
}
